"""The MLflow server the tracking service runs: its program, configuration and state.

State (`<state>/tracking`):
  secrets.json         MLflow's admin password, its session key, each user's MLflow password
                       (the service's alone, 0600)
  mlflow/              MLflow's (its system account's alone where the hub is root, 0700):
    mlflow.db          experiments, runs, metrics, models, workspaces (SQLite)
    auth.db            MLflow's users, roles and grants (the sync writes them)
    artifacts/         artifacts, one directory per workspace (MLflow's `workspaces/<name>/...`)
    mlflow.log         the server's log
    pgpass             with the databases on PostgreSQL: libpq's password file (0600)

The two databases are on PostgreSQL where the platform's are (`databases`): `tracking.database_url`,
else the hub's server with the databases `<hub database>_mlflow` and `<hub database>_mlflow_auth`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..postgres import database_name, with_database
from ..settings import Settings

PREFIX = "/services/mlflow"
ADMIN_USER = "mlaas-admin"  # MLflow's admin; no hub user may have this name in MLflow (see service)


def mlflow_program(s: Settings) -> Path | None:
    """The `mlflow` program: configured, else the virtual environment beside the hub's
    (`make install` makes `<venv>-mlflow`), else the PATH's. None where there is none."""
    if s.tracking.mlflow_command:
        return s.tracking.mlflow_command if os.access(s.tracking.mlflow_command, os.X_OK) else None
    beside = Path(f"{sys.prefix}-mlflow") / "bin" / "mlflow"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("mlflow")
    return Path(found) if found else None


def state_dir(s: Settings) -> Path:
    return s.state_dir / "tracking"


@dataclass(frozen=True)
class Databases:
    """MLflow's two databases: runs and experiments (its backend store), and its auth app's users
    and grants; `password_file` (PostgreSQL): the operator's password file of their user."""

    tracking: str
    auth: str
    password_file: Path | None = None

    @property
    def postgresql(self) -> bool:
        return self.tracking.startswith("postgresql")

    @staticmethod
    def for_mlflow(url: str) -> str:
        """The URL as MLflow's SQLAlchemy takes it: with the driver installed beside it (SQLAlchemy's
        default for postgresql:// is psycopg 3)."""
        return url.replace("postgresql://", "postgresql+psycopg2://", 1)


def databases(s: Settings) -> Databases:
    """On the platform's database choice: SQLite in MLflow's directory by default; PostgreSQL where
    `tracking.database_url` says, or the hub's server where the hub is on PostgreSQL."""
    if s.tracking.database_url:
        url, password = s.tracking.database_url, s.tracking.database_password_file or s.database_password_file
    elif s.database_url:
        url = with_database(s.database_url, database_name(s.database_url) + "_mlflow")
        password = s.database_password_file
    else:
        data = state_dir(s) / "mlflow"
        return Databases(f"sqlite:///{data / 'mlflow.db'}", f"sqlite:///{data / 'auth.db'}")
    return Databases(url, with_database(url, database_name(url) + "_auth"), password)


class Secrets:
    """secrets.json: made on first start, kept across restarts (the users' MLflow passwords are
    never shown to anyone; only this service uses them)."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists():
            self.data = json.loads(path.read_text())
        else:
            self.data = {"admin_password": secrets.token_urlsafe(32), "session_key": secrets.token_urlsafe(32),
                         "users": {}}
            self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)

    def password(self, username: str) -> tuple[str, bool]:
        """The user's MLflow password, and whether it was made just now."""
        users = self.data["users"]
        if username in users:
            return users[username], False
        users[username] = secrets.token_urlsafe(24)
        self.save()
        return users[username], True


def auth_config(db: Databases) -> str:
    """MLflow's auth app: nobody may do anything without a grant; no default-workspace access."""
    return "\n".join([
        "[mlflow]",
        "default_permission = NO_PERMISSIONS",
        f"database_uri = {db.for_mlflow(db.auth)}",
        f"admin_username = {ADMIN_USER}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        # a password check is PBKDF2 (about 0.2 s of CPU here): once per user and password every
        # 5 minutes, not per request (only this service sets passwords, through MLflow's API,
        # which drops the cached check at once)
        "auth_cache_ttl_seconds = 300",
        "auth_cache_max_size = 10000",
        "",
    ])


def command(program: Path, state: Path, port: int, db: Databases) -> list[str]:
    return [
        str(program), "server", "--app-name", "basic-auth", "--enable-workspaces",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", db.for_mlflow(db.tracking),
        "--serve-artifacts", "--artifacts-destination", str(state / "artifacts"),
        "--static-prefix", PREFIX,
    ]


def environment(program: Path, state: Path, keys: Secrets, db: Databases) -> dict[str, str]:
    return {
        **({"PGPASSFILE": str(state / "pgpass")} if db.password_file else {}),
        "PATH": f"{program.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(state),
        "LANG": "C.UTF-8",
        "MLFLOW_AUTH_CONFIG_PATH": str(state / "auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": keys.data["admin_password"],  # read only when auth.db is new
        "MLFLOW_FLASK_SERVER_SECRET_KEY": keys.data["session_key"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # no job workers (seven processes for GenAI scorers and prompt optimisation; training runs
        # need none of them)
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false",
        "DO_NOT_TRACK": "true",
    }
