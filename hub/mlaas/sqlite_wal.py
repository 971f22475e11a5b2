"""The hub's SQLite database in write-ahead-log mode.

With SQLite's default rollback journal every commit waits for the journal and the database file to
reach the disk. JupyterHub commits several times per spawn on its event loop, so each of those
waits delays every request: on the benchmark's hub (200 servers, 1,000 nodes) commits held the loop
for over 50 ms dozens of times (mlaas.loop_watch). In WAL mode with `synchronous=NORMAL` a commit
appends to the log without waiting for the disk; the database stays consistent after a crash or
power loss, which may take back the last commits only.

Applies to every SQLite database the hub opens through SQLAlchemy (JupyterHub's own, on one
machine and on a Kubernetes volume: the hub is its one process). `mlaas backup` copies it with
SQLite's online backup, which reads the log too.
"""

from __future__ import annotations

import sqlite3
from typing import Any

_installed: list[bool] = []


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    cursor = dbapi_connection.cursor()
    try:
        if cursor.execute("PRAGMA database_list").fetchone()[2]:  # a file, not an in-memory database
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def install() -> None:
    """For every SQLAlchemy connection this process opens from now on (once per process)."""
    if _installed:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "connect", _on_connect)
    _installed.append(True)
