"""Which server a GPU process belongs to, on one machine: NVML names the processes on each device
by PID; a server's kernels, terminals and whatever they start descend from the server's own
process, so a process belongs to the server whose process is its nearest ancestor. (Processes
moved out of the tree by a daemonising double fork count as nobody's; the GPU fence keeps them
off devices the server was not given anyway.)"""

from __future__ import annotations

from pathlib import Path

MAX_DEPTH = 256  # a chain of parents longer than this is not followed to its end


def stat_fields(pid: int, proc: Path = Path("/proc")) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may itself hold spaces and
    parentheses): state, parent PID, …, start time at [19]; None when the process is gone."""
    try:
        return (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except (OSError, ValueError):
        return None


def parent_of(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The parent PID; None when the process is gone."""
    fields = stat_fields(pid, proc)
    try:
        return int(fields[1]) if fields else None
    except (IndexError, ValueError):
        return None


def owner_of(pid: int, servers: dict[int, str], proc: Path = Path("/proc")) -> str | None:
    """The server ("user/name") whose process is `pid` or its nearest ancestor, or None."""
    seen = 0
    while pid and pid > 1 and seen < MAX_DEPTH:
        if pid in servers:
            return servers[pid]
        parent = parent_of(pid, proc)
        if parent is None or parent == pid:
            return None
        pid, seen = parent, seen + 1
    return None


def attribute(device_pids: dict[str, tuple[int, ...]], holders: dict[str, str], servers: dict[int, str],
              proc: Path = Path("/proc")) -> tuple[dict[str, list[dict]], list[dict]]:
    """For each device's processes, their server; and the processes that run on a device their
    server does not hold (or belong to no server): {uuid, pid, server, held_by}."""
    per_device: dict[str, list[dict]] = {}
    outside: list[dict] = []
    for uuid, pids in sorted(device_pids.items()):
        for pid in pids:
            server = owner_of(pid, servers, proc)
            per_device.setdefault(uuid, []).append({"pid": pid, "server": server})
            if server is None or holders.get(uuid) != server:
                outside.append({"uuid": uuid, "pid": pid, "server": server, "held_by": holders.get(uuid)})
    return per_device, outside
