"""Per-user system accounts and home directories for local servers.

With the hub running as root, each hub user gets a locked system account `jupyter-<name>` whose
home is `<state>/homes/<account>` (mode 0700): users cannot read each other's files or signal
each other's processes. Unprivileged, every server runs as the hub's own account (development).

Which account belongs to which hub user is kept in the platform's state (`AccountRegistry`),
never recomputed: a name that needs hashing (`x.y` -> `jupyter-x-y-<hash>`) and a user whose
name is that hashed form would otherwise share one account, home and cgroup. The registry gives
each hub user exactly one account and each account exactly one hub user.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import re
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ADMIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"  # useradd & co., whatever $PATH says
PREFIX = "jupyter-"
MAX_NAME = 32  # useradd's limit
COMMENT_PREFIX = "MLaaS Hub user "


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


def _candidates(username: str) -> Iterator[str]:
    """Account names for a hub user, the preferred one first, then disambiguated ones."""
    first = account_name(username)
    yield first
    stem = re.sub(r"[^a-z0-9_-]", "-", username.lower())
    base = (PREFIX + stem)[: MAX_NAME - 9]
    for n in range(1, 1000):
        yield f"{base}-{hashlib.sha256(f'{username}#{n}'.encode()).hexdigest()[:8]}"


def _comment(username: str) -> str:
    return (COMMENT_PREFIX + username)[:60]


def system_account_of(account: str, username: str) -> bool:
    """An existing system account that an MLaaS hub made for this hub user."""
    try:
        return pwd.getpwnam(account).pw_gecos == _comment(username)
    except KeyError:
        return False


def _system_account_of_other(account: str, username: str) -> bool:
    """An existing system account that an MLaaS hub made for a different hub user."""
    try:
        gecos = pwd.getpwnam(account).pw_gecos
    except KeyError:
        return False
    return gecos.startswith(COMMENT_PREFIX) and gecos != _comment(username)


class AccountRegistry:
    """The persistent, one-to-one map hub user <-> system account (and the identities of the AAI).

    SQLite in the platform's private hub directory; UNIQUE constraints make a shared account
    impossible even if two processes (the hub, the Dask gateway) allocate at the same moment.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS accounts (username TEXT PRIMARY KEY, account TEXT NOT NULL UNIQUE)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS identities (issuer TEXT NOT NULL, subject TEXT NOT NULL, "
                "username TEXT NOT NULL UNIQUE, PRIMARY KEY (issuer, subject))"
            )
        os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 30000")
        return db

    def account_for(self, username: str) -> str:
        """The hub user's account name: the one on record, or a new one nobody else has."""
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT account FROM accounts WHERE username = ?", (username,)).fetchone()
                if row:
                    db.execute("COMMIT")
                    return row[0]
                for candidate in _candidates(username):
                    taken = db.execute("SELECT 1 FROM accounts WHERE account = ?", (candidate,)).fetchone()
                    if taken or _system_account_of_other(candidate, username):
                        continue
                    db.execute("INSERT INTO accounts (username, account) VALUES (?, ?)", (username, candidate))
                    db.execute("COMMIT")
                    return candidate
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("ROLLBACK")
        raise RuntimeError(f"no free account name for {username!r}")

    def recorded_account(self, username: str) -> str | None:
        """The hub user's account name if one was ever given (never allocates one)."""
        with self._connect() as db:
            row = db.execute("SELECT account FROM accounts WHERE username = ?", (username,)).fetchone()
        return row[0] if row else None

    def all_accounts(self) -> list[tuple[str, str]]:
        """Every (hub user, account) on record."""
        with self._connect() as db:
            return db.execute("SELECT username, account FROM accounts ORDER BY username").fetchall()

    def forget_account(self, username: str) -> None:
        """Drop the hub user's account from the record (the user was removed). Their AAI identity
        stays bound to the name, so no other identity can take the name over."""
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM accounts WHERE username = ?", (username,))

    # --- identities: which AAI account a hub user name belongs to (mlaas.auth) -----------------
    def bind_identity(self, issuer: str, subject: str, username: str) -> str:
        """The hub user name of an AAI identity: the one it was first given, or `username` if
        free. Raises NameTaken when `username` already belongs to another identity."""
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT username FROM identities WHERE issuer = ? AND subject = ?", (issuer, subject)
                ).fetchone()
                if row:
                    db.execute("COMMIT")
                    return row[0]
                owner = db.execute(
                    "SELECT issuer, subject FROM identities WHERE username = ?", (username,)
                ).fetchone()
                if owner:
                    db.execute("ROLLBACK")
                    raise NameTaken(username)
                db.execute(
                    "INSERT INTO identities (issuer, subject, username) VALUES (?, ?, ?)", (issuer, subject, username)
                )
                db.execute("COMMIT")
                return username
            except NameTaken:
                raise
            except BaseException:
                db.execute("ROLLBACK")
                raise


class NameTaken(Exception):
    """A hub user name that belongs to a different identity of the AAI."""


@functools.cache
def registry_at(path: str) -> AccountRegistry:
    """The registry of a platform's state, one per process (the hub, the Dask gateway)."""
    return AccountRegistry(Path(path).resolve())


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path


def ensure_account(account: str, username: str, home: Path) -> Account:
    """Create the hub user's system account `account` (from the registry), if missing, and its
    private home; return it."""
    return ensure_system_account(account, home, _comment(username), "/bin/bash", move_home=True)


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
                admin_tool("useradd"),
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
        subprocess.run([admin_tool("usermod"), "--home", str(home), name], check=False, capture_output=True, text=True)
        entry = pwd.getpwnam(name)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o700)
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, home)


def admin_tool(name: str) -> str:
    import shutil

    return shutil.which(name, path=ADMIN_PATH) or name


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
