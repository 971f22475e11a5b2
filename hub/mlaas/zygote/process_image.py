"""What a forked server shows to `ps`, psutil and /proc, as an exec'd one would: its command line,
its environment and its name.

The kernel reads /proc/PID/cmdline and /proc/PID/environ from the memory where exec put the
arguments and the environment, so a forked process would still show the zygote's. The zygote is
therefore started with room to spare in both (`ARG_ROOM`, `ENV_ROOM`), and the child writes its
own over them, padded with NUL bytes (readers split on NUL and skip the empty strings; `ps`
shows trailing blanks). Where the process may (CAP_SYS_RESOURCE), prctl(PR_SET_MM) points the
areas at exact copies instead. PR_SET_NAME sets the short name (/proc/PID/comm).
"""

from __future__ import annotations

import ctypes
import os

from ..capacity.process_owner import stat_fields

PR_SET_NAME = 15
PR_SET_MM = 35
PR_SET_MM_ARG_START, PR_SET_MM_ARG_END, PR_SET_MM_ENV_START, PR_SET_MM_ENV_END = 8, 9, 10, 11
ARG_ROOM = 8192  # bytes of arguments and of environment the zygote is started with, to be overwritten
ENV_ROOM = 65536
ROOM_VARIABLE = "MLAAS_ZYGOTE_ROOM"

_kept: list[ctypes.Array] = []  # areas pointed at with PR_SET_MM live as long as the process


def room_argument() -> str:
    return "--room=" + " " * ARG_ROOM


def room_environment() -> dict[str, str]:
    return {ROOM_VARIABLE: " " * ENV_ROOM}


def _areas() -> tuple[int, int, int, int]:
    """arg_start, arg_end, env_start, env_end (fields 48-51 of /proc/self/stat)."""
    fields = stat_fields(os.getpid())
    assert fields is not None  # this process is running
    return int(fields[45]), int(fields[46]), int(fields[47]), int(fields[48])


def _point(libc: ctypes.CDLL, start_opt: int, end_opt: int, current_end: int, data: bytes) -> None:
    buffer = ctypes.create_string_buffer(data, len(data))
    start = ctypes.addressof(buffer)
    end = start + len(data)
    # the kernel keeps start <= end at each step: move the side that keeps it true first
    steps = [(start_opt, start), (end_opt, end)] if start <= current_end else [(end_opt, end), (start_opt, start)]
    for option, address in steps:
        if libc.prctl(PR_SET_MM, option, ctypes.c_ulong(address), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MM)")
    _kept.append(buffer)


def _overwrite(start: int, end: int, data: bytes) -> bool:
    if len(data) > end - start:
        return False
    ctypes.memmove(start, data + b"\0" * (end - start - len(data)), end - start)
    return True


def present_as(name: str, argv: list[str], env: dict[str, str]) -> bool:
    """Show `name` (comm), `argv` and `env` in /proc/self. Call it after the process's own
    environment was replaced (nothing may point into the old area any more). False where the
    arguments or the environment did not fit."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(os.fsencode(name)[:15]), 0, 0, 0)
    cmdline = b"".join(os.fsencode(a) + b"\0" for a in argv)
    environ = b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in env.items())
    arg_start, arg_end, env_start, env_end = _areas()
    try:
        _point(libc, PR_SET_MM_ARG_START, PR_SET_MM_ARG_END, arg_end, cmdline)
        _point(libc, PR_SET_MM_ENV_START, PR_SET_MM_ENV_END, env_end, environ)
        return True
    except OSError:  # no CAP_SYS_RESOURCE: write over the room the zygote was started with
        return _overwrite(arg_start, arg_end, cmdline) & _overwrite(env_start, env_end, environ)
