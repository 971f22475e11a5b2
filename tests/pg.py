"""A real PostgreSQL server for tests (Debian's package): its own data directory and port,
password authentication over TCP, a database and user for the hub."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

from helpers import free_port
from mlaas.backup import postgresql_tool


def pg_bin(name: str) -> str:
    found = postgresql_tool(name)
    if found is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql); .ci/run installs it")
    return found


class PostgreSQL:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.data, self.socket_dir = root / "data", root / "run"
        self.password = secrets.token_hex(16)

    def _as_postgres(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True,
                              check=check, input=input)

    def start(self) -> PostgreSQL:
        shutil.rmtree(self.root, ignore_errors=True)
        self.socket_dir.mkdir(parents=True)
        shutil.chown(self.root, "postgres", "postgres")
        shutil.chown(self.socket_dir, "postgres", "postgres")
        self._as_postgres(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=peer",
                          "--auth-host=scram-sha-256", "-E", "UTF8")
        self._as_postgres(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-o",
                          f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1", "start")
        self.sql(f"CREATE ROLE mlaas LOGIN PASSWORD '{self.password}'")
        self.sql("CREATE DATABASE mlaas OWNER mlaas")
        return self

    def sql(self, statement: str, database: str = "postgres") -> str:
        r = self._as_postgres(pg_bin("psql"), "-h", str(self.socket_dir), "-p", str(self.port), "-d", database,
                              "-Atc", statement)
        return r.stdout.strip()

    @property
    def url(self) -> str:
        return f"postgresql://mlaas@127.0.0.1:{self.port}/mlaas"

    def stop(self) -> None:
        self._as_postgres(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
