"""Enforce a profile's CPU and memory limits on a local server process and everything it starts.

Backends, best first, chosen once at hub start and named in the log:
- cgroup v2 (memory.max, cpu.max, pids.max) where the unified hierarchy has the memory and cpu
  controllers (pids where it has that controller too);
- cgroup v1 (memory.limit_in_bytes, cpu.cfs_quota_us, pids.max) where those hierarchies are writable;
- rlimits (RLIMIT_AS, RLIMIT_NPROC) otherwise, e.g. when the hub is not root.
Every backend bounds the processes (and threads) of a server: a fork bomb in one server ends at
its limit instead of taking the machine's process table. Where no pids controller exists,
RLIMIT_NPROC bounds the processes of the server's account instead.
CPU affinity to ceil(limit) cores is applied with every backend, so `os.sched_getaffinity` and
the thread pools of numpy, torch and dask see the cores the user may use.

Every function used between fork and exec (`Placement.preexec`) touches only files and syscalls.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
GROUP = "mlaas"
PERIOD_US = 100_000


@dataclass
class Placement:
    """Where one server runs: its cgroups, its CPUs and the rlimit, applied in the child."""

    key: str
    cgroup_procs: list[Path] = field(default_factory=list)
    cpus: set[int] = field(default_factory=set)
    address_space: int | None = None
    nproc: int | None = None  # RLIMIT_NPROC, where no pids cgroup bounds the server

    def preexec(self) -> None:
        pid = str(os.getpid())
        for procs in self.cgroup_procs:
            with open(procs, "w") as f:
                f.write(pid)
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)
        if self.address_space:
            resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))
        if self.nproc:
            resource.setrlimit(resource.RLIMIT_NPROC, (self.nproc, self.nproc))


DEFAULT_PIDS = 1024


class LimitBackend:
    name = "rlimits"

    def __init__(self, log: logging.Logger):
        self.log = log
        self.pids = DEFAULT_PIDS
        self._cpu_use: Counter[int] = Counter()
        self._placed: dict[str, Placement] = {}

    # -- the part every backend shares: CPU affinity --------------------------------------
    def _pick_cpus(self, cpu_limit: float) -> set[int]:
        available = sorted(os.sched_getaffinity(0))
        n = max(1, min(len(available), math.ceil(cpu_limit)))
        least_used = sorted(available, key=lambda c: (self._cpu_use[c], c))
        return set(least_used[:n])

    def place(self, key: str, cpu_limit: float, mem_limit: int) -> Placement:
        self.release(key)
        placement = Placement(key, cpus=self._pick_cpus(cpu_limit))
        self._confine(placement, cpu_limit, mem_limit)
        self._cpu_use.update(placement.cpus)
        self._placed[key] = placement
        return placement

    def release(self, key: str) -> None:
        """Forget a server's placement and end what is left in its cgroups."""
        placement = self._placed.pop(key, None)
        if placement:
            self._cpu_use.subtract(placement.cpus)
        self._remove(key)

    # -- what differs ----------------------------------------------------------------------
    def _confine(self, placement: Placement, cpu_limit: float, mem_limit: int) -> None:
        placement.address_space = mem_limit
        placement.nproc = self.pids

    def _remove(self, key: str) -> None:
        pass

    def describe(self) -> str:
        return (f"rlimits (RLIMIT_AS for memory, RLIMIT_NPROC {self.pids} processes per account) and CPU affinity; "
                "no writable cgroup controllers")


def _kill_and_remove(directory: Path) -> None:
    if not directory.exists():
        return
    for _ in range(50):
        try:
            pids = [int(p) for p in (directory / "cgroup.procs").read_text().split()]
        except OSError:
            break
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    try:
        directory.rmdir()
    except OSError:
        pass


def _remove_if_empty(directory: Path) -> None:
    """Remove this platform's cgroup tree once its last server is gone (rmdir fails otherwise)."""
    try:
        directory.rmdir()
    except OSError:
        pass


class CgroupV2(LimitBackend):
    name = "cgroup-v2"

    def __init__(self, log: logging.Logger, root: Path, group: str = GROUP):
        super().__init__(log)
        self.base = root / group
        self.has_pids = "pids" in _controllers(root)
        self._ensure_base()

    def _ensure_base(self) -> None:
        if not self.base.exists():
            self.base.mkdir()
            (self.base / "cgroup.subtree_control").write_text("+memory +cpu" + (" +pids" if self.has_pids else ""))

    def _confine(self, placement: Placement, cpu_limit: float, mem_limit: int) -> None:
        self._ensure_base()
        directory = self.base / placement.key
        directory.mkdir(exist_ok=True)
        (directory / "memory.max").write_text(str(mem_limit))
        if (directory / "memory.swap.max").exists():
            (directory / "memory.swap.max").write_text("0")
        (directory / "cpu.max").write_text(f"{int(cpu_limit * PERIOD_US)} {PERIOD_US}")
        if self.has_pids:
            (directory / "pids.max").write_text(str(self.pids))
        else:
            placement.nproc = self.pids
        placement.cgroup_procs = [directory / "cgroup.procs"]

    def _remove(self, key: str) -> None:
        directory = self.base / key
        kill = directory / "cgroup.kill"
        if kill.exists():
            try:
                kill.write_text("1")
            except OSError:
                pass
        _kill_and_remove(directory)
        _remove_if_empty(self.base)

    def describe(self) -> str:
        pids = f"pids.max {self.pids}" if self.has_pids else f"RLIMIT_NPROC {self.pids}"
        return f"cgroup v2 (memory.max, cpu.max, {pids}) under {self.base}, and CPU affinity"


