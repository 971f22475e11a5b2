"""Experiment tracking per group (issue #18): the real MLflow server behind the platform's tracking
service (mlaas.tracking), the real `mlflow` client in users' kernels, with nothing set by hand.

trk-alice and trk-dave are in the group trk-atlas, trk-bob in trk-cms; alice and bob are also in
ml-users, the group everyone is in (their servers log to their smaller group by default)."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import needs_root
from helpers import (ensure_user, kernel_json, log_mlflow_run, oidc_login, run_in_kernel, start_server, stop_server,
                     user_token, wait_for_tracking)

EXPERIMENT = "higgs-search"

LOG_A_RUN = f"""
import json, os, mlflow
mlflow.set_experiment({EXPERIMENT!r})
with mlflow.start_run() as run:
    mlflow.log_param("learning_rate", 0.01)
    for step in range(5):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.log_text("signal region: 125 GeV", "notes/region.txt")
print(json.dumps({{"run": run.info.run_id, "experiment": run.info.experiment_id,
                  "workspace": os.environ.get("MLFLOW_WORKSPACE"),
                  "set_by_hand": [k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if k in os.environ]}}))
"""


def read_run(run_id: str, workspace: str | None = None) -> str:
    choose = f"os.environ['MLFLOW_WORKSPACE'] = {workspace!r}\n" if workspace else ""
    return f"""
import json, os
{choose}from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
client = MlflowClient()
out = {{"listed": [e.name for e in client.search_experiments()]}}
try:
    run = client.get_run({run_id!r})
    out["params"] = run.data.params
    out["loss"] = [m.value for m in client.get_metric_history({run_id!r}, "loss")]
    out["notes"] = open(client.download_artifacts({run_id!r}, "notes/region.txt", "/tmp")).read()
except MlflowException as e:
    out["read_error"] = str(e)
try:
    client.log_metric({run_id!r}, "loss", 0.0, step=99)
    out["wrote"] = True
