"""Where the tracking server keeps artifacts, and how much each group's workspace holds.

MLflow (`--serve-artifacts --artifacts-destination <data>/artifacts`, workspaces on) stores an
artifact uploaded to a workspace under `<data>/artifacts/workspaces/<workspace>/…`."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

FRESH_FOR = 10.0  # seconds a measured size is used (plus what went through the service since)


def artifacts_root(data: Path) -> Path:
    return data / "artifacts" / "workspaces"


def directory_size(path: Path) -> int:
    """Bytes of the regular files under `path` (not following links); 0 where there is none."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def workspace_sizes(root: Path) -> dict[str, int]:
    """Every workspace's artifact bytes, measured now (for the admins' usage view)."""
    if not root.is_dir():
        return {}
    return {entry.name: directory_size(entry) for entry in sorted(root.iterdir()) if entry.is_dir()}


class ArtifactUsage:
    """Each workspace's artifact bytes: measured on disk at most every 10 s, and counted up by
    what is uploaded through the service in between (so a burst of uploads cannot pass a limit
    between two measurements)."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._measured: dict[str, tuple[float, int]] = {}

    def size(self, workspace: str) -> int:
        with self._lock:
            when, size = self._measured.get(workspace, (0.0, 0))
            if time.monotonic() - when < FRESH_FOR:
                return size
        size = directory_size(self.root / workspace)
        with self._lock:
            self._measured[workspace] = (time.monotonic(), size)
        return size

    def add(self, workspace: str, size: int) -> None:
        with self._lock:
            when, before = self._measured.get(workspace, (time.monotonic(), 0))
            self._measured[workspace] = (when, before + size)