class CgroupV1(LimitBackend):
    name = "cgroup-v1"

    def __init__(self, log: logging.Logger, memory_root: Path, cpu_root: Path, group: str = GROUP,
                 pids_root: Path | None = None):
        super().__init__(log)
        self.memory = memory_root / group
        self.cpu = cpu_root / group
        self.pids_dir = pids_root / group if pids_root is not None else None
        self.memory.mkdir(exist_ok=True)
        self.cpu.mkdir(exist_ok=True)
        if self.pids_dir is not None:
            self.pids_dir.mkdir(exist_ok=True)

    def _confine(self, placement: Placement, cpu_limit: float, mem_limit: int) -> None:
        mem = self.memory / placement.key
        cpu = self.cpu / placement.key
        mem.mkdir(parents=True, exist_ok=True)
        cpu.mkdir(parents=True, exist_ok=True)
        (mem / "memory.limit_in_bytes").write_text(str(mem_limit))
        (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(int(cpu_limit * PERIOD_US)))
        placement.cgroup_procs = [mem / "cgroup.procs", cpu / "cgroup.procs"]
        if self.pids_dir is not None:
            self.pids_dir.mkdir(exist_ok=True)
            pids = self.pids_dir / placement.key
            pids.mkdir(exist_ok=True)
            (pids / "pids.max").write_text(str(self.pids))
            placement.cgroup_procs.append(pids / "cgroup.procs")
        else:
            placement.nproc = self.pids

    def _remove(self, key: str) -> None:
        _kill_and_remove(self.memory / key)
        _kill_and_remove(self.cpu / key)
        _remove_if_empty(self.memory)
        _remove_if_empty(self.cpu)
        if self.pids_dir is not None:
            _kill_and_remove(self.pids_dir / key)
            _remove_if_empty(self.pids_dir)

    def describe(self) -> str:
        pids = f"pids.max {self.pids} in {self.pids_dir}" if self.pids_dir else f"RLIMIT_NPROC {self.pids}"
        return f"cgroup v1 (memory {self.memory}, cpu {self.cpu}, {pids}), and CPU affinity"


def _controllers(directory: Path) -> set[str]:
    try:
        return set((directory / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _choose(root: Path) -> tuple[str, tuple[Path, ...]]:
    """Which backend this machine allows, and where; creates nothing."""
    if os.geteuid() == 0:
        for unified in (root, root / "unified"):
            if {"memory", "cpu"} <= _controllers(unified) and os.access(unified, os.W_OK):
                return "cgroup-v2", (unified,)
        memory_root, cpu_root, pids_root = root / "memory", root / "cpu", root / "pids"
        if (memory_root / "memory.limit_in_bytes").exists() and (cpu_root / "cpu.cfs_quota_us").exists():
            if (pids_root / "cgroup.procs").exists() and os.access(pids_root, os.W_OK):
                return "cgroup-v1", (memory_root, cpu_root, pids_root)
            return "cgroup-v1", (memory_root, cpu_root)
    return "rlimits", ()


KIND_SUMMARY = {
    "cgroup-v2": "cgroup v2 (memory.max, cpu.max, pids) and CPU affinity",
    "cgroup-v1": "cgroup v1 (memory, cpu, pids) and CPU affinity",
    "rlimits": "rlimits (RLIMIT_AS, RLIMIT_NPROC) and CPU affinity; no writable cgroups",
}


def backend_kind(root: Path = CGROUP_ROOT) -> str:
    """'cgroup-v2', 'cgroup-v1' or 'rlimits': what `detect_backend` would use here."""
    return _choose(root)[0]


def detect_backend(log: logging.Logger, root: Path = CGROUP_ROOT, group: str = GROUP,
                   pids: int = DEFAULT_PIDS) -> LimitBackend:
    """The best backend this machine allows; never raises.

    `group` names this platform's cgroup subtree; platforms sharing a machine (a test run beside
    `make up`) use different ones, so one never ends the other's processes."""
    kind, paths = _choose(root)
    backend: LimitBackend
    try:
        if kind == "cgroup-v2":
            backend = CgroupV2(log, paths[0], group)
        elif kind == "cgroup-v1":
            backend = CgroupV1(log, paths[0], paths[1], group, paths[2] if len(paths) > 2 else None)
        else:
            backend = LimitBackend(log)
    except OSError as e:
        log.warning("%s is not usable (%s); falling back to rlimits", kind, e)
        backend = LimitBackend(log)
    backend.pids = pids
    return backend
