"""Dask Gateway from users' servers on the real platform: the gateway runs as a hub service,
`Gateway()` works with no arguments inside a server, a real model is trained on a 2-worker
cluster with data read through the site cache, and users' clusters stay theirs."""

from __future__ import annotations

import re
import time

import pytest
import requests

from conftest import needs_root
from helpers import ensure_user, kernel_json, run_in_kernel, start_server, stop_server, user_token

TRAIN = """
import json, joblib, pandas
from dask_gateway import Gateway
from mlaas import data
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

gateway = Gateway()
cluster = gateway.new_cluster(shutdown_on_close=False)  # outlives this kernel; stops with the server
cluster.scale(2)
client = cluster.get_client()
client.wait_for_workers(2, timeout=180)

def rows_on_worker():
    import pandas
    from mlaas import data
    return len(pandas.read_parquet(data.open("/store/demo/events.parquet")))

def executed(dask_worker):
    return dask_worker.state.executed_count

before = sum(client.run(executed).values())
df = pandas.read_parquet(data.open("/store/demo/events.parquet"))
X, y = df[["pt", "eta", "mass", "njets"]], df["label"]
X_train, X_test, y_train, y_test = train_test_split(X, y, random_state=0)
with joblib.parallel_backend("dask"):
    model = RandomForestClassifier(n_estimators=40, n_jobs=-1, random_state=0).fit(X_train, y_train)
workers = client.scheduler_info()["workers"]
print(json.dumps({
    "cluster": cluster.name,
    "workers": len(workers),
    "tasks_run_on_workers": sum(client.run(executed).values()) - before,
    "accuracy": model.score(X_test, y_test),
    "rows_read_on_a_worker": client.submit(rows_on_worker, pure=False).result(),
}))
"""


@pytest.fixture(scope="module")
def dask_users(hub):
    tokens = {}
    for name in ("dask-ann", "dask-ben"):
        ensure_user(hub, name, ["ml-users", "dask-testers"])
        tokens[name] = user_token(hub, name)
        start_server(hub, name, tokens[name], {"profile": "dask-notebook"})
    yield tokens
    for name in tokens:
        stop_server(hub, name)


def gateway_api(hub, token: str, path: str = "", method: str = "GET") -> requests.Response:
    return requests.request(method, f"{hub.url}/services/dask-gateway/api/v1/clusters/{path}",
                            headers={"Authorization": f"jupyterhub {token}"}, timeout=30,
                            json={"cluster_options": {}} if method == "POST" else None)


def test_train_a_model_on_a_two_worker_cluster_from_a_users_server(hub, dask_users):
    result = kernel_json(hub, "dask-ann", dask_users["dask-ann"], TRAIN)
    assert result["workers"] == 2
    assert result["accuracy"] > 0.8  # the demo data's classes are well separated
    assert result["tasks_run_on_workers"] >= 2  # the forest was fitted by the workers, not in the kernel
    assert result["rows_read_on_a_worker"] == 20_000  # workers read through the cache too
    clusters = gateway_api(hub, dask_users["dask-ann"]).json()
    assert list(clusters) == [result["cluster"]]


def test_dask_reads_parquet_on_the_workers_through_the_cache(hub, dask_users):
    """The documented path, `dask.dataframe.read_parquet(data.url(...))`: the workers open the file
    at the site cache (Dask asks the server for the file's checksum, which the cache forwards to
    the origin) and the rows are counted there."""
    (name,) = gateway_api(hub, dask_users["dask-ann"]).json()
    result = kernel_json(hub, "dask-ann", dask_users["dask-ann"], f"""
import json
import dask.dataframe as dd
from dask_gateway import Gateway
from mlaas import data
client = Gateway().connect({name!r}).get_client()
url = data.url("/store/demo/events.parquet")
frame = dd.read_parquet(url)
def executed(dask_worker):
    return dask_worker.state.executed_count
before = sum(client.run(executed).values())
rows = int(frame.map_partitions(len).sum().compute())
signal = int(frame["label"].sum().compute())
print(json.dumps({{"url": url, "rows": rows, "signal": signal, "tasks": sum(client.run(executed).values()) - before}}))
""")
    assert result["rows"] == 20_000 and 0 < result["signal"] < 20_000, result
    assert result["tasks"] >= 2  # computed by the workers
    cache_port = hub.platform.settings.data.origins[0].cache_port
    assert result["url"].startswith(f"root://127.0.0.1:{cache_port}//store/demo/"), result["url"]


