"""Shorter garbage-collection pauses in the hub.

A full collection walks every container object the hub holds, and it runs on the event loop's
thread: on the benchmark's hub at 1,000 nodes they took 0.26–0.43 s each (mlaas.loop_watch). Most
of those objects live as long as the hub: modules, classes, the application, its configuration.
Once the hub has started, `freeze_when_started` collects once and moves everything alive then into
the collector's permanent generation (gc.freeze), so later collections walk only what came after.
Frozen objects are still freed by reference counting; only cycles among them stay.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("JupyterHub.mlaas.heap")

_scheduled: list[asyncio.TimerHandle] = []


def freeze() -> int:
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%d objects of the started hub moved out of the garbage collector's walks (%.0f ms)", frozen,
             (time.monotonic() - started) * 1000)
    return frozen


def freeze_when_started(delay: float = 60.0) -> bool:
    """Freeze `delay` seconds from now on the running loop (once per process)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    if not _scheduled:
        _scheduled.append(loop.call_later(delay, freeze))
    return True
