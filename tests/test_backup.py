"""`mlaas backup` of a running platform and `mlaas restore` into a new state directory, on new
ports, as an operator moving or recovering a platform does: users sign in with the same
passwords, find their files, and the admins' edits and their history are there."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests

from conftest import needs_root
from helpers import (ensure_user, log_mlflow_run, oidc_login, start_platform, start_server, state_root,
                     stop_server, user_token, wait_for_tracking)

pytestmark = [pytest.mark.platform, needs_root]
MLAAS = str(Path(sys.prefix) / "bin" / "mlaas")


def test_a_running_platform_is_backed_up_and_restored_with_files_history_and_quotas():
    a = start_platform("backup-a", data={"enabled": False})
    archive = state_root() / f"backup-{os.getpid()}.tar.gz"
    try:
        ensure_user(a, "keeper", ["ml-users", "quota-team"])
        token = user_token(a, "keeper")
        start_server(a, "keeper", token, {"profile": "small"})
        r = a.api(token).put(f"{a.url}/user/keeper/api/contents/thesis.md",
                             json={"type": "file", "format": "text", "content": "chapter 1"})
        assert r.status_code in (200, 201), r.text
        session, login = oidc_login(a, "admin")
        assert login.status_code == 200
        admin = a.api(user_token(a, "admin"))
        base = f"{a.url}/services/mlaas-admin/api"
        quota = admin.get(f"{base}/quotas/quota-team").json()
        r = admin.put(f"{base}/quotas/quota-team", json={"item": {**quota["item"], "cpu": 3}, "version": quota["version"]})
        assert r.status_code == 200, r.text

        wait_for_tracking(a)  # a run of keeper's group in the experiment tracking
        logged = log_mlflow_run(a, token, "quota-team", "thesis-fits", "fit-1")
        # the hub's SQLite commits go to its write-ahead log (mlaas.sqlite_wal): the backup reads it too
        live = a.platform.settings.hub_dir / "jupyterhub.sqlite"
        with contextlib.closing(sqlite3.connect(f"file:{live}?mode=ro", uri=True)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            # the operators' token (48 random characters) is stored as the hub's own are, not
            # stretched like a password (hubconfig.trust_provided_tokens); it still works (above)
            (hashed,) = db.execute("SELECT t.hashed FROM api_tokens t JOIN services s ON t.service_id = s.id "
                                   "WHERE s.name = 'mlaas-ops'").fetchone()
            assert hashed.split(":")[:2] == ["sha512", "1"], hashed.split(":")[:2]
        assert live.with_name("jupyterhub.sqlite-wal").exists()
        done = subprocess.run([MLAAS, "backup", str(archive), "--homes"], capture_output=True, text=True,
                              env={**os.environ, "MLAAS_CONFIG": str(a.platform.config_file)}, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr  # while the hub and keeper's server run
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600
        with tarfile.open(archive) as tar:
            names = set(tar.getnames())
        assert {"hub/jupyterhub.sqlite", "hub/accounts.sqlite", "secrets/jupyterhub-cookie-secret",
                "profiles/quotas.yaml", "manifest.json"} <= names
        admin_password = a.password("admin")
        stop_server(a, "keeper")
    finally:
        a.platform.stop()

    # new ports and state; the same AAI (the identities are bound to its issuer): the dev IdP again
    idp = a.platform.settings
    b = start_platform("backup-b", data={"enabled": False}, restore_from=archive, oidc={"issuer": idp.oidc.issuer},
                       dev_idp={"port": idp.dev_idp.port, "users_file": str(idp.dev_idp.users_file)})
    try:
        assert b.url != a.url and b.state_dir != a.state_dir
        assert b.password("admin") == admin_password  # the same sign-in
        session, login = oidc_login(b, "admin")
        assert login.status_code == 200
        admin = b.api(user_token(b, "admin"))
        base = f"{b.url}/services/mlaas-admin/api"
        assert admin.get(f"{base}/quotas/quota-team").json()["item"]["cpu"] == 3  # the edit
        history = admin.get(f"{base}/history", params={"kind": "quotas", "key": "quota-team"}).json()["changes"]
        assert history and history[0]["who"] == "admin" and history[0]["after"]["cpu"] == 3
        users = {u["name"]: u for u in b.api().get(f"{b.url}/hub/api/users").json()}
        assert "quota-team" in users["keeper"]["groups"]
        token = user_token(b, "keeper")
        start_server(b, "keeper", token, {"profile": "small"})
        thesis = b.api(token).get(f"{b.url}/user/keeper/api/contents/thesis.md").json()
        assert thesis["content"] == "chapter 1"
        wait_for_tracking(b)  # the group's run is there, through the new platform's tracking service
        r = requests.get(f"{b.url}/services/mlflow/api/2.0/mlflow/runs/get", params={"run_id": logged["run"]},
                         headers={"Authorization": f"Bearer {token}", "X-MLFLOW-WORKSPACE": "quota-team"}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["run"]["data"]["metrics"][0]["value"] == 0.91
        r = b.api(token).put(f"{b.url}/user/keeper/api/contents/thesis.md",  # still hers to write
                             json={"type": "file", "format": "text", "content": "chapter 1, revised"})
        assert r.status_code == 200, r.text
        stop_server(b, "keeper")
    finally:
        b.platform.stop()
        archive.unlink(missing_ok=True)


def test_restore_never_overwrites_a_platform_and_refuses_foreign_archives(tmp_path):
    from mlaas.backup import BackupError, restore
    from mlaas.settings import Settings

    (tmp_path / "state" / "hub").mkdir(parents=True)
    settings = Settings(state_dir=tmp_path / "state", profiles_dir=tmp_path / "profiles")
    with pytest.raises(BackupError, match="is not empty"):
        restore(settings, tmp_path / "none.tar.gz")
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        link = tarfile.TarInfo("homes/x/out")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
        tar.addfile(tarfile.TarInfo("homes/x/out/passwd"))
    fresh = Settings(state_dir=tmp_path / "fresh", profiles_dir=tmp_path / "profiles")
    with pytest.raises(BackupError, match="below a link of the archive"):
        restore(fresh, evil)
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