def test_a_laptop_reaches_its_cluster_with_the_documented_proxy_address(hub):
    """The client outside any server (a process of this test stands in for a laptop), configured
    as docs/data-and-dask.md says: the API at the hub's address, the scheduler at proxy_address."""
    import subprocess
    import sys

    ensure_user(hub, "dask-laptop", ["ml-users"])
    script = f"""
from dask_gateway import Gateway
from dask_gateway.auth import JupyterHubAuth
gateway = Gateway(address={hub.url + "/services/dask-gateway"!r},
                  proxy_address="gateway://127.0.0.1:{hub.platform.settings.dask_gateway.tcp_port}",
                  auth=JupyterHubAuth(api_token={user_token(hub, "dask-laptop")!r}))
with gateway.new_cluster() as cluster:
    cluster.scale(1)
    with cluster.get_client() as client:
        client.wait_for_workers(1, timeout=120)
        print("result", client.submit(lambda x: x * 7, 6).result(timeout=60))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "result 42" in r.stdout, r.stdout + r.stderr[-3000:]


def test_users_cannot_see_or_stop_each_others_clusters(hub, dask_users):
    (ann_cluster,) = gateway_api(hub, dask_users["dask-ann"]).json()
    assert gateway_api(hub, dask_users["dask-ben"]).json() == {}
    assert gateway_api(hub, dask_users["dask-ben"], ann_cluster).status_code == 403
    assert gateway_api(hub, dask_users["dask-ben"], ann_cluster, "DELETE").status_code == 403
    assert gateway_api(hub, dask_users["dask-ann"], ann_cluster).json()["status"] == "RUNNING"


def test_tokens_without_the_gateway_scope_are_refused(hub, dask_users):
    r = hub.api().post(f"{hub.url}/hub/api/users/dask-ben/tokens", json={"scopes": ["read:users:name!user"]})
    narrow = r.json()["token"]
    assert gateway_api(hub, narrow).status_code in (401, 403)


def test_limits_are_refused_with_the_limit_and_the_use(hub, dask_users):
    out = run_in_kernel(hub, "dask-ann", dask_users["dask-ann"], """
from dask_gateway import Gateway
g = Gateway()
(report,) = g.list_clusters()
cluster = g.connect(report.name)
try:
    cluster.scale(3)
    print("SCALE: allowed")
except Exception as e:
    print("SCALE:", e)
try:
    g.new_cluster()
    print("NEW: allowed")
except Exception as e:
    print("NEW:", e)
