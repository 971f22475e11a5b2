"""The platform's metrics, scraped by a real Prometheus (Debian's package) from a running platform
with real servers, with the chart's alert rules loaded (and checked by promtool) and every query
of the chart's Grafana dashboards run against it.

Simulated: the GPU inventory and its use (tests/fixtures/inventory-a100-mig.yaml with a `usage:`
the test writes: no GPU here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from helpers import FIXTURES, ensure_user, error_message, request_server, start_platform, start_server, state_root, \
    stop_server, user_token
from prom import Prometheus

pytestmark = pytest.mark.platform
CHART_FILES = Path(__file__).resolve().parents[1] / "charts" / "mlaas-hub" / "files"
GPU = "GPU-11111111-aaaa-bbbb-cccc-000000000001"
FAMILIES = ["mlaas_servers", "mlaas_accelerators_held", "mlaas_group_accelerators_held", "mlaas_quota_used",
            "mlaas_quota_limit", "mlaas_profile_free", "mlaas_profile_total", "mlaas_server_gpu_utilization_percent",
            "mlaas_server_gpu_memory_used_bytes", "mlaas_spawn_refusals_total", "mlaas_gpu_processes_outside_assignment"]
KUBERNETES_ONLY = {"mlaas_dask_cluster_gpu_utilization_percent", "mlaas_dask_cluster_gpu_memory_used_bytes"}


@pytest.fixture(scope="module")
def platform():
    root = state_root() / "metrics-run"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    inventory = yaml.safe_load((FIXTURES / "inventory-a100-mig.yaml").read_text())
    # and a process of no server on the GPU (this test's own): outside any assignment
    inventory["usage"] = {GPU: {"utilization": 55, "memory_used": "2Gi", "pids": [os.getpid()]}}
    (root / "inventory.yaml").write_text(yaml.safe_dump(inventory))
    token = root / "metrics-token"
    token.write_text("metrics-" + "5" * 40)
    token.chmod(0o600)
    hub = start_platform("metrics", gpu_inventory=str(root / "inventory.yaml"), metrics_token_file=str(token),
                         tracking={"enabled": False})
    yield {"hub": hub, "root": root, "token": token}
    hub.platform.stop()


@pytest.fixture(scope="module")
def prometheus(platform):
    root, hub = platform["root"], platform["hub"]
    rules = root / "alerts.yaml"
    shutil.copy(CHART_FILES / "alerts.yaml", rules)
    prom = Prometheus(root / "prometheus", [{
        "job_name": "mlaas", "metrics_path": "/hub/metrics",
        "authorization": {"credentials_file": str(platform["token"])},
        "static_configs": [{"targets": [hub.url.split("://", 1)[1].rstrip("/")]}],
    }, {  # the Dask Gateway's own (mlaas.dask_metrics), through the hub's proxy, the same token
        "job_name": "mlaas-dask-gateway", "metrics_path": "/services/dask-gateway/api/mlaas/metrics",
        "authorization": {"type": "jupyterhub", "credentials_file": str(platform["token"])},
        "static_configs": [{"targets": [hub.url.split("://", 1)[1].rstrip("/")]}],
    }], [str(rules)]).start()
    try:
        yield prom
    finally:
        prom.stop()


def test_prometheus_scrapes_the_platforms_metrics_with_a_read_metrics_token_alone(platform, prometheus):
    hub = platform["hub"]
    ensure_user(hub, "met-gpu", ["quota-team"])
    ensure_user(hub, "met-other", ["ml-users"])
    gpu_token = user_token(hub, "met-gpu")
    try:
        start_server(hub, "met-gpu", gpu_token, {"profile": "gpu-one"})
        refused = request_server(hub, "met-other", user_token(hub, "met-other"), {"profile": "mig-atlas"})
        assert refused.status_code == 403, error_message(refused)  # atlas-ml only

        assert prometheus.value('up{job="mlaas"}') == 1.0, "Prometheus could not scrape /hub/metrics"
        expected = {
            'mlaas_servers{profile="gpu-one"}': 1,
            'mlaas_accelerators_held{user="met-gpu",profile="gpu-one",kind="gpu"}': 1,
            'mlaas_group_accelerators_held{group="quota-team",kind="gpu"}': 1,
            'mlaas_quota_used{group="quota-team",resource="cpu"}': 1,
            'mlaas_quota_limit{group="quota-team",resource="cpu"}': 2,
            'mlaas_profile_free{profile="gpu-one"}': 0,
            'mlaas_profile_total{profile="gpu-one"}': 1,
            'mlaas_server_gpu_utilization_percent{user="met-gpu",server=""}': 55,
            'mlaas_server_gpu_memory_used_bytes{user="met-gpu",server=""}': 2 * 2**30,
            f'mlaas_gpu_processes_outside_assignment{{device="{GPU}",server=""}}': 1,
            'mlaas_spawn_refusals_total{reason="not-allowed"}': 1,
            'mlaas_spawn_refusals_total{reason="quota"}': 0,
            "jupyterhub_running_servers": 1,  # JupyterHub's own, next to ours
        }
        got = {expr: prometheus.value(expr) for expr in expected}
        assert got == expected
        # one query per family answers (jupyterhub's own are there too)
        for family in [*FAMILIES, "jupyterhub_running_servers"]:
            assert prometheus.query(family), f"no {family} in Prometheus"

        # the scrape token can read metrics and nothing else; a user's token cannot read metrics
        metrics_token = platform["token"].read_text().strip()
        assert requests.get(f"{hub.url}/hub/api/users", headers={"Authorization": f"token {metrics_token}"},
                            timeout=10).status_code == 403
        assert requests.get(f"{hub.url}/hub/metrics", headers={"Authorization": f"token {gpu_token}"},
                            timeout=10).status_code == 403
    finally:
        stop_server(hub, "met-gpu")
    assert prometheus.value('absent(mlaas_servers{profile="gpu-one"})') == 1.0  # gone with the server
    assert prometheus.value('mlaas_profile_free{profile="gpu-one"}') == 1.0


def test_prometheus_scrapes_dask_clusters_and_workers_per_user_and_group_from_the_gateway(platform, prometheus):
    """Only the gateway knows every user's clusters: it serves their counts itself, to the scrape
    service and admins; a user's token is refused there."""
    hub = platform["hub"]
    ensure_user(hub, "met-dask", ["quota-team"])
    token = user_token(hub, "met-dask")
    api = f"{hub.url}/services/dask-gateway/api/v1/clusters/"
    auth = {"Authorization": f"jupyterhub {token}"}
    name = requests.post(api, headers=auth, json={"cluster_options": {}}, timeout=60).json()["name"]
    try:
        deadline = time.monotonic() + 60
        while requests.get(api + name, headers=auth, timeout=10).json()["status"] != "RUNNING":
            assert time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.5)
        r = requests.post(f"{api}{name}/scale", headers=auth, json={"count": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["ok"], r.text
        assert prometheus.value('up{job="mlaas-dask-gateway"}') == 1.0, "Prometheus could not scrape the gateway"
        expected = {
            'mlaas_dask_clusters{user="met-dask"}': 1,
            'mlaas_dask_workers{user="met-dask"}': 2,
            'mlaas_group_dask_clusters{group="quota-team"}': 1,
            'mlaas_group_dask_workers{group="quota-team"}': 2,
            'mlaas_dask_worker_gpus{user="met-dask"}': 0,
        }
        deadline = time.monotonic() + 30
        while (got := {e: prometheus.value(e) for e in expected}) != expected and time.monotonic() < deadline:
            time.sleep(1)
        assert got == expected
        assert prometheus.value('mlaas_dask_worker_cores{user="met-dask"}') > 0

        metrics_url = f"{hub.url}/services/dask-gateway/api/mlaas/metrics"
        mine = requests.get(metrics_url, headers=auth, timeout=10)
        assert mine.status_code == 403 and "mlaas-metrics" in mine.json()["error"]  # users do not read others' counts
        assert requests.get(metrics_url, timeout=10).status_code == 401
    finally:
        requests.delete(api + name, headers=auth, timeout=30)
    assert prometheus.value('absent(mlaas_dask_clusters{user="met-dask"})') == 1.0  # gone with the cluster


def test_the_alert_rules_pass_promtool_and_load_into_prometheus(prometheus):
    r = subprocess.run(["promtool", "check", "rules", str(CHART_FILES / "alerts.yaml")], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 5 rules found" in r.stdout, r.stdout + r.stderr
    groups = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = {rule["name"]: rule["health"] for g in groups for rule in g["rules"]}
    deadline = time.monotonic() + 20
    while any(h != "ok" for h in rules.values()) and time.monotonic() < deadline:
        time.sleep(1)
        groups = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {rule["name"]: rule["health"] for g in groups for rule in g["rules"]}
    assert rules == {"MLaaSGroupQuotaNearlyUsedUp": "ok", "MLaaSProfileFull": "ok", "MLaaSIdleGPUHeld": "ok",
                     "MLaaSManySpawnsRefused": "ok", "MLaaSGPUUsedOutsideAssignment": "ok"}


def test_every_dashboard_query_is_valid_and_reads_metrics_the_platform_exports(prometheus):
    """Each Grafana dashboard the chart ships: well-formed, and each panel's query runs in the real
    Prometheus (with the dashboard's variables set) over metric names that exist there, but for
    the GPU use of Dask workers, which needs GPU workers on Kubernetes (the gateway's collector
    makes it in tests/test_units.py)."""
    dashboards = sorted((CHART_FILES / "dashboards").glob("*.json"))
    assert [d.name for d in dashboards] == ["gpu-use.json", "quota-pressure.json"]
    exported = set(requests.get(f"{prometheus.url}/api/v1/label/__name__/values", timeout=10).json()["data"])
    for path in dashboards:
        board = json.loads(path.read_text())
        assert board["uid"] and board["title"].startswith("MLaaS Hub") and board["panels"], path.name
        variables = {v["name"] for v in board["templating"]["list"]}
        assert "PROMETHEUS_DS" in variables
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${PROMETHEUS_DS}" and panel["gridPos"]["w"] > 0
            for target in panel["targets"]:
                expr = target["expr"].replace("$group", ".*")
                prometheus.query(expr)  # raises on a PromQL error
                names = {n for n in __import__("re").findall(r"\b(mlaas_[a-z_]+|jupyterhub_[a-z_]+)\b", expr)}
                assert names and names <= exported | KUBERNETES_ONLY, f"{path.name} '{panel['title']}' reads {names - exported}"
