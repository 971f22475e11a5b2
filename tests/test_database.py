"""The hub on a real PostgreSQL server (Debian's package, started here) instead of the embedded
SQLite: users, groups, tokens and servers live there and survive a restart of the platform; the
password comes from a file and reaches no log. Experiment tracking follows: MLflow's databases are
on the same server (`<hub database>_mlflow`, `_mlflow_auth`), in the backup, and restored."""

from __future__ import annotations

import os

import pytest
import requests
from cluster.pod_runner import wait_until

from conftest import needs_root
from helpers import (ensure_user, kernel_json, log_mlflow_run, start_platform, start_server, state_root, stop_server,
                     user_token, wait_for_tracking)
from mlaas.launcher import Platform
from mlaas.settings import Settings, load_settings
from pg import PostgreSQL

pytestmark = [pytest.mark.platform, needs_root]


@pytest.fixture(scope="module")
def postgres():
    server = PostgreSQL(state_root() / f"postgres-{os.getpid()}").start()
    yield server
    server.stop()


def test_the_hub_keeps_its_state_in_postgresql_across_a_restart(postgres, tmp_path):
    password = tmp_path / "db-password"
    password.write_text(postgres.password + "\n")
    password.chmod(0o600)
    hub = start_platform("postgres", data={"enabled": False}, database_url=postgres.url,
                         database_password_file=str(password))
    try:
        assert not (hub.state_dir / "hub" / "jupyterhub.sqlite").exists()  # no SQLite beside it
        ensure_user(hub, "pg-user", ["ml-users"])
        token = user_token(hub, "pg-user")
        # MLflow's databases: the hub's user may not make them, and the log says how (the service retries)
        assert wait_until(lambda: "createdb -h 127.0.0.1" in hub.hub_log(), 60), hub.hub_log()[-3000:]
        assert "-O mlaas mlaas_mlflow" in hub.hub_log()
        for name in ("mlaas_mlflow", "mlaas_mlflow_auth"):  # as the operator does
            postgres.sql(f"CREATE DATABASE {name} OWNER mlaas")
        wait_for_tracking(hub, timeout=150)
        run = log_mlflow_run(hub, token, "ml-users", "pg-experiment", "pg-run")
        assert postgres.sql("SELECT name FROM experiments WHERE name = 'pg-experiment'", "mlaas_mlflow") == "pg-experiment"
        assert postgres.sql("SELECT username FROM users WHERE username = 'pg-user'", "mlaas_mlflow_auth") == "pg-user"
        assert not list((hub.state_dir / "tracking").rglob("*.db"))  # no SQLite for MLflow either
        start_server(hub, "pg-user", token, {"profile": "small"})
        assert postgres.sql("SELECT name FROM users WHERE name = 'pg-user'", "mlaas") == "pg-user"
        stop_server(hub, "pg-user")
        hub.platform.stop()

        # the same platform again: its users and tokens are the database's
        hub.platform = Platform(load_settings(hub.platform.config_file, environ={}),
                                config_file=hub.platform.config_file, log_dir=hub.log_dir)
        hub.platform.start(timeout=120)
        model = hub.api().get(f"{hub.url}/hub/api/users/pg-user").json()
        assert "ml-users" in model["groups"]
        start_server(hub, "pg-user", token, {"profile": "small"})  # the token made before the restart
        assert kernel_json(hub, "pg-user", token, "import json; print(json.dumps(1 + 1))") == 2
        stop_server(hub, "pg-user")
        wait_for_tracking(hub)
        assert mlflow_run(hub, token, "ml-users", run["run"]).status_code == 200  # the run is the database's
        assert postgres.password not in hub.hub_log()
    finally:
        hub.platform.stop()


def test_a_platform_on_postgresql_is_backed_up_and_restored_into_a_new_database(postgres, tmp_path):
    """`mlaas backup` takes a pg_dump of the hub's database with the rest; `mlaas restore` loads it
    into another, empty database, and the restored platform knows the users and their tokens."""
    import subprocess
    import sys
    from pathlib import Path

    password = tmp_path / "db-password"
    password.write_text(postgres.password)
    password.chmod(0o600)
    postgres.sql("ALTER ROLE mlaas CREATEDB")  # here the hub's user may make MLflow's databases itself
    postgres.sql("CREATE DATABASE mlaas_backup OWNER mlaas")  # a platform of its own (MLflow's: made by it)
    a = start_platform("pg-backup-a", data={"enabled": False}, database_url=postgres.url + "_backup",
                       database_password_file=str(password))
    archive = tmp_path / "backup.tar.gz"
    try:
        ensure_user(a, "pg-kept", ["ml-users"])
        token = user_token(a, "pg-kept")
        wait_for_tracking(a)
        run = log_mlflow_run(a, token, "ml-users", "pg-kept-experiment", "pg-kept-run")
        r = subprocess.run([str(Path(sys.prefix) / "bin" / "mlaas"), "backup", str(archive)], capture_output=True,
                           text=True, env={**os.environ, "MLAAS_CONFIG": str(a.platform.config_file)}, timeout=300)
        assert r.returncode == 0 and "database (pg_dump)" in r.stdout, r.stdout + r.stderr
        assert "tracking database mlaas_backup_mlflow (pg_dump)" in r.stdout, r.stdout
    finally:
        a.platform.stop()
    postgres.sql("CREATE DATABASE mlaas_restored OWNER mlaas")
    idp = a.platform.settings
    b = start_platform("pg-backup-b", data={"enabled": False}, restore_from=archive,
                       database_url=postgres.url.rsplit("/", 1)[0] + "/mlaas_restored",
                       database_password_file=str(password), oidc={"issuer": idp.oidc.issuer},
                       dev_idp={"port": idp.dev_idp.port, "users_file": str(idp.dev_idp.users_file)})
    try:
        assert postgres.sql("SELECT name FROM users WHERE name = 'pg-kept'", "mlaas_restored") == "pg-kept"
        assert b.api(token).get(f"{b.url}/hub/api/user").json()["name"] == "pg-kept"  # her token still works
        # MLflow's databases restored into new ones beside the new hub database (made by the restore)
        assert postgres.sql("SELECT name FROM experiments WHERE name = 'pg-kept-experiment'",
                            "mlaas_restored_mlflow") == "pg-kept-experiment"
        wait_for_tracking(b)
        assert mlflow_run(b, token, "ml-users", run["run"]).status_code == 200
    finally:
        b.platform.stop()


def mlflow_run(hub, token: str, workspace: str, run_id: str):
    return requests.get(f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=60,
                        headers={"Authorization": f"Bearer {token}", "X-MLFLOW-WORKSPACE": workspace})


def test_database_settings_name_the_mistake():
    with pytest.raises(ValueError, match="put the password in database_password_file"):
        Settings(database_url="postgresql://mlaas:secret@db:5432/mlaas")
    with pytest.raises(ValueError, match="is not postgresql://user@host:port/dbname"):
        Settings(database_url="mysql://mlaas@db/mlaas")
    with pytest.raises(ValueError, match="tracking.database_url"):
        Settings(tracking={"database_url": "postgresql://mlaas:secret@db:5432/mlflow"})
