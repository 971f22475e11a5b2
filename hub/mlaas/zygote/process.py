"""The zygote itself: `python -m mlaas.zygote --fd N` (started by mlaas.zygote.client, never by hand).

It imports the server and its extensions once, then serves the hub on the listening socket it was
given (descriptor N). Per connection it reads one byte:
- `S` (spawn): fork at once. The child leaves the loop, closes everything of the zygote's, sends
  its PID, reads the `ServerEntry` from the hub, enters it, answers, and runs the server. The
  zygote itself closes the connection unread (see the package doc: it never holds a request).
- `W` + PID (status): the exit status of a server it forked, once it has ended.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time

from . import import_loop
from .import_state import EnvironmentReads, StandIns, plant_stand_ins
from .process_image import ROOM_VARIABLE

SPAWN, STATUS = b"S", b"W"
RUNNING, UNKNOWN = 2**31 - 1, -(2**31)
MAX_ENTRY = 1 << 20  # bytes: an entry is a few KiB
PR_SET_PDEATHSIG = 1
KEEP_STATUSES = 4096

log = logging.getLogger("mlaas.zygote")


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname).1s %(asctime)s.%(msecs)03d mlaas.zygote] %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the servers configure logging of their own; nothing of ours reaches it


# What the zygote imports: the server's own modules and its extensions (dask_labextension brings
# dask, distributed and numpy: a forked server re-reads dask's configuration for its own user, and
# its numpy has one BLAS thread, the zygote's, whatever OMP_NUM_THREADS says: the server process
# computes nothing, its kernels are started by exec and size theirs).
WARM_MODULES = (
    "jupyterhub.singleuser", "jupyter_server.serverapp", "jupyterlab.labapp",
    "jupyter_server_ydoc", "jupyter_server_fileid", "jupyter_lsp", "jupyter_server_terminals",
    "jupyter_resource_usage", "jupyterlab_nvdashboard", "jupyter_server_proxy", "notebook_shim",
    "pycrdt", "jupyter_ydoc", "anyio", "terminado", "ptyprocess", "psutil", "aiohttp", "simpervisor",
    "cloudpickle", "toolz", "tblib", "sortedcontainers", "lz4", "multiprocessing", "concurrent.futures",
    "dask_labextension", "IPython",
)
ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # no BLAS threads at import


def warm_up() -> dict[str, str | None]:
    """Import what every server imports (the work each start would otherwise repeat); returns the
    environment variables those imports looked up, with their values."""
    started = time.perf_counter()
    failed = []
    with EnvironmentReads() as reads:
        for name in WARM_MODULES:
            try:
                importlib.import_module(name)
            except Exception as e:  # a server imports it itself, and fails the same way
                failed.append(f"{name} ({e})")
    log.info("%d modules imported in %.2f s%s", len(sys.modules), time.perf_counter() - started,
             f"; could not import {', '.join(failed)}" if failed else "")
    return reads.snapshot()


def fork_hazards(allowed_fds: set[int]) -> list[str]:
    """What would make a forked server share something with another: a thread (a lock held while
    forking), a descriptor (a kernel object all servers would share; an import-time event loop's
    are renewed in each child, see import_loop)."""
    hazards = []
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1:
        hazards.append(f"{len(tasks) - 1} more thread(s) ("
                       + (", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
                          or "started by a library") + ")")
    extra = [fd for fd in sorted(int(fd) for fd in os.listdir("/proc/self/fd")) if fd not in allowed_fds and _is_open(fd)]
    if extra:
        hazards.append("open descriptors " + ", ".join(f"{fd} ({_target(fd)})" for fd in extra))
    return hazards


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def trusted(conn: socket.socket) -> bool:
    """Only the account that started the zygote (the hub's) may ask it for anything."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid == os.getuid()


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("the hub closed the connection")
        data += chunk
    return data


class Zygote:
    def __init__(self, listener: socket.socket):
        self.listener = listener
        self.exited: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector = selectors.DefaultSelector()

    def serve(self) -> socket.socket:
        """The zygote's loop. Returns only in a forked child: its connection to the hub."""
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up descriptor does the work
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.listener:
                    child = self.accept()
                    if child is not None:
                        return child
                else:
                    while True:
                        try:
                            if not os.read(self.wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                    self.reap()

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return None
        with conn:
            try:
                if not trusted(conn):
                    log.warning("refused a connection from another account")
                    return None
                conn.settimeout(5)
                command = conn.recv(1)
                if command == SPAWN:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    if os.fork() == 0:
                        return self.become_child(conn)
                elif command == STATUS:
                    (pid,) = struct.unpack("!i", recv_exact(conn, 4))
                    conn.sendall(struct.pack("!i", self.status(pid)))
            except (OSError, EOFError, struct.error) as e:
                log.warning("a request failed: %s", e)
        return None

    def become_child(self, conn: socket.socket) -> socket.socket:
        """In the child, before anything else: nothing of the zygote's stays open or installed."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        self.listener.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        own = conn.detach()  # (the zygote's `with conn` must not close the child's copy)
        keep = {own}
        loop = import_loop.current()
        if loop is not None:
            keep |= import_loop.renew(loop)
        for fd in [int(fd) for fd in os.listdir("/proc/self/fd")]:
            if fd > 2 and fd not in keep:  # (the listing's own descriptor is gone by now)
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.exited.clear()
        return socket.socket(fileno=own)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.remember(pid, os.waitstatus_to_exitcode(status))

    def remember(self, pid: int, code: int) -> None:
        self.exited[pid] = code
        while len(self.exited) > KEEP_STATUSES:
            self.exited.popitem(last=False)

    def status(self, pid: int) -> int:
        if pid in self.exited:
            return self.exited[pid]
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return UNKNOWN
        if done == 0:
            return RUNNING
        self.remember(pid, os.waitstatus_to_exitcode(status))
        return self.exited[pid]


def interpreter_of(script: str) -> str:
    """The interpreter a script's #! line names (the kernel runs a script through it)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return sys.executable
    return os.fsdecode(first[2:].split()[0]) if first.startswith(b"#!") and first[2:].split() else sys.executable


def become_server(conn: socket.socket, stand_ins: StandIns) -> None:
    """In the forked child: tell the hub who we are, take the entry it sends, become that server.
    Any failure ends the child, with the reason sent. Answers `exec` (and ends) where the user's
    environment differs from the zygote's in a variable an import read: only an exec honours it."""
    from ..server_entry import ServerEntry
    from .process_image import present_as

    conn.settimeout(60)
    answer: dict[str, object]
    try:
        conn.sendall(struct.pack("!i", os.getpid()))
        (size,) = struct.unpack("!I", recv_exact(conn, 4))
        if size > MAX_ENTRY:
            raise ValueError(f"an entry of {size} bytes")
        entry = ServerEntry.from_json(recv_exact(conn, size))
        differ = stand_ins.mismatch(entry.env)
        if differ:
            answer = {"exec": f"its environment differs in {', '.join(differ)}, which the server reads at import"}
        else:
            os.environ.clear()  # the user's environment, nothing else (the zygote's is gone with it)
            ctypes.CDLL(None).clearenv()
            os.environ.update(entry.env)
            stand_ins.put_in_place(entry.env)
            if "dask.config" in sys.modules:  # the user's own dask configuration (~/.config/dask, DASK_*)
                sys.modules["dask.config"].refresh()
            shown = [interpreter_of(entry.argv[0]), *entry.argv]  # what an exec of the script shows
            if not present_as(os.path.basename(entry.argv[0]), shown, entry.env):  # as root: before enter()
                log.warning("a server's command line or environment is larger than the room for it in /proc")
            entry.enter()
            answer = {"ok": True}
    except Exception as e:  # told to the hub, which fails the start with it
        answer = {"error": f"{type(e).__name__}: {e}"}
    try:
        reply = json.dumps(answer).encode()
        conn.sendall(struct.pack("!I", len(reply)) + reply)
    except OSError:
        os._exit(1)
    finally:
        conn.close()
    if "ok" not in answer:
        os._exit(1)
    sys.argv = list(entry.argv)
    sys.orig_argv = shown
    sys.path[0] = os.path.dirname(entry.argv[0])  # as for the console script itself


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mlaas.zygote")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket, inherited from the hub")
    parser.add_argument("--room", default="", help="space for the servers' command lines (process_image)")
    args = parser.parse_args()
    setup_logging()
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # ends with the hub
    if os.getppid() != parent:
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    listener = socket.socket(fileno=args.fd)
    os.environ.pop(ROOM_VARIABLE, None)  # (its memory stays, for the servers' environment: process_image)
    planted = plant_stand_ins()
    os.environ.update({name: "1" for name in ONE_THREAD})
    import_env = warm_up()
    loop = import_loop.current()
    try:
        loop_fds = import_loop.descriptors(loop) if loop is not None else set()
    except RuntimeError as e:
        log.error("not serving: %s", e)
        sys.exit(3)
    hazards = fork_hazards({0, 1, 2, args.fd} | loop_fds)
    if hazards:  # the hub starts servers by exec instead, and says so
        log.error("not serving: forked servers would inherit %s", "; ".join(hazards))
        sys.exit(3)
    stand_ins = StandIns(planted, import_env)
    if stand_ins.consumed:
        log.warning("servers whose environment sets %s start by exec: an import used it in a way that cannot "
                    "be redone per server", ", ".join(stand_ins.consumed))
    log.info("ready: a server's own values go to %d place(s) computed at import (%s)",
             len(stand_ins.describe()), ", ".join(stand_ins.describe()))
    gc.collect()
    gc.freeze()  # the imported objects stay out of the collector's way: their pages stay shared
    conn = Zygote(listener).serve()
    # only a forked child comes here
    become_server(conn, stand_ins)
    from jupyterhub.singleuser import main as server_main

    sys.exit(server_main())
