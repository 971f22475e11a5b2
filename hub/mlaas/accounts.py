"""Per-user system accounts and home directories for local servers.

With the hub running as root, each hub user gets a locked system account `jupyter-<name>` whose
home is `<state>/homes/<account>` (mode 0700): users cannot read each other's files or signal
each other's processes. Unprivileged, every server runs as the hub's own account (development).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

PREFIX = "jupyter-"
MAX_NAME = 32  # useradd's limit


def account_name(username: str) -> str:
    """A valid, unique system account name for a hub user name.

    Names that need no change map to `jupyter-<name>`; any other gets a hash suffix so that
    different hub names never share an account.
    """
    simple = re.sub(r"[^a-z0-9_-]", "-", username.lower())
    candidate = PREFIX + simple
    if simple == username and len(candidate) <= MAX_NAME:
        return candidate
    digest = hashlib.sha256(username.encode()).hexdigest()[:8]
    return f"{candidate[: MAX_NAME - 9]}-{digest}"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path


def ensure_account(username: str, home: Path) -> Account:
    """Create the hub user's system account (if missing) and its private home; return it."""
    return ensure_system_account(account_name(username), home, f"MLaaS Hub user {username}", "/bin/bash", move_home=True)


def ensure_system_account(
    name: str, home: Path, comment: str, shell: str = "/usr/sbin/nologin", move_home: bool = False
) -> Account:
    """Create a locked system account (if missing) with a private home; return it.

    Servers get their home by HOME and working directory, never from /etc/passwd; with
    `move_home`, /etc/passwd is updated too where it can be (usermod refuses while the account
    runs processes, e.g. for another platform instance on this machine)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--no-create-home",
                "--home-dir", str(home),
                "--shell", shell,
                "--user-group",
                "--comment", comment[:60],
                name,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        entry = pwd.getpwnam(name)
    if move_home and entry.pw_dir != str(home):  # an account from an earlier installation or state dir
        subprocess.run(["usermod", "--home", str(home), name], check=False, capture_output=True, text=True)
        entry = pwd.getpwnam(name)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o700)
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, home)


def own_account(home: Path) -> Account:
    """Single-account mode: the hub's own account, a per-user home all the same."""
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    entry = pwd.getpwuid(os.getuid())
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, home)


def untraversable_ancestor(path: Path) -> Path | None:
    """The first directory on the way to `path` that other accounts cannot enter, if any."""
    for directory in [*reversed(path.resolve().parents), path.resolve()]:
        try:
            mode = directory.stat().st_mode
        except OSError:
            return directory
        if not mode & stat.S_IXOTH:
            return directory
    return None