""")
    assert out["error"] is None, out
    text = out["stdout"]
    assert (
        "SCALE: Scale refused: user dask-ann may use 2 worker cores in Dask clusters; other clusters use "
        "0 worker cores (none), so cluster" in text
    )
    assert "can have at most 2 workers of 1 worker cores each, not 3." in text
    assert f"NEW: New Dask cluster refused: user dask-ann may have 1 Dask cluster(s) and has 1: {report_name(hub, dask_users)}" in text


def report_name(hub, dask_users) -> str:
    (name,) = gateway_api(hub, dask_users["dask-ann"]).json()
    return name


def test_clusters_stop_with_the_server_that_made_them(hub, dask_users):
    assert gateway_api(hub, dask_users["dask-ann"]).json() != {}
    stop_server(hub, "dask-ann")
    remaining = gateway_api(hub, dask_users["dask-ann"], "?status=running,pending").json()
    assert remaining == {}


def test_gpu_workers_only_for_users_entitled_to_gpus():
    """Options are built from the profile model: the GPU choice appears only for users whose
    groups may start a GPU or MIG profile, and this one-machine backend refuses GPU workers."""
    from pathlib import Path

    from mlaas.dask_gateway import cluster_options_for
    from mlaas.profiles import load_profile_dir

    shipped = load_profile_dir(Path(__file__).resolve().parents[1] / "spawner_profiles")
    cpu_only = shipped.__class__(tuple(p for p in shipped.profiles if not p.needs_accelerator), {}, (), shipped.dask)
    names = lambda options: [f.field for f in options.fields]  # noqa: E731
    assert names(cluster_options_for(shipped, ["atlas-ml"], {})) == ["worker_cores", "worker_memory", "worker_gpus"]
    assert names(cluster_options_for(cpu_only, ["ml-users"], {})) == ["worker_cores", "worker_memory"]
    options = cluster_options_for(shipped, ["atlas-ml"], {"MLAAS_XCACHE": "{}"})
    overrides = options.get_configuration(options.parse_options({"worker_cores": "2", "worker_memory": "4Gi"}), None)
    assert overrides["worker_cores"] == 2 and overrides["worker_memory"] == 4 * 2**30
    assert overrides["environment"] == {"MLAAS_XCACHE": "{}"}
    with pytest.raises(Exception, match="GPU workers need the Kubernetes backend"):
        options.get_configuration(options.parse_options({"worker_gpus": "1"}), None)
    with pytest.raises(Exception):
        cluster_options_for(cpu_only, ["ml-users"], {}).parse_options({"worker_gpus": "1"})


def test_the_example_notebook_runs_in_a_users_server(hub, dask_users):
    """docs/examples/train-with-dask.ipynb, uploaded to a server and executed there (nbclient)."""
    import json
    from pathlib import Path

    notebook = json.loads((Path(__file__).resolve().parents[1] / "docs" / "examples" / "train-with-dask.ipynb").read_text())
    r = hub.api(dask_users["dask-ben"]).put(
        f"{hub.url}/user/dask-ben/api/contents/train-with-dask.ipynb",
        json={"type": "notebook", "format": "json", "content": notebook}, timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    out = run_in_kernel(hub, "dask-ben", dask_users["dask-ben"], """
