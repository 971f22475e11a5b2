"""Where the tracking server keeps artifacts, and how much each group's workspace holds.

MLflow (`--serve-artifacts --artifacts-destination <data>/artifacts`, workspaces on) stores an
artifact uploaded to a workspace under `<data>/artifacts/workspaces/<workspace>/…`."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("mlaas.tracking")

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


def workspace_sizes(root: Path, locate: Callable[[str], Path] | None = None) -> dict[str, int]:
    """Every workspace's artifact bytes, measured now (for the admins' usage view)."""
    if not root.is_dir():
        return {}
    locate = locate or (lambda workspace: root / workspace)
    return {entry.name: directory_size(locate(entry.name)) for entry in sorted(root.iterdir())
            if entry.is_dir() and not entry.name.startswith(".")}


class ArtifactUsage:
    """Each workspace's artifact bytes: measured on disk at most every 10 s, and counted up by
    what is uploaded through the service in between (so a burst of uploads cannot pass a limit
    between two measurements)."""

    def __init__(self, root: Path, locate: Callable[[str], Path] | None = None):
        self.root = root
        self.locate = locate or (lambda workspace: root / workspace)  # (a project's workspace: its storage)
        self._lock = threading.Lock()
        self._measured: dict[str, tuple[float, int]] = {}

    def size(self, workspace: str) -> int:
        with self._lock:
            when, size = self._measured.get(workspace, (0.0, 0))
            if time.monotonic() - when < FRESH_FOR:
                return size
        size = directory_size(self.locate(workspace))
        with self._lock:
            self._measured[workspace] = (time.monotonic(), size)
        return size

    def add(self, workspace: str, size: int) -> None:
        with self._lock:
            when, before = self._measured.get(workspace, (time.monotonic(), 0))
            self._measured[workspace] = (when, before + size)


PROJECT_ARTIFACTS = "mlflow-artifacts"  # in a group's project storage


def is_mount_point(path: Path) -> bool:
    """Whether something is mounted at `path` in this process's mount namespace (also a bind
    mount from the same file system, which os.path.ismount cannot tell)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            points = {line.split()[4].encode().decode("unicode_escape") for line in f}
    except OSError:
        return os.path.ismount(path)
    return target in points


class ProjectArtifacts:
    """A group with a project keeps its runs' artifacts on the project's storage, in
    `<project>/mlflow-artifacts`: members read them there (`~/projects/<group>/mlflow-artifacts`;
    only MLflow writes), they count against the project's storage, and they go where the
    project's data goes.

    MLflow refuses an artifact path that resolves outside its artifact directory (a link would),
    so the project's directory is *mounted* at the workspace's place: on one machine, where the
    service is root, a bind mount in MLflow's own mount namespace (`binds`, made at its start; it
    starts again, a few seconds, when a new project's artifacts are placed), MLflow's account
    joins the project's Unix group to reach it and owns the directory (2750: the members may
    read); on Kubernetes the chart mounts each project volume's `mlflow-artifacts` there itself.
    Artifacts a workspace stored before its project existed move there (`move_into`). A service
    that cannot mount (not root) keeps them on its own storage and says so once."""

    def __init__(self, root: Path, projects: Path, account: str | None = None):
        self.root, self.projects, self.account = root, projects, account  # account: MLflow's, as root
        self._placed: set[str] = set()
        self._mounts: dict[str, Path] = {}  # workspace -> its project's directory, bound at MLflow's start

    def placed(self, workspace: str) -> bool:
        return workspace in self._placed

    def give_up(self, workspace: str) -> None:
        """Leave the workspace's artifacts where they are (say so once, not per request)."""
        self._placed.add(workspace)

    def location(self, workspace: str) -> Path:
        """Where the workspace's artifacts are, as this service sees them."""
        return self._mounts.get(workspace, self.root / workspace)

    def binds(self) -> list[tuple[Path, Path]]:
        """(project directory, workspace directory) pairs to bind in MLflow's mount namespace."""
        return [(target, self.root / ws) for ws, target in sorted(self._mounts.items())]

    def join(self, unix_group: str) -> None:
        """MLflow's account in the project's Unix group (it has it from MLflow's next start)."""
        import grp

        from ..accounts import admin_tool

        if self.account is None or self.account in grp.getgrnam(unix_group).gr_mem:
            return
        subprocess.run([admin_tool("gpasswd"), "--add", self.account, unix_group], check=True, capture_output=True)
        log.info("MLflow's account %s joined %s (the project's artifacts)", self.account, unix_group)

    def place(self, workspace: str, project: Path, unix_group: str | None) -> bool:
        """Keep the workspace's artifacts in the project's storage; True when MLflow must start
        again to have the new bind mount."""
        if workspace in self._placed:
            return False
        at = self.root / workspace
        if is_mount_point(at):  # mounted by the platform (the chart's subPath mount)
            self._placed.add(workspace)
            return False
        if not project.is_dir():
            return False  # (a live-added project's volume, until the next deploy): tried again later
        if at.is_symlink():
            log.warning("The workspace %s's artifacts are at a link, which MLflow refuses; they stay there", workspace)
            self._placed.add(workspace)
            return False
        if self.account is None:
            log.warning("The artifacts of the workspace %s stay on the tracking service's storage: only a service "
                        "running as root mounts its project's storage for MLflow", workspace)
            self._placed.add(workspace)
            return False
        import grp
        import pwd

        who = pwd.getpwnam(self.account)
        group = grp.getgrnam(unix_group).gr_gid if unix_group else None
        target = project / PROJECT_ARTIFACTS
        target.mkdir(exist_ok=True)
        os.chown(target, who.pw_uid, who.pw_gid if group is None else group)
        os.chmod(target, 0o2750)
        at.mkdir(parents=True, exist_ok=True)  # the mount point
        moved = move_into(at, target, group)
        if moved:
            log.info("Moved %d artifact files of the workspace %s (from before its project) to its project's storage",
                     moved, workspace)
        os.chown(at, who.pw_uid, who.pw_gid)
        self._mounts[workspace] = target
        self._placed.add(workspace)
        log.info("The artifacts of the workspace %s are kept on its project's storage, %s", workspace, target)
        return True


def move_into(source: Path, target: Path, group: int | None) -> int:
    """Move what `source` holds into `target`, merged (same relative paths: MLflow finds them
    there), readable by the project's `group`; returns the number of files moved."""
    import shutil

    files = [Path(root, name).relative_to(source) for root, _, names in os.walk(source) for name in names]
    for entry in list(source.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target / entry.name, symlinks=True, dirs_exist_ok=True, copy_function=shutil.move)
            shutil.rmtree(entry)
        else:
            shutil.move(str(entry), str(target / entry.name))
    if group is not None:
        for relative in files:
            for path in [target / relative, *(target / p for p in relative.parents if str(p) != ".")]:
                if not path.is_symlink():
                    os.chown(path, -1, group)
                    os.chmod(path, (path.stat().st_mode & 0o7777) | (0o2050 if path.is_dir() else 0o040))
    return len(files)
