"""The hub's side of the zygote (see the package doc): start it, ask it for a server, follow that
server's process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from ..server_entry import ServerEntry
from ..subprocesses import end_process
from .process import RUNNING, SPAWN, STATUS, UNKNOWN
from .process_image import room_argument, room_environment

log = logging.getLogger("JupyterHub.mlaas.zygote")

# what an exec reads before the server's first line, so a forked server cannot honour it
EXEC_ONLY = ("PYTHON", "LD_", "JUPYTERHUB_SINGLEUSER_APP", "JUPYTERHUB_SINGLEUSER_EXTENSION")
RESTART_PAUSE = 60.0  # seconds between restarts of a zygote that keeps dying


class ZygoteUnavailable(Exception):
    """The zygote cannot serve this start: the caller starts the server by exec instead."""


class ServerEntryFailed(Exception):
    """The forked child could not become the server (the message says which step failed)."""


def server_command() -> str:
    return str(Path(sys.prefix) / "bin" / "jupyterhub-singleuser")


def zygote_env(home: Path, jupyter_config: Path, path: str, keep: tuple[str, ...]) -> dict[str, str]:
    """All the zygote's environment: what every server has alike (PATH as a server's, with the
    zygote's home in place of the user's; the hub's variables that servers keep, `keep`), and the
    launch marker (mlaas.launcher: `mlaas down` stops it with the rest). Nothing else of the hub's."""
    env = {"PATH": path, "HOME": str(home), "JUPYTER_CONFIG_PATH": str(jupyter_config)}
    env.update({k: os.environ[k] for k in (*keep, "MLAAS_LAUNCH") if k in os.environ})
    return env


class ForkedServer:
    """A server forked by the zygote, in place of a Popen: `pid`, `poll()`, `returncode`.

    Its exit is seen through a pidfd (never a PID that could be reused); its exit status comes
    from the zygote, its parent."""

    def __init__(self, pid: int, pidfd: int, zygote: "Zygote"):
        self.pid, self.pidfd, self.zygote = pid, pidfd, zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.pidfd >= 0:
            ended, _, _ = select.select([self.pidfd], [], [], 0)
            if ended:
                code = self.zygote.exit_status(self.pid)
                self.returncode = 0 if code is None else code
                self.close()
        return self.returncode

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> "ForkedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Zygote:
    """One per platform in the hub process; started from the hub's main thread (the zygote ends
    with the thread that started it)."""

    def __init__(self, socket_dir: Path, home: Path, jupyter_config: Path, path: str, keep: tuple[str, ...] = ()):
        """`path`: the PATH of a server whose home is `home`; `keep`: the hub's variables servers keep."""
        self.socket_dir, self.home, self.jupyter_config, self.search_path = socket_dir, home, jupyter_config, path
        self.keep = keep
        self.path = socket_dir / "spawn.sock"
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    # --- the zygote process ---------------------------------------------------------------------
    def start(self) -> None:
        for directory in (self.socket_dir, self.home):
            directory.mkdir(parents=True, exist_ok=True)
            if directory.is_symlink() or directory.stat().st_uid != os.geteuid():
                raise RuntimeError(f"{directory} is not the hub's own directory")
            os.chmod(directory, 0o700)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(128)  # starts queue here while the zygote still imports
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlaas.zygote", f"--fd={listener.fileno()}", room_argument()],
                pass_fds=(listener.fileno(),),
                env={**zygote_env(self.home, self.jupyter_config, self.search_path, self.keep), **room_environment()},
                cwd=str(Path(sys.prefix) / "bin"), stdin=subprocess.DEVNULL,
            )
        finally:
            listener.close()
        self.started_at = time.monotonic()
        log.info("Local servers fork from a pre-started server process (pid %d, %s)", self.proc.pid, self.path)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        """Restart a zygote that died, at most once per RESTART_PAUSE (one that dies at start-up
        would otherwise be restarted for every spawn)."""
        if self.running():
            return
        if self.proc is not None:
            if time.monotonic() - self.started_at < RESTART_PAUSE:
                raise ZygoteUnavailable(f"the pre-started server process ended with status {self.proc.returncode}")
            log.warning("The pre-started server process ended with status %s; starting a new one", self.proc.returncode)
        self.start()

    def stop(self) -> None:
        end_process(self.proc)

    # --- what it may serve ----------------------------------------------------------------------
    @staticmethod
    def cannot_serve(argv: list[str], env: dict[str, str]) -> str | None:
        """Why this server has to be started by exec, or None."""
        if not argv or argv[0] != server_command():
            return f"its command is {argv[0] if argv else 'empty'}, not {server_command()}"
        exec_only = sorted(k for k in env if k.startswith(EXEC_ONLY))  # read before any import
        if exec_only:
            return f"its environment sets {', '.join(exec_only)}, which only an exec honours"
        return None

    # --- asking it --------------------------------------------------------------------------------
    async def spawn(self, entry: ServerEntry, timeout: float) -> ForkedServer:
        """Fork a server for `entry`. ZygoteUnavailable: nothing was started (start by exec);
        ServerEntryFailed: the child could not enter the entry (the start fails)."""
        self.ensure_running()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ZygoteUnavailable(f"cannot reach the pre-started server process: {e}") from None
        pid = pidfd = -1
        try:
            writer.write(SPAWN)
            await writer.drain()
            try:  # the zygote may still be importing: the connection waits in its queue
                (pid,) = struct.unpack("!i", await asyncio.wait_for(reader.readexactly(4), timeout))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                raise ZygoteUnavailable(f"the pre-started server process did not fork: {e or 'timeout'}") from None
            pidfd = os.pidfd_open(pid)  # the child waits for the entry: it cannot have ended yet
            data = entry.to_json()
            writer.write(struct.pack("!I", len(data)) + data)
            await writer.drain()
            (size,) = struct.unpack("!I", await asyncio.wait_for(reader.readexactly(4), timeout))
            answer = json.loads(await asyncio.wait_for(reader.readexactly(size), timeout))
            if "exec" in answer:
                raise ZygoteUnavailable(answer["exec"])
            if "error" in answer:
                raise ServerEntryFailed(answer["error"])
        except BaseException as e:
            if pidfd >= 0:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
            if isinstance(e, (ZygoteUnavailable, ServerEntryFailed)):
                raise
            if isinstance(e, (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, struct.error, ValueError)):
                raise ServerEntryFailed(f"the forked server process did not answer: {e or 'timeout'}") from None
            raise
        finally:
            writer.close()
        return ForkedServer(pid, pidfd, self)

    def exit_status(self, pid: int) -> int | None:
        """The exit status of a server the zygote forked, once it ended (None: not known)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(2)
                conn.connect(str(self.path))
                conn.sendall(STATUS + struct.pack("!i", pid))
                (code,) = struct.unpack("!i", conn.recv(4))
        except (OSError, struct.error):
            return None
        return None if code in (RUNNING, UNKNOWN) else code
