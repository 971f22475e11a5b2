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
from pathlib import PurePath

from . import import_loop
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
HOME_VARIABLE = "HOME"
# Variables that differ from server to server and that imports may read. The zygote imports with a
# unique stand-in value for each (its home directory for HOME); where a stand-in ends up in module
# state, a forked server gets its own value instead, as its own import would have computed.
PER_SERVER = (
    "USER", "JUPYTERHUB_USER", "JUPYTERHUB_SERVER_NAME", "JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL",
    "JUPYTERHUB_BASE_URL", "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_HOST",
    "JUPYTERHUB_CLIENT_ID", "JUPYTERHUB_OAUTH_CALLBACK_URL", "JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_PUBLIC_HUB_URL",
    "JUPYTERHUB_DEFAULT_URL", "JUPYTERHUB_ROOT_DIR",
)
LOOKUPS = ("get", "__contains__", "getenv")  # how a lookup reaches os.environ (else: a listing)


class EnvironmentReads:
    """Which environment variables imports look up (os.environ[...], .get, `in`, os.getenv),
    with the value each had; a listing (items(), copy()) is not a lookup of each."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def __enter__(self) -> "EnvironmentReads":
        cls = type(os.environ)
        self._saved = cls.__getitem__, cls.__contains__
        getitem, contains = self._saved
        reads = self

        def looked_up(frame) -> bool:  # type: ignore[no-untyped-def]
            code = frame.f_code
            if "collections_abc" in code.co_filename or code.co_filename.endswith(("os.py", "<frozen os>")):
                return code.co_name in LOOKUPS
            return True

        def note(env, key) -> None:  # type: ignore[no-untyped-def]
            if env is os.environ:
                reads.keys.add(key)
            elif env is getattr(os, "environb", None):
                reads.keys.add(os.fsdecode(key))

        def __getitem__(env, key):  # type: ignore[no-untyped-def]
            if looked_up(sys._getframe(1)):
                note(env, key)
            return getitem(env, key)

        def __contains__(env, key):  # type: ignore[no-untyped-def]
            note(env, key)
            return contains(env, key)

        cls.__getitem__, cls.__contains__ = __getitem__, __contains__  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        cls = type(os.environ)
        cls.__getitem__, cls.__contains__ = self._saved  # type: ignore[method-assign]

    def snapshot(self) -> dict[str, str | None]:
        return {key: os.environ.get(key) for key in sorted(self.keys)}


def plant_stand_ins() -> dict[str, str]:
    """Give each PER_SERVER variable a unique stand-in value (HOME is the zygote's own home)."""
    tag = os.urandom(6).hex()
    planted = {name: f"mlaas-zygote-{name.lower()}-{tag}" for name in PER_SERVER}
    os.environ.update(planted)
    planted[HOME_VARIABLE] = os.environ[HOME_VARIABLE]
    return planted


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


class StandIns:
    """Where the stand-in values ended up in module state (a module's constants, a class's
    attributes and trait defaults, a module-level object's attributes: JupyterLab's settings
    directory, send2trash's trash, HubAuth's API URL, the kernel session's user name), so that a
    forked server can put its own values there."""

    def __init__(self, planted: dict[str, str], import_env: dict[str, str | None]):
        self.planted = planted
        self.import_env = import_env
        self.places: list[tuple[object, str]] = []  # (a namespace dict, a class or an object; name)
        self.traits: list[object] = []  # trait objects whose default_value holds one
        seen: set[int] = set()
        environments = (os.environ, getattr(os, "environb", None))
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or module.__name__ in ("os", "posix"):  # the environment itself
                continue
            for name, value in list(namespace.items()):
                if any(value is e for e in environments):
                    continue
                if self._holds(value):
                    self.places.append((namespace, name))
                if id(value) in seen or isinstance(value, (type(sys), int, float, str, bytes)):
                    continue
                seen.add(id(value))
                self._scan_object(value, module)
        self.consumed = sorted(k for k, v in planted.items() if k in import_env and not self._anywhere(v))

    def _scan_object(self, value: object, module: object) -> None:
        if isinstance(value, type):
            if value.__module__ != getattr(module, "__name__", None):
                return
            attributes = dict(vars(value))
        else:
            try:
                attributes = object.__getattribute__(value, "__dict__")
            except (AttributeError, TypeError):
                return
            if not isinstance(attributes, dict):
                return
        for name, attribute in list(attributes.items()):
            if self._holds(attribute):
                self.places.append((value, name))
            try:  # a trait's default, read without running any __getattr__ (lazy modules import)
                own = object.__getattribute__(attribute, "__dict__")
            except (AttributeError, TypeError):
                continue
            if isinstance(own, dict) and self._holds(own.get("default_value")):
                self.traits.append(attribute)

    def _anywhere(self, stand_in: str) -> bool:
        def has(value: object) -> bool:
            return stand_in in (os.fsdecode(value) if isinstance(value, bytes) else str(value))

        return any(has(self._value(owner, name)) for owner, name in self.places) or any(
            has(getattr(t, "default_value", "")) for t in self.traits)

    def _holds(self, value: object, depth: int = 2) -> bool:
        if isinstance(value, (list, tuple)):
            return depth > 0 and any(self._holds(v, depth - 1) for v in value)
        if isinstance(value, dict):  # e.g. traitlets' per-class cache of static defaults
            return depth > 0 and any(self._holds(v, depth - 1) for v in list(value.values()))
        if isinstance(value, bytes):
            return any(os.fsencode(v) in value for v in self.planted.values())
        return isinstance(value, (str, PurePath)) and any(v in str(value) for v in self.planted.values())

    @staticmethod
    def _value(owner: object, name: str) -> object:
        return owner[name] if isinstance(owner, dict) else object.__getattribute__(owner, "__dict__")[name] \
            if not isinstance(owner, type) else vars(owner)[name]

    def _replaced(self, value: object, env: dict[str, str]) -> object:
        if isinstance(value, (list, tuple)):
            return type(value)(self._replaced(v, env) for v in value)
        if isinstance(value, dict):
            return {k: self._replaced(v, env) for k, v in value.items()}
        if isinstance(value, bytes):
            for name, stand_in in self.planted.items():
                value = value.replace(os.fsencode(stand_in), os.fsencode(env.get(name, "")))
            return value
        if isinstance(value, (str, PurePath)):
            text = str(value)
            for name, stand_in in self.planted.items():
                text = text.replace(stand_in, env.get(name, ""))
            return text if isinstance(value, str) else type(value)(text)
        return value

    def describe(self) -> list[str]:
        def where(owner: object) -> str:
            if isinstance(owner, dict):
                return str(owner.get("__name__", "?"))
            return owner.__qualname__ if isinstance(owner, type) else type(owner).__qualname__ + "()"

        return [f"{where(owner)}.{name}" for owner, name in self.places] + [
            f"trait {getattr(t, 'name', '?')}" for t in self.traits]

    def mismatch(self, env: dict[str, str]) -> list[str]:
        """The variables an import looked up whose value for this server would have given a
        different import (HOME and the planted ones are fine: their values are put in place)."""
        differ = [k for k in self.consumed if k in env]
        for key, value in self.import_env.items():
            if key in self.planted:
                continue
            expected = None if value is None else self._replaced(value, env)
            if env.get(key) != expected:
                differ.append(key)
        return differ

    def put_in_place(self, env: dict[str, str]) -> None:
        for owner, name in self.places:
            if isinstance(owner, dict):
                owner[name] = self._replaced(owner[name], env)
            elif isinstance(owner, type):
                setattr(owner, name, self._replaced(vars(owner)[name], env))
            else:
                attributes = object.__getattribute__(owner, "__dict__")
                attributes[name] = self._replaced(attributes[name], env)
        for trait in self.traits:
            trait.default_value = self._replaced(trait.default_value, env)  # type: ignore[attr-defined]


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
