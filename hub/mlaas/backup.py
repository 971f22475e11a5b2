"""`mlaas backup` / `mlaas restore` for the one-machine platform (docs/operations.md "Backup").

A backup is one tar archive (mode 0600: it holds the platform's secrets) with:

- `hub/jupyterhub.sqlite` and `hub/accounts.sqlite`: copied with SQLite's online backup, so the
  copy is consistent while the hub writes (users, groups, tokens, servers; which system account
  and AAI identity belongs to which user), and `hub/profiles.last-good.json`; with the hub's
  database on PostgreSQL (`database_url`), `hub/jupyterhub.pgdump` from `pg_dump` (a consistent
  snapshot too), restored with `pg_restore` into the configured, empty database;
- `secrets/`: the cookie secret (sessions survive a restore), the OIDC client secret, the
  development IdP's passwords;
- `admin/`: the history of every admin edit;
- `tracking/`: experiment tracking (mlaas.tracking): MLflow's databases (online backup copies;
  on PostgreSQL `tracking/mlflow/<database>.pgdump` from `pg_dump`, restored into the configured
  databases, made where missing), its artifacts, and the service's secrets.json (the users'
  MLflow passwords);
- `profiles/`: the profile files in force (`profiles_dir`);
- with `--homes`: `homes/` and `projects/`, users' and groups' files with their modes;
- `manifest.json`: what is inside, when and from where it was made.

`mlaas restore` unpacks it into the configured `state_dir`, which must be empty or missing (it
never overwrites a platform), and the profile files into `profiles_dir` when that has none. As
root, each user's files are given to their system account on this machine (created as the hub
would, from the restored account records), whatever numeric IDs they had before.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .postgres import DatabaseError, database_name, ensure_database, write_pgpass
from .settings import Settings

FORMAT = 1
DATABASES = ("jupyterhub.sqlite", "accounts.sqlite")
TRACKING_DATABASES = ("mlflow.db", "auth.db")  # in <state>/tracking/mlflow (mlaas.tracking.server)


class BackupError(Exception):
    pass


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its online backup API)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        with dst:
            src.backup(dst)
        dst.close()
    finally:
        src.close()


def _add_tree(tar: tarfile.TarFile, directory: Path, name: str) -> int:
    if not directory.is_dir():
        return 0
    count = 0
    for path in sorted(directory.rglob("*")):
        if path.is_socket() or path.is_fifo():
            continue
        tar.add(path, arcname=f"{name}/{path.relative_to(directory)}", recursive=False)
        count += path.is_file()
    return count


def _add_tracking(tar: tarfile.TarFile, s: Settings, tmp: Path, progress: Callable[[str], None]) -> int:
    """The tracking service's state: its databases copied while MLflow may write them, the rest as is."""
    from .tracking.server import databases

    state = s.state_dir / "tracking"
    if not state.is_dir():
        return 0
    progress("tracking")
    count = 0
    db = databases(s)
    if db.postgresql:
        for url, kind in ((db.tracking, "tracking"), (db.auth, "auth")):
            dump = tmp / f"{kind}.pgdump"
            progress(f"tracking database {database_name(url)} (pg_dump)")
            _pg("pg_dump", url, db.password_file, ["--format=custom", "--no-owner", f"--file={dump}"])
            tar.add(dump, arcname=f"tracking/mlflow/{kind}.pgdump")
            count += 1
    for path in sorted(state.rglob("*")):
        relative = path.relative_to(state)
        if path.is_socket() or path.is_fifo() or path.name.endswith(("-wal", "-shm", "-journal")) or \
                (path.parent == state / "mlflow" and path.name == "pgpass"):  # (made again from the settings)
            continue
        if path.parent == state / "mlflow" and path.name in TRACKING_DATABASES:
            _sqlite_copy(path, tmp / path.name)
            tar.add(tmp / path.name, arcname=f"tracking/{relative}")
        else:
            tar.add(path, arcname=f"tracking/{relative}", recursive=False)
        count += path.is_file()
    return count