except MlflowException as e:
    out["write_error"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def trackers(hub):
    groups = {"trk-alice": ["ml-users", "trk-atlas"], "trk-dave": ["trk-atlas"], "trk-bob": ["ml-users", "trk-cms"]}
    ensure_user(hub, "trk-carol", ["ml-users"])  # (ml-users: everyone; here at least three)
    tokens = {}
    for name, member_of in groups.items():
        ensure_user(hub, name, member_of)
        tokens[name] = user_token(hub, name)
    for name in groups:
        start_server(hub, name, tokens[name], {"profile": "small"})
    wait_for_tracking(hub)
    yield tokens
    for name in tokens:
        stop_server(hub, name)


@pytest.fixture(scope="module")
def alices_run(hub, trackers):
    logged = kernel_json(hub, "trk-alice", trackers["trk-alice"], LOG_A_RUN)
    assert logged["workspace"] == "trk-atlas"  # her team, not the group everyone is in
    assert logged["set_by_hand"] == []
    return logged


def test_a_run_logged_with_no_settings_is_seen_and_extended_by_the_groups_other_member(hub, trackers, alices_run):
    seen = kernel_json(hub, "trk-dave", trackers["trk-dave"], read_run(alices_run["run"]))
    assert EXPERIMENT in seen["listed"]
    assert seen["params"] == {"learning_rate": "0.01"}
    assert seen["loss"] == [1.0, 0.5, 1.0 / 3, 0.25, 0.2]
    assert seen["notes"] == "signal region: 125 GeV"
    assert seen.get("wrote") is True, seen


def test_a_run_started_with_no_experiment_goes_to_the_groups_default_experiment(hub, trackers, alices_run):
    """`mlflow.start_run()` alone: MLflow's own default (experiment 0) is its default workspace's,
    which no group may use; the servers' environment names the workspace's "Default" instead."""
    code = """
import json, mlflow
with mlflow.start_run() as run:
    mlflow.log_metric("loss", 0.5)
print(json.dumps({"experiment": mlflow.get_experiment(run.info.experiment_id).name, "run": run.info.run_id}))
"""
    logged = kernel_json(hub, "trk-dave", trackers["trk-dave"], code)
    assert logged["experiment"] == "Default"
    r = requests.get(f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get", params={"run_id": logged["run"]}, timeout=30,
                     headers={"Authorization": f"Bearer {trackers['trk-alice']}", "X-MLFLOW-WORKSPACE": "trk-atlas"})
    assert r.status_code == 200, r.text  # in the group's workspace: alice reads dave's run


def test_another_group_neither_lists_nor_reads_nor_writes_the_run(hub, trackers, alices_run):
    for workspace in (None, "trk-atlas"):  # its own default, and the other group's named by hand
        seen = kernel_json(hub, "trk-bob", trackers["trk-bob"], read_run(alices_run["run"], workspace))
        assert EXPERIMENT not in seen["listed"]
        assert "params" not in seen and "wrote" not in seen, seen
        for error in (seen["read_error"], seen["write_error"]):
            assert "PERMISSION_DENIED" in error and "trk-cms" in error, error  # names the groups bob may use


def test_the_hubs_admin_sees_every_groups_runs(hub, trackers, alices_run):
    _, login = oidc_login(hub, "admin")  # the AAI's admin (group mlaas-admins), in neither group
    assert login.status_code == 200
    token = user_token(hub, "admin")
    r = requests.get(f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get", params={"run_id": alices_run["run"]},
                     headers={"Authorization": f"Bearer {token}", "X-MLFLOW-WORKSPACE": "trk-atlas"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["run"]["data"]["params"] == [{"key": "learning_rate", "value": "0.01"}]


def test_no_one_reaches_mlflow_without_a_hub_identity_or_around_the_service(hub, trackers, alices_run):
    url = f"{hub.url}/services/mlflow/api/2.0/mlflow/experiments/search"
    assert requests.post(url, json={"max_results": 10}, timeout=30).status_code == 401
    assert requests.post(url, json={"max_results": 10}, headers={"Authorization": "Bearer not-a-token"},
                         timeout=30).status_code == 401
    # a token of the user's that does not carry the service's scope
    limited = hub.api().post(f"{hub.url}/hub/api/users/trk-alice/tokens",
                             json={"scopes": ["read:users:name!user"], "expires_in": 600}).json()["token"]
    r = requests.post(url, json={"max_results": 10}, headers={"Authorization": f"Bearer {limited}"}, timeout=30)
    assert r.status_code in (401, 403), r.text
    # from a user's server, straight to the MLflow server's own port: it wants a password no user has
    port = hub.platform.settings.tracking.mlflow_port
    out = run_in_kernel(hub, "trk-bob", trackers["trk-bob"], f"""
import urllib.request, urllib.error
try:
    urllib.request.urlopen("http://127.0.0.1:{port}/services/mlflow/api/2.0/mlflow/experiments/search?max_results=5")
    print("open")
except urllib.error.HTTPError as e:
    print(e.code)
try:
    open({str(hub.platform.settings.state_dir / "tracking" / "secrets.json")!r}).read()
    print("secrets read")
except PermissionError:
    print("secrets refused")
""")
    assert out["error"] is None, out["error"]
    assert out["stdout"].splitlines() == ["401", "secrets refused"]


def test_a_change_of_the_hubs_groups_reaches_mlflow(hub, trackers, alices_run):
    api = hub.api()
    token = trackers["trk-dave"]
    url = f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get"

    def status() -> int:
        return requests.get(url, params={"run_id": alices_run["run"]}, timeout=30,
                            headers={"Authorization": f"Bearer {token}", "X-MLFLOW-WORKSPACE": "trk-atlas"}).status_code

    assert status() == 200
    api.delete(f"{hub.url}/hub/api/groups/trk-atlas/users", json={"users": ["trk-dave"]}).raise_for_status()
    try:
        deadline = time.monotonic() + 60
        while status() != 403:
            assert time.monotonic() < deadline, "dave still reads the group's run a minute after leaving it"
            time.sleep(2)
    finally:
        api.post(f"{hub.url}/hub/api/groups/trk-atlas/users", json={"users": ["trk-dave"]}).raise_for_status()
    deadline = time.monotonic() + 60
    while status() != 200:
        assert time.monotonic() < deadline, "dave does not read the group's run a minute after rejoining"
        time.sleep(2)



@pytest.mark.browser
def test_browser_the_groups_runs_in_mlflows_ui_through_the_hub(hub, trackers, browser):
    """alice (atlas-ml) sees her group's experiment and run in MLflow's own UI, signed in through
    the hub; bob (not in atlas-ml) signed in the same way does not see it."""
    from conftest import browser_login
    from helpers import ARTIFACTS

    people = {}
    for name in ("alice", "bob"):
        _, login = oidc_login(hub, name)
        assert login.status_code == 200
        people[name] = user_token(hub, name)
    experiment_id = log_mlflow_run(hub, people["alice"], "atlas-ml", "jet-tagging", "gnn-baseline")["experiment"]
    for name, sees in (("alice", True), ("bob", False)):
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        try:
            page = context.new_page()
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"page error: {e}"))
            browser_login(page, hub.url, name, hub.password(name))
            page.goto(f"{hub.url}/services/mlflow/#/experiments/{experiment_id}/runs?workspace=atlas-ml")
            if sees:
                try:  # the run, in the group's experiment
                    page.wait_for_selector("text=gnn-baseline", timeout=60_000)
                except Exception:
                    page.screenshot(path=str(ARTIFACTS / f"40-mlflow-{name}-failed.png"), full_page=True)
                    raise AssertionError("the run did not appear; the page's console: " + "\n".join(console[-20:]))
                assert "jet-tagging" in page.content()
            else:
                page.wait_for_selector("text=Experiments", timeout=60_000)  # MLflow's own page, signed in
                page.wait_for_timeout(5000)  # (what it shows once its requests are answered)
                assert "Permission denied" in page.content()  # MLflow's own answer to another group's experiment
                assert "gnn-baseline" not in page.content()
                assert "jet-tagging" not in page.content()
            page.screenshot(path=str(ARTIFACTS / f"40-mlflow-{name}.png"), full_page=True)
            assert page.url.startswith(f"{hub.url}/services/mlflow/")  # signed in by the hub, not sent away
        finally:
            context.close()


def test_a_groups_artifact_limit_refuses_the_upload_past_it_and_admins_see_the_use(hub, trackers):
    """trk-cms may keep 64 KiB of artifacts (tests/fixtures/profiles/quotas.yaml)."""
    out = kernel_json(hub, "trk-bob", trackers["trk-bob"], """
import json, mlflow
mlflow.set_experiment("limits")
result = {}
with mlflow.start_run():
    mlflow.log_text("x" * 40_000, "first.txt")
    try:
        mlflow.log_text("y" * 40_000, "second.txt")
        result["second"] = "stored"
    except Exception as e:
        result["second"] = str(e)
    mlflow.log_text("z" * 1_000, "small.txt")  # what still fits
    result["listed"] = sorted(a.path for a in mlflow.MlflowClient().list_artifacts(mlflow.active_run().info.run_id))
print(json.dumps(result))
""")
    assert "trk-cms" in out["second"] and "64 KiB" in out["second"] and "limit" in out["second"], out
    assert out["listed"] == ["first.txt", "small.txt"]
    _, login = oidc_login(hub, "admin")
    assert login.status_code == 200
    usage = hub.api(user_token(hub, "admin")).get(f"{hub.url}/hub/api/mlaas/usage", timeout=30).json()["tracking"]
    cms = next(t for t in usage if t["workspace"] == "trk-cms")
    assert cms["group"] == "trk-cms" and cms["limit_bytes"] == 64 * 1024
    assert 41_000 <= cms["artifact_bytes"] < 64 * 1024


@needs_root
def test_a_project_groups_artifacts_are_on_its_project_storage_for_members_only(hub, trackers):
    """atlas-ml has a project (tests/fixtures/profiles/projects.yaml): a member's logged artifact is
    kept in the project's storage, where members read it (`~/projects/atlas-ml/mlflow-artifacts`)
    and only MLflow's account writes; a user outside the group reaches neither the file nor the
    run."""
    ensure_user(hub, "trk-proj", ["atlas-ml"])
    token = user_token(hub, "trk-proj")
    start_server(hub, "trk-proj", token, {"profile": "small"})
    try:
        logged = kernel_json(hub, "trk-proj", token, """
import json, os, mlflow
with mlflow.start_run() as run:
    mlflow.log_text("kept with the project", "notes/project.txt")
base = os.path.expanduser("~/projects/atlas-ml/mlflow-artifacts")
found = [os.path.join(d, f) for d, _, files in os.walk(base) for f in files if f == "project.txt"]
try:
    open(os.path.join(base, "mine.txt"), "w")
    wrote = True
except PermissionError:
    wrote = False
print(json.dumps({"workspace": os.environ["MLFLOW_WORKSPACE"], "run": run.info.run_id,
                  "found": [(p, open(p).read()) for p in found if run.info.run_id in p], "wrote": wrote}))
""")
    finally:
        stop_server(hub, "trk-proj")
    assert logged["workspace"] == "atlas-ml"
    assert [text for _, text in logged["found"]] == ["kept with the project"], logged  # read from the project
    assert logged["wrote"] is False  # only MLflow writes there
    stored = list((hub.state_dir / "projects" / "atlas-ml" / "mlflow-artifacts").rglob("project.txt"))
    assert [p for p in stored if logged["run"] in str(p)], stored
    directory = hub.state_dir / "projects" / "atlas-ml" / "mlflow-artifacts"
    assert oct(directory.stat().st_mode & 0o7777) == "0o2750"
    assert oct((hub.state_dir / "projects" / "atlas-ml").stat().st_mode & 0o7777) == "0o2770"  # unchanged
    outsider = kernel_json(hub, "trk-bob", trackers["trk-bob"], f"""
import json
try:
    open({str(stored[0])!r}).read()
    out = "read"
except PermissionError:
    out = "refused"
print(json.dumps(out))
""")
    assert outsider == "refused"