import json, nbclient, nbformat
nb = nbformat.read("train-with-dask.ipynb", as_version=4)
nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if o.get("output_type") == "stream")
print(json.dumps({"stdout": text}))
""", timeout=300)
    assert out["error"] is None, out["error"]
    printed = json.loads(out["stdout"].strip().splitlines()[-1])["stdout"]
    assert "//store/demo/events.parquet" in printed and "test accuracy: 0." in printed
    assert gateway_api(hub, dask_users["dask-ben"]).json() == {}  # the notebook shut its cluster down
    # the run it recorded, in dask-ben's group's workspace: its parameters, accuracy and model
    logged = re.search(r"logged run (\w+) in the workspace (\S+)", printed)
    assert logged and logged.group(2) == "dask-testers", printed
    mlflow_api = requests.Session()
    mlflow_api.headers.update({"Authorization": f"Bearer {dask_users['dask-ben']}", "X-MLFLOW-WORKSPACE": "dask-testers"})
    run = mlflow_api.get(f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get", params={"run_id": logged.group(1)},
                         timeout=30).json()["run"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["n_estimators"] == "50"
    assert run["data"]["metrics"][0]["key"] == "test_accuracy" and run["data"]["metrics"][0]["value"] > 0.8
    models = mlflow_api.post(f"{hub.url}/services/mlflow/api/2.0/mlflow/logged-models/search", timeout=30,
                             json={"experiment_ids": [run["info"]["experiment_id"]]})
    assert models.status_code == 200, models.text
    assert [(m["info"]["name"], m["info"]["source_run_id"]) for m in models.json()["models"]] == [("model", logged.group(1))]


def _gateway_pid(hub) -> int:
    """The dask-gateway-server of this platform (it carries the platform's MLAAS_CONFIG)."""
    from pathlib import Path

    marker = f"MLAAS_CONFIG={hub.platform.config_file}".encode() + b"\0"
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"dask-gateway-server" in (entry / "cmdline").read_bytes() \
                    and marker in (entry / "environ").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise AssertionError("the platform's dask-gateway-server is not running")


@needs_root
def test_dask_tasks_run_as_their_owner_and_cannot_reach_the_gateway_or_other_clusters(hub, dask_users):
    """A task on ben's worker tries the gateway's environment (its hub token) and memory, and the
    TLS key of ann's cluster: each is refused, and the worker runs as ben's own account."""
    created = gateway_api(hub, dask_users["dask-ann"], "", "POST")  # ann's cluster, started by REST
    assert created.status_code == 201, created.text
    ann_cluster = created.json()["name"]
    try:
        victim_key = hub.state_dir / "dask-gateway" / "clusters" / ann_cluster / ".certs" / "dask.pem"
        deadline = time.monotonic() + 30
        while not victim_key.exists():
            assert time.monotonic() < deadline, "ann's cluster did not start"
            time.sleep(0.2)
        code = PROBE.replace("__GW__", str(_gateway_pid(hub))).replace("__KEY__", repr(str(victim_key)))
        result = kernel_json(hub, "dask-ben", dask_users["dask-ben"], code)
    finally:
        gateway_api(hub, dask_users["dask-ann"], ann_cluster, "DELETE")
    assert result["worker_uid"] == result["kernel_uid"] != 0  # ben's account, as his server
    assert result["environ"] == "PermissionError"
    assert result["mem"] == "PermissionError"
    assert result["key"] == "PermissionError"
    assert result["clusters"] == "PermissionError"


PROBE = """
import json, os
from dask_gateway import Gateway
def probe(gw_pid, key):
    import os
    def attempt(fn):
        try:
            return "allowed: " + repr(fn())[:60]
        except Exception as e:
            return type(e).__name__
    return {"worker_uid": os.getuid(),
            "environ": attempt(lambda: open(f"/proc/{gw_pid}/environ", "rb").read()),
            "mem": attempt(lambda: open(f"/proc/{gw_pid}/mem", "rb").read(1)),
            "key": attempt(lambda: open(key, "rb").read()),
            "clusters": attempt(lambda: os.listdir(os.path.dirname(os.path.dirname(os.path.dirname(key)))))}
with Gateway().new_cluster() as cluster:
    cluster.scale(1)
    client = cluster.get_client()
    client.wait_for_workers(1, timeout=120)
    found = client.submit(probe, __GW__, __KEY__, pure=False).result()
print(json.dumps({"kernel_uid": os.getuid(), **found}))
"""


def test_a_project_servers_token_counts_against_its_groups_dask_quota(hub):
    """atlas-ml may have one Dask cluster (tests/fixtures/profiles/quotas.yaml); a member holds it.
    The project's own identity (project-atlas-ml, whose servers' tokens create clusters) is refused."""
    ensure_user(hub, "dq-member", ["ml-users", "atlas-ml"])
    member = user_token(hub, "dq-member")
    deadline = time.monotonic() + 15
    while hub.api().get(f"{hub.url}/hub/api/users/project-atlas-ml").status_code != 200:
        assert time.monotonic() < deadline, "the project's hub user was not created"
        time.sleep(0.3)
    project = user_token(hub, "project-atlas-ml")
    held = gateway_api(hub, member, "", "POST")
    assert held.status_code == 201, held.text
    try:
        refused = gateway_api(hub, project, "", "POST")
        assert refused.status_code == 422
        assert "group atlas-ml may have 1 Dask cluster(s) and has 1" in refused.text
    finally:
        gateway_api(hub, member, held.json()["name"], "DELETE")


def test_bogus_credentials_at_the_gateway_are_401(hub):
    url = f"{hub.url}/services/dask-gateway/api/v1/clusters/"
    for header in ("jupyterhub not-a-token", "jupyterhub", "bogus", "jupyterhub a b", "token abc"):
        r = requests.get(url, headers={"Authorization": header}, timeout=30)
        assert r.status_code == 401, (header, r.status_code, r.text[:200])