def backup(settings: Settings, target: Path, homes: bool = False,
           progress: Callable[[str], None] = lambda _: None) -> dict:
    """Write a backup of the platform (running or not) to `target`; returns its manifest."""
    s = settings
    if not s.database_url and not (s.hub_dir / "jupyterhub.sqlite").is_file():
        raise BackupError(f"no platform state at {s.state_dir} (no hub/jupyterhub.sqlite): nothing to back up")
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "state_dir": str(s.state_dir), "public_url": s.public_url, "homes": homes, "contents": {}}
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with tempfile.TemporaryDirectory(prefix="mlaas-backup-") as tmp, os.fdopen(fd, "wb") as out, \
            tarfile.open(fileobj=out, mode="w:gz", compresslevel=3) as tar:  # homes: speed over the last %
        for db in DATABASES:
            if (s.hub_dir / db).is_file():
                progress(f"database {db}")
                _sqlite_copy(s.hub_dir / db, Path(tmp) / db)
                tar.add(Path(tmp) / db, arcname=f"hub/{db}")
                manifest["contents"][f"hub/{db}"] = 1
        if s.database_url:
            progress("database (pg_dump)")
            _pg("pg_dump", s.database_url, s.database_password_file,
                ["--format=custom", "--no-owner", f"--file={Path(tmp) / 'jupyterhub.pgdump'}"])
            tar.add(Path(tmp) / "jupyterhub.pgdump", arcname="hub/jupyterhub.pgdump")
            manifest["contents"]["hub/jupyterhub.pgdump"] = 1
        snapshot = s.hub_dir / "profiles.last-good.json"
        if snapshot.is_file():
            tar.add(snapshot, arcname="hub/profiles.last-good.json")
        manifest["contents"]["tracking"] = _add_tracking(tar, s, Path(tmp), progress)
        for name, directory in [("secrets", s.secrets_dir), ("admin", s.state_dir / "admin"),
                                ("profiles", s.profiles_dir)] + ([("homes", s.homes_dir), ("projects", s.projects_dir)]
                                                                  if homes else []):
            progress(name)
            manifest["contents"][name] = _add_tree(tar, directory, name)
        data = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
        tar.addfile(info, io.BytesIO(data))
    progress(f"written {target}")
    return manifest


