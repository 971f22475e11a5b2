"""Notice when the hub's event loop is blocked, and say by what.

Everything the hub serves (the spawn form, the API, the proxy's checks, spawns) shares one event
loop: any synchronous step that takes long delays every request behind it. A heartbeat on the
loop marks each turn; a watcher thread sees a heartbeat overdue by `threshold`, samples what the
loop's thread is executing at that moment (the innermost frames of the hub's own code and of
JupyterHub) and, when the loop is back, logs the stall with its length, how much of it the thread
spent on a CPU and waiting for one (the kernel's schedstat), and that place:

    event loop blocked 84 ms (on a CPU 80, waiting for one 2: work) in sqlalchemy/…:952 do_execute (… < jupyterhub/apihandlers/users.py:204 get)

A stall mostly spent waiting for a CPU is the machine's load, not the hub's work. Metrics:
`mlaas_hub_event_loop_stalls_total{where,cause}` (cause `work` or `no-cpu`) and
`mlaas_hub_event_loop_lag_seconds` (a histogram of how late each heartbeat ran).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import traceback
from collections import Counter as Tally
from pathlib import Path

from prometheus_client import Counter, Histogram

log = logging.getLogger("JupyterHub.mlaas.loop")

STALLS = Counter("mlaas_hub_event_loop_stalls_total",
                 "Event-loop stalls over the threshold, by the place sampled and cause: no-cpu (mostly waiting "
                 "for a CPU: the machine's load) or work (the hub's work or a blocking call)",
                 ["where", "cause"])
LAG = Histogram("mlaas_hub_event_loop_lag_seconds", "How late the hub's event-loop heartbeat ran",
                buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

# frames below these are the machinery around the code that blocks, not the code itself
_MACHINERY = ("/asyncio/", "/tornado/ioloop.py", "/tornado/platform/", "/threading.py", "/selectors.py")


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "mlaas", "lib"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[index + 1:] if anchor != "mlaas" else parts[index:])
    return "/".join(parts[-2:])


# the code a stall is charged to: the innermost frame of the hub's own code, its spawners or
# JupyterHub (a library frame below it, e.g. SQLAlchemy's, says what that code was waiting for)
_APPLICATION = ("/mlaas/", "/jupyterhub/", "/kubespawner/", "/oauthenticator/")


def _frame(f: traceback.FrameSummary) -> str:
    return f"{_short(f.filename)}:{f.lineno} {f.name}"


def describe(frame) -> str:
    """The innermost frame, and the innermost frames of application code that led to it."""
    stack = [f for f in traceback.extract_stack(frame) if not any(m in f.filename for m in _MACHINERY)]
    if not stack:
        return "the event loop itself"
    inner = stack[-1]
    application = [f for f in stack if any(a in f.filename for a in _APPLICATION)]
    callers = [f for f in application[::-1] if f is not inner][:2]
    where = _frame(inner)
    if callers:
        where += " (… < " + " < ".join(_frame(f) for f in callers) + ")"
    return where


class LoopWatch:
    """A heartbeat every `interval` on `loop`, and a thread that samples a loop late by `threshold`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float = 0.05, interval: float = 0.02):
        self.loop, self.threshold, self.interval = loop, threshold, interval
        self.beat_at = time.monotonic()
        self.places: Tally[str] = Tally()  # this process's stalls by place, for tests and the bench
        self._loop_thread: int | None = None
        self._sampled: str | None = None
        self._gc_started = 0.0
        self._schedstat = ""
        self._times = (0.0, 0.0)
        self._stop = threading.Event()

    def start(self) -> LoopWatch:
        self.loop.call_soon_threadsafe(self._first_beat)
        threading.Thread(target=self._watch, name="mlaas-loop-watch", daemon=True).start()
        gc.callbacks.append(self._collection)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._collection in gc.callbacks:
            gc.callbacks.remove(self._collection)

    def _collection(self, phase: str, info: dict) -> None:
        """Garbage collections pause whatever thread triggered them: the loop's, mostly."""
        if phase == "start":
            self._gc_started = time.monotonic()
            return
        took = time.monotonic() - self._gc_started
        if took >= self.threshold and threading.get_ident() == self._loop_thread:
            self._sampled = f"garbage collection (generation {info.get('generation')}, {took * 1000:.0f} ms)"

    def _first_beat(self) -> None:
        self._loop_thread = threading.get_ident()
        self._schedstat = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self._beat(time.monotonic())

    def _scheduler_times(self) -> tuple[float, float]:
        """Seconds the loop's thread has run on a CPU, and waited for one (Linux schedstat)."""
        try:
            with open(self._schedstat) as f:
                on_cpu, waiting, _ = f.read().split()
            return int(on_cpu) / 1e9, int(waiting) / 1e9
        except (OSError, ValueError):
            return time.thread_time(), 0.0

    def _beat(self, due: float) -> None:
        now = time.monotonic()
        LAG.observe(max(0.0, now - due))
        blocked, sampled = now - self.beat_at - self.interval, self._sampled
        self._sampled = None
        times = self._scheduler_times()
        if sampled is not None and blocked >= self.threshold:
            on_cpu, waiting = (times[0] - self._times[0]) * 1000, (times[1] - self._times[1]) * 1000
            # most of it waiting for a CPU: a machine too busy; else the hub's work or a blocking call
            cause = "no-cpu" if waiting >= max(on_cpu, blocked * 1000 / 2) else "work"
            STALLS.labels(sampled.split(" (", 1)[0], cause).inc()
            self.places[sampled] += 1
            log.warning("event loop blocked %.0f ms (on a CPU %.0f, waiting for one %.0f: %s) in %s", blocked * 1000,
                        on_cpu, waiting, cause, sampled)
        self.beat_at, self._times = now, times
        if not self._stop.is_set():
            self.loop.call_later(self.interval, self._beat, now + self.interval)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self.loop.is_closed():
                return
            late = time.monotonic() - self.beat_at - self.interval
            if late >= self.threshold and self._sampled is None and self._loop_thread is not None:
                frame = sys._current_frames().get(self._loop_thread)
                self._sampled = describe(frame) if frame is not None else "unknown"


_watches: list[LoopWatch] = []


def watch_running_loop(threshold: float = 0.05) -> LoopWatch | None:
    """Start watching the running event loop (once per process); None outside a running loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    if _watches and _watches[0].loop is loop:
        return _watches[0]
    for old in _watches:
        old.stop()
    _watches[:] = [LoopWatch(loop, threshold).start()]
    return _watches[0]
