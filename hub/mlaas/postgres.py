"""PostgreSQL details shared by the hub, the backup and the tracking service: libpq's password
file (from the operator's password file: no password in a URL or a log), a URL's database, and a
database made where it is missing (or a clear error saying how to make it)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse, urlunparse


class DatabaseError(Exception):
    pass


def write_pgpass(database_url: str, password_file: Path, directory: Path, name: str = "pgpass") -> Path:
    """libpq's password file (mode 0600) for the URL's server and user, any of its databases."""
    url = urlparse(database_url)
    esc = lambda v: str(v).replace("\\", "\\\\").replace(":", "\\:")  # noqa: E731 - libpq's escaping
    line = ":".join(esc(v) for v in (url.hostname, url.port or 5432, "*", url.username or "*",
                                     Path(password_file).read_text().strip()))
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    return path


def database_name(database_url: str) -> str:
    return urlparse(database_url).path.strip("/")


def with_database(database_url: str, name: str) -> str:
    """The same server and user, another database."""
    return urlunparse(urlparse(database_url)._replace(path=f"/{name}"))


def ensure_database(database_url: str, password_file: Path | None) -> bool:
    """Make the URL's database where it is missing (the user needs CREATEDB); True if made now.
    Raises DatabaseError naming the database and how an operator makes it."""
    try:
        import psycopg2
        from psycopg2 import errors, sql
    except ImportError:
        raise DatabaseError("psycopg2 is not installed here: PostgreSQL cannot be used") from None
    url = urlparse(database_url)
    name = database_name(database_url)
    password = Path(password_file).read_text().strip() if password_file else None
    connect = dict(host=url.hostname, port=url.port or 5432, user=url.username, password=password, connect_timeout=10)
    try:
        psycopg2.connect(dbname=name, **connect).close()
        return False
    except psycopg2.OperationalError as e:
        if "does not exist" not in str(e):
            raise DatabaseError(f"cannot connect to the database {name} at {url.hostname}:{url.port or 5432} "
                                f"as {url.username}: {str(e).strip()}") from None
    try:
        conn = psycopg2.connect(dbname="postgres", **connect)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return True
    except errors.DuplicateDatabase:
        return False
    except psycopg2.Error as e:
        raise DatabaseError(
            f"the database {name} does not exist at {url.hostname}:{url.port or 5432}, and {url.username} may not "
            f"create it ({str(e).strip()}). Create it: createdb -h {url.hostname} -p {url.port or 5432} "
            f"-O {url.username} {name}") from None