def postgresql_tool(name: str) -> str | None:
    """A PostgreSQL program: the newest of Debian's /usr/lib/postgresql/<major>/bin (the server's
    programs are there only, and its `pg_wrapper` on the PATH picks a version by local clusters),
    else the one on the PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(found[-1]) if found else shutil.which(name)


def _pg(tool: str, database_url: str, password_file: Path | None, args: list[str]) -> None:
    """pg_dump / pg_restore against a database of the platform, the password from its file (given
    to libpq in a password file of its own, gone afterwards)."""
    from urllib.parse import urlparse

    binary = postgresql_tool(tool)
    if binary is None:
        raise BackupError(f"{tool} is not installed (Debian: apt-get install postgresql-client)")
    url = urlparse(database_url)
    conn = [f"--host={url.hostname}", f"--port={url.port or 5432}", f"--username={url.username or ''}",
            f"--dbname={url.path.strip('/')}"]
    with tempfile.TemporaryDirectory(prefix="mlaas-pg-") as private:
        env = dict(os.environ)
        if password_file:
            env["PGPASSFILE"] = str(write_pgpass(database_url, password_file, Path(private)))
        r = subprocess.run([binary, *conn, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise BackupError(f"{tool} failed: {r.stderr.strip()[-500:]}")


def _safe_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """The archive's entries, refusing anything that could write outside the restored tree: absolute
    or `..` paths, devices, hard links, and entries below a symbolic link of the archive."""
    known = ("hub/", "secrets/", "admin/", "tracking/", "profiles/", "homes/", "projects/", "manifest.json")
    members, links = [], set()
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if not m.name.startswith(known) or m.name.startswith("/") or ".." in parts:
            raise BackupError(f"not a backup of this platform: unexpected entry {m.name!r}")
        if not (m.isfile() or m.isdir() or m.issym()):
            raise BackupError(f"not a backup of this platform: {m.name!r} is neither file, directory nor link")
        if any(str(Path(*parts[:i])) in links for i in range(1, len(parts))):
            raise BackupError(f"not a backup of this platform: {m.name!r} lies below a link of the archive")
        if m.issym():
            links.add(str(Path(m.name)))
        members.append(m)
    return members


def restore(settings: Settings, source: Path, progress: Callable[[str], None] = lambda _: None,
            give_homes: bool = True) -> dict:
    """Unpack a backup into the configured state (see the module doc); returns its manifest.
    `give_homes`: as root, give each home to its user's system account (made if missing)."""
    s = settings
    if s.state_dir.exists() and any(s.state_dir.iterdir()):
        raise BackupError(f"state_dir {s.state_dir} is not empty: restore into a new, empty state directory "
                          "(a restore never overwrites a platform)")
    try:
        tar = tarfile.open(source, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise BackupError(f"{source}: not a backup archive ({e})") from None
    with tar, tempfile.TemporaryDirectory(prefix="mlaas-restore-") as tmp:
        members = _safe_members(tar)
        try:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        except (KeyError, ValueError):
            raise BackupError(f"{source}: no manifest.json: not a backup made by `mlaas backup`") from None
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{source}: backup format {manifest.get('format')!r}; this version reads {FORMAT}")
        progress("unpacking")
        tar.extractall(tmp, members=members)  # checked by _safe_members
        staged = Path(tmp)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(s.state_dir, 0o711)
        for name in ("hub", "secrets", "admin", "tracking", "homes", "projects"):
            if (staged / name).exists():
                progress(name)
                shutil.move(str(staged / name), str(s.state_dir / name))
        if (staged / "profiles").is_dir():
            if s.profiles_dir.is_dir() and any(s.profiles_dir.glob("*.y*ml")):
                progress(f"profiles: {s.profiles_dir} has profile files already; kept them (the backup's are in "
                         f"{s.state_dir / 'restored-profiles'})")
                shutil.move(str(staged / "profiles"), str(s.state_dir / "restored-profiles"))
            else:
                s.profiles_dir.mkdir(parents=True, exist_ok=True)
                for f in (staged / "profiles").iterdir():
                    shutil.move(str(f), str(s.profiles_dir / f.name))
    dump = s.hub_dir / "jupyterhub.pgdump"
    if dump.is_file():
        if not s.database_url:
            raise BackupError("the backup's hub database is a PostgreSQL dump: set database_url (and "
                              "database_password_file) to the empty database to restore it into")
        progress("database (pg_restore)")
        _pg("pg_restore", s.database_url, s.database_password_file, ["--no-owner", "--exit-on-error", str(dump)])
        dump.unlink()
    _restore_tracking_databases(s, progress)
    for directory, mode in ((s.hub_dir, 0o700), (s.secrets_dir, 0o700), (s.state_dir / "tracking", 0o711),
                            (s.state_dir / "tracking" / "mlflow", 0o700)):
        if directory.exists():
            os.chmod(directory, mode)
    if give_homes and os.geteuid() == 0 and s.homes_dir.is_dir():
        _give_homes_to_their_accounts(s, progress)
    progress("restored")
    return manifest


def _restore_tracking_databases(s: Settings, progress: Callable[[str], None]) -> None:
    """MLflow's PostgreSQL dumps into the configured databases (made where missing, as the service
    would); they must be empty."""
    from .tracking.server import databases

    dumps = {kind: s.state_dir / "tracking" / "mlflow" / f"{kind}.pgdump" for kind in ("tracking", "auth")}
    if not any(d.is_file() for d in dumps.values()):
        return
    db = databases(s)
    if not db.postgresql:
        raise BackupError("the backup's tracking databases are PostgreSQL dumps: set database_url (or "
                          "tracking.database_url) to the server to restore them into")
    for kind, url in (("tracking", db.tracking), ("auth", db.auth)):
        if dumps[kind].is_file():
            progress(f"tracking database {database_name(url)} (pg_restore)")
            try:
                ensure_database(url, db.password_file)
            except DatabaseError as e:
                raise BackupError(str(e)) from None
            _pg("pg_restore", url, db.password_file, ["--no-owner", "--exit-on-error", str(dumps[kind])])
            dumps[kind].unlink()


def _give_homes_to_their_accounts(s: Settings, progress: Callable[[str], None]) -> None:
    """Each restored home to its user's system account here (made now, as the hub would)."""
    from .accounts import AccountRegistry, ensure_account

    for username, account in AccountRegistry(s.accounts_db).all_accounts():
        home = s.homes_dir / account
        if not home.is_dir():
            continue
        acct = ensure_account(account, username, home)
        for path in [home, *home.rglob("*")]:
            os.lchown(path, acct.uid, acct.gid)  # a link itself, never what it points to
        progress(f"home of {username}: {account}")
