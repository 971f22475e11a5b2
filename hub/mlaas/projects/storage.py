"""Project storage on one machine: a directory per group, writable by its members only.

    <state>/projects/            0711 root  (enterable, not listable)
    <state>/projects/atlas-ml/   2770 root:mlaas-p-atlas-ml  (setgid: new files keep the group)

Each member's account is put in the project's Unix group when one of their servers starts (and
taken out of groups they have left); servers run with umask 007 under user-private groups, so
files written there are readable and writable by the other members and nobody else. A member's
personal server sees every project at `~/projects/<group>`; a project server works in it.
On Kubernetes the same role is played by a ReadWriteMany volume per group (the chart).
"""

from __future__ import annotations

import grp
import logging
import os
import subprocess
from pathlib import Path

from ..accounts import admin_tool
from .names import UNIX_GROUP_PREFIX, project_slug, unix_group

log = logging.getLogger("JupyterHub.mlaas.projects")
LINKS_DIR = "projects"  # in a member's home


def project_dir(root: Path, group: str) -> Path:
    return root / project_slug(group)


def ensure_storage(root: Path, group: str, accounts: bool) -> Path:
    """Create the project's directory (and its Unix group when accounts are in use)."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    directory = project_dir(root, group)
    directory.mkdir(exist_ok=True)
    if accounts:
        gid = ensure_unix_group(unix_group(group))
        os.chown(directory, 0, gid)
        os.chmod(directory, 0o2770)
    return directory


def ensure_unix_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run([admin_tool("groupadd"), "--system", name], check=True, capture_output=True, text=True)
        return grp.getgrnam(name).gr_gid


def set_project_groups(account: str, groups: list[str]) -> None:
    """Make the account a member of exactly these projects' Unix groups (others untouched)."""
    wanted = {unix_group(g) for g in groups}
    current = {g.gr_name for g in grp.getgrall() if g.gr_name.startswith(UNIX_GROUP_PREFIX) and account in g.gr_mem}
    for name in sorted(wanted - current):
        subprocess.run([admin_tool("gpasswd"), "--add", account, name], check=True, capture_output=True, text=True)
        log.info("Account %s joined %s", account, name)
    for name in sorted(current - wanted):
        subprocess.run([admin_tool("gpasswd"), "--delete", account, name], check=True, capture_output=True, text=True)
        log.info("Account %s left %s (no longer in the group)", account, name)


def link_projects(home: Path, root: Path, directories: dict[str, Path], uid: int, gid: int) -> None:
    """`~/projects/<group>` for each project of the user; stale links to projects removed."""
    links = home / LINKS_DIR
    if not links.is_dir() or links.is_symlink():
        if links.is_symlink():
            links.unlink()
        links.mkdir(exist_ok=True)
        os.chown(links, uid, gid)
        os.chmod(links, 0o700)
    for entry in links.iterdir():
        if entry.is_symlink() and Path(os.readlink(entry)).parent == root and entry.name not in directories:
            entry.unlink()
    for name, target in directories.items():
        link = links / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            log.warning("Not linking project %s: %s exists and is not our link", name, link)
            continue
        link.symlink_to(target)
        os.lchown(link, uid, gid)
