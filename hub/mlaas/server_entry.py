"""What a local server's process must become before it runs a line of the user's: one description,
applied the same way whether the process was started by exec (JupyterHub's Popen) or forked
from the pre-started server process (mlaas.zygote).

`ServerEntry` is plain data (it crosses a socket as JSON); `enter()` applies it to the calling
process, as root where the hub is root, in this order:
1. a new session (signals of the hub's terminal never reach the server);
2. its cgroups, CPU set and rlimits (mlaas.limits.Placement);
3. the GPU fence: a private mount namespace hiding the device nodes it was not given
   (mlaas.gpu_fence), made before the account switch so the user cannot undo it;
4. umask 007 (user-private groups: homes stay private, project files group-writable);
5. the account's supplementary groups, group and user (all three, or the process keeps root's);
6. "dumpable" again, as an exec would leave it: the user may inspect their own server;
7. its home as the working directory.
Every step touches only syscalls and files: no lock, no thread, nothing that could hang between
fork and exec.
"""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .gpu_fence import hide_nodes
from .limits import Placement

PR_SET_DUMPABLE = 4


@dataclass
class ServerEntry:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    placement: Placement
    hide: list[str] = field(default_factory=list)  # device nodes the fence hides
    uid: int | None = None  # None: keep the hub's account (single-account development mode)
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    umask: int = 0o007

    def to_json(self) -> bytes:
        data = asdict(self)
        data["placement"]["cgroup_procs"] = [str(p) for p in self.placement.cgroup_procs]
        data["placement"]["cpus"] = sorted(self.placement.cpus)
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "ServerEntry":
        data: dict[str, Any] = json.loads(raw)
        p = data.pop("placement")
        placement = Placement(key=p["key"], cgroup_procs=[Path(x) for x in p["cgroup_procs"]], cpus=set(p["cpus"]),
                              address_space=p["address_space"], nproc=p["nproc"])
        return cls(placement=placement, **data)

    def enter(self, new_session: bool = True) -> None:
        """Make the calling process this server's (see the module doc for the order)."""
        if new_session:
            os.setsid()
        self.placement.preexec()
        if self.hide:
            hide_nodes([os.fsencode(p) for p in self.hide])
        os.umask(self.umask)
        if self.uid is not None:
            assert self.gid is not None
            os.setgroups(self.groups)
            os.setgid(self.gid)
            os.setuid(self.uid)
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        os.chdir(self.cwd)  # its own, not whatever /etc/passwd says; fails loudly if it cannot
