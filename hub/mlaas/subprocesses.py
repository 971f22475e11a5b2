"""Ending a child process the platform started (a cache server, the zygote): SIGTERM, then SIGKILL."""

from __future__ import annotations

import subprocess


def end_process(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop `proc` if it still runs: SIGTERM, and SIGKILL after `grace` seconds; reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
