"""Per-user disk quotas for homes on one machine: detected, named at start-up, applied where possible.

Linux enforces per-user block limits only on a filesystem mounted with user quotas (ext4
`usrquota`/`usrjquota=`/`quota`, XFS `uquota`/`usrquota`) and with quota tools installed
(`setquota`). Where those exist, each account gets the configured limit when its server starts.
Where they do not, the hub says so at start-up: a user can fill the filesystem of the homes,
which (by default) also holds the hub's database.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .accounts import ADMIN_PATH

QUOTA_OPTIONS = ("usrquota", "usrjquota", "quota", "uquota")


@dataclass(frozen=True)
class QuotaSupport:
    mount: str
    fstype: str
    enabled: bool
    tool: str | None

    @property
    def usable(self) -> bool:
        return self.enabled and self.tool is not None

    def describe(self, limit: int, hub_dir: Path | None = None) -> str:
        from .profiles.quantities import format_bytes

        if self.usable:
            return f"user quotas on {self.mount} ({self.fstype}): {format_bytes(limit)} per account"
        why = "no quota tools (setquota)" if self.enabled else "not mounted with user quotas (usrquota)"
        shared = ""
        if hub_dir is not None and mount_of(hub_dir)[0] == self.mount:
            shared = "; it also holds the hub's database, so a full disk stops the hub"
        return f"none: {self.mount} ({self.fstype}) is {why}; a user can fill it{shared}"


def mount_of(path: Path, mounts_file: str = "/proc/mounts") -> tuple[str, str, list[str]]:
    """(mount point, filesystem type, options) of the filesystem holding `path`."""
    target = str(path.resolve())
    best = ("/", "unknown", [])
    for line in Path(mounts_file).read_text().splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, parts[2], parts[3].split(","))
    return best


def support(path: Path, mounts_file: str = "/proc/mounts") -> QuotaSupport:
    mount, fstype, options = mount_of(path, mounts_file)
    enabled = any(o == q or o.startswith(q + "=") for o in options for q in QUOTA_OPTIONS)
    return QuotaSupport(mount, fstype, enabled, shutil.which("setquota", path=ADMIN_PATH))


def apply(quota: QuotaSupport, account: str, limit: int) -> None:
    """Give `account` a hard block limit of `limit` bytes on the homes' filesystem."""
    if not quota.usable:
        return
    kib = str(max(1, limit // 1024))
    subprocess.run([quota.tool or "setquota", "-u", account, kib, kib, "0", "0", quota.mount],
                   check=True, capture_output=True, text=True)
