"""The Kubernetes deployment for real: `mlaas deploy` of a site (our chart, Zero to JupyterHub 4.4.0
and Dask Gateway 2026.3.0 from the chart mirror) into a test cluster, and a researcher's day on it.

Every pod of the three releases runs its real program (tests/cluster/kubelet.py): the hub from
z2jh's own jupyterhub_config.py with our extraConfig, configurable-http-proxy, the idle culler (a
hub service in the hub's pod), the user scheduler (kube-scheduler at the image's version), the
gateway's API and controller, Traefik, Dask schedulers and workers, XCache (xrootd), and users'
JupyterLabs. They talk to the API server with their own ServiceAccount tokens, to each other by
Service name, and see their ConfigMaps, Secrets and volumes at their mount paths. Only the test
harness holds admin credentials (to install the charts, as a site admin does, and to look).

Simulated, and why: the nodes (KWOK; no kubelet or container runtime can run here), so pods share
this machine's kernel and network namespace (each program listens on its pod's IP); images are
environments built from their requirement files (no registry can be reached); no GPU (MIG slices
are the nodes' advertised resources). The site's AAI is the development OIDC provider."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
import yaml

from cluster.pod_runner import wait_until
from conftest import browser_login, needs_root, open_profile_editor
from deployment import CULL_TIMEOUT, NAMESPACE, TEST_CONTENT, TEST_FILE, Deployment
from helpers import ARTIFACTS, error_message, run_in_kernel, state_root, user_token
from mlaas.projects.names import project_claim
from test_upstream_charts import charts_dir

pytestmark = [pytest.mark.platform, needs_root]

MIG_PROFILE = "mig-3g-20gb"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site():
    deployment = Deployment(state_root() / "deployment", charts_dir())
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()
        logs = ARTIFACTS / "deployment-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (deployment.state / "kubelet" / "logs").glob("*.log"):
            (logs / log.name).write_bytes(log.read_bytes())


def pods(site: Deployment, selector: str = "") -> list[dict]:
    query = f"?labelSelector={selector}" if selector else ""
    return site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods{query}")["items"]


def process_uid(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))


def capacity(site: Deployment, token: str, slug: str) -> tuple[int, int]:
    r = site.api(token).get(f"{site.url}/hub/api/mlaas/profiles")
    r.raise_for_status()
    text = next(p for p in r.json()["profiles"] if p["slug"] == slug)["capacity"]
    free, total = re.search(r"(\d+) of (\d+) free", text).groups()
    return int(free), int(total)


def test_every_pod_of_the_three_releases_runs_its_program_as_the_charts_account(site):
    """Each pod's containers are live processes of the pod's account (securityContext), and the
    deployment's components are all there."""
    expected_uid = {"hub": 1000, "proxy": 65534, "xcache": 10001, "tracking": 1000}
    components = set()
    for pod in pods(site):
        labels = pod["metadata"]["labels"]
        component = labels.get("component") or labels.get("app.kubernetes.io/component")
        components.add(component)
        uid = pod["metadata"]["uid"]  # a pod waits for its volume's claim to be bound, as on a node
        assert wait_until(lambda: uid in site.kubelet.pods, 60), f"{pod['metadata']['name']} is not run: {site.kubelet.failures}"
        running = site.kubelet.pods[uid]
        for container in running.containers:
            assert wait_until(lambda: container.pid is not None, 30), \
                f"{container.name} is not running:\n{container.log_path.read_text()[-2000:]}"
            if component in expected_uid:
                assert process_uid(container.pid) == expected_uid[component], container.name
    assert {"hub", "proxy", "user-scheduler", "gateway", "controller", "traefik", "xcache", "tracking"} <= components, components


def test_a_researcher_logs_in_sees_the_clusters_mig_slices_and_gets_jupyterlab_on_a_mig_node(site, browser):
    """Chromium: the site's public address (the proxy's load-balancer IP) → the AAI's login →
    the spawn form with the MIG capacity the cluster's nodes advertise → JupyterLab. The pod is
    placed by z2jh's user scheduler on the node with the slices."""
    page = browser.new_page()
    try:
        browser_login(page, site.url, "alice", site.password("alice"))
        page.goto(f"{site.url}/hub/spawn")
        mig = page.locator(f'[data-profile="{MIG_PROFILE}"]')
        assert "4 of 4 free" in mig.inner_text()  # tests/cluster/nodes.yaml: one node with 4 × 3g.20gb
        mig.locator("input").check()
        page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
        page.wait_for_selector(".jp-Launcher", timeout=180_000)
    finally:
        page.close()
    pod = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/jupyter-alice")
    assert pod["spec"]["schedulerName"] == "jupyterhub-user-scheduler"
    assert pod["spec"]["nodeName"] == "deploy-a100-mig-0"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/mig-3g.20gb"] == "1"
    events = site.cluster.request(
        "GET", f"/api/v1/namespaces/{NAMESPACE}/events?fieldSelector=involvedObject.name%3Djupyter-alice")["items"]
    scheduled = [e for e in events if e["reason"] == "Scheduled"]
    assert scheduled and scheduled[0]["source"].get("component", scheduled[0].get("reportingComponent")) \
        in ("jupyterhub-user-scheduler", ""), scheduled
    assert capacity(site, user_token(site, "alice"), MIG_PROFILE) == (3, 4)


@pytest.fixture(scope="module")
def alice(site):
    """alice's running server (started by the browser test, or here when run alone) and her token."""
    token = user_token(site, "alice") if site.api().get(f"{site.url}/hub/api/users/alice").ok else None
    if token is None:
        site.api().post(f"{site.url}/hub/api/users/alice").raise_for_status()
        site.api().post(f"{site.url}/hub/api/groups/atlas-ml/users", json={"users": ["alice"]})
        token = user_token(site, "alice")
    if not site.api().get(f"{site.url}/hub/api/users/alice").json().get("servers", {}).get("", {}).get("ready"):
        r = site.api(token).post(f"{site.url}/hub/api/users/alice/server", json={"profile": MIG_PROFILE})
        assert r.status_code in (201, 202), error_message(r)
        assert wait_until(lambda: site.api().get(f"{site.url}/hub/api/users/alice").json()["servers"].get("", {})
                          .get("ready"), 180)
    return token


def test_in_a_notebook_dask_gateway_scales_to_two_workers_and_data_comes_through_the_xcache_service(site, alice):
    """Code in alice's kernel, with nothing configured by her: `Gateway()` finds the gateway
    (through the proxy) and its schedulers (through Traefik); `mlaas.data` reads the origin's file
    through the site's XCache Service."""
    code = f"""
import json
from dask_gateway import Gateway
from mlaas import data
g = Gateway()
options = sorted(g.cluster_options())  # from the profile files, which the gateway reads from their ConfigMap
cluster = g.new_cluster(shutdown_on_close=False)  # stays after this kernel, for the next tests
cluster.scale(2)
client = cluster.get_client()
client.wait_for_workers(2, timeout=180)
total = client.submit(lambda n: sum(range(n)), 1000).result()
hosts = sorted({{w["host"] for w in client.scheduler_info()["workers"].values()}})
print(json.dumps({{"total": total, "workers": len(client.scheduler_info()["workers"]), "hosts": hosts,
                  "cluster": cluster.name, "options": options, "bytes": data.read_bytes({TEST_FILE!r}).decode(),
                  "url": data.url({TEST_FILE!r})}}))
"""
    out = run_in_kernel(site, "alice", alice, code, timeout=300)
    assert out["error"] is None, out
    result = json.loads(out["stdout"].strip().splitlines()[-1])
    assert result["total"] == sum(range(1000)) and result["workers"] == 2
    assert {"worker_cores", "worker_memory"} <= set(result["options"]), result["options"]
    workers = pods(site, "app.kubernetes.io%2Fcomponent%3Ddask-worker")
    assert {p["status"]["podIP"] for p in workers} == set(result["hosts"])  # the work ran in the worker pods
    assert result["bytes"].encode() == TEST_CONTENT
    assert result["url"].startswith("root://xcache-demo:1094//")  # the cache Service, not the origin
    site.alice_cluster = result["cluster"]


LOG_A_RUN = """
import json, os, mlflow
mlflow.set_experiment("deployment-journey")
with mlflow.start_run() as run:
    mlflow.log_param("learning_rate", 0.01)
    mlflow.log_metric("loss", 0.25)
    mlflow.log_text("logged from a pod", "notes/pod.txt")
project = os.path.expanduser("~/projects/atlas-ml/mlflow-artifacts")  # the group's project volume
found = [os.path.join(d, f) for d, _, files in os.walk(project) for f in files if f == "pod.txt"]
print(json.dumps({"run": run.info.run_id, "uri": os.environ["MLFLOW_TRACKING_URI"],
                  "workspace": os.environ.get("MLFLOW_WORKSPACE"),
                  "in_project": [open(p).read() for p in found if run.info.run_id in p]}))
"""


def test_a_run_logged_in_alices_pod_is_her_groups_alone_and_counted_for_the_admins(site, alice):
    """Experiment tracking at a chart-deployed site. In alice's kernel (her pod), `import mlflow`
    logs a run with nothing configured: the servers' environment leads to our chart's tracking
    component by its Service, with her server's own token. Through the site's public address, her
    token reads the run in her group's workspace; bob's (another group) neither lists nor reads
    it. The admins' usage view counts the artifact (the hub asks the component). The artifact is
    on atlas-ml's project volume (mounted where MLflow keeps the workspace's), where she reads it
    in her pod; MLflow's database is on the component's own volume."""
    out = run_in_kernel(site, "alice", alice, LOG_A_RUN, timeout=240)
    assert out["error"] is None, (out, site.kubelet_log("mlaas-tracking")[-3000:])
    logged = json.loads(out["stdout"].strip().splitlines()[-1])
    assert logged["uri"] == "http://mlaas-tracking:8006/services/mlflow"  # the chart's Service, in-cluster
    assert logged["workspace"] == "atlas-ml"  # her team rather than the group everyone is in
    assert logged["in_project"] == ["logged from a pod"]  # kept on the group's project volume, read there

    api = f"{site.url}/services/mlflow/api/2.0/mlflow"

    def ask(token: str, path: str, workspace: str, **params: str) -> requests.Response:
        return requests.get(f"{api}/{path}", params=params, timeout=60,
                            headers={"Authorization": f"Bearer {token}", "X-MLFLOW-WORKSPACE": workspace})

    mine = ask(alice, "runs/get", "atlas-ml", run_id=logged["run"])
    assert mine.status_code == 200, mine.text
    assert mine.json()["run"]["data"]["params"] == [{"key": "learning_rate", "value": "0.01"}]
    site.api().post(f"{site.url}/hub/api/users/bob")
    site.api().post(f"{site.url}/hub/api/groups/ml-users")  # (exists where the AAI's sign-in made it)
    site.api().post(f"{site.url}/hub/api/groups/ml-users/users", json={"users": ["bob"]}).raise_for_status()
    bob = user_token(site, "bob")
    denied = ask(bob, "runs/get", "atlas-ml", run_id=logged["run"])
    assert denied.status_code == 403 and denied.json()["error_code"] == "PERMISSION_DENIED", denied.text
    assert "ml-users" in denied.json()["message"]  # names the workspaces bob may use
    listed = ask(bob, "experiments/search", "ml-users", max_results="100")
    assert listed.status_code == 200, listed.text
    assert "deployment-journey" not in [e["name"] for e in listed.json().get("experiments", [])]

    usage = site.api().get(f"{site.url}/hub/api/mlaas/usage").json()
    assert usage.get("tracking_error", "(none in the answer)") is None, usage
    atlas = next(t for t in usage["tracking"] if t["workspace"] == "atlas-ml")
    assert atlas["group"] == "atlas-ml" and atlas["artifact_bytes"] >= len("logged from a pod")
    def volume(claim: str) -> Path:
        bound = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims/{claim}")
        return Path(site.cluster.request("GET", f"/api/v1/persistentvolumes/{bound['spec']['volumeName']}")
                    ["spec"]["hostPath"]["path"])

    stored = list(volume(project_claim("atlas-ml")).glob(f"mlflow-artifacts/*/{logged['run']}/**/notes/pod.txt"))
    assert [p.read_text() for p in stored] == ["logged from a pod"]
    assert (volume("mlaas-tracking") / "tracking" / "mlflow" / "mlflow.db").is_file()  # MLflow's database


def test_another_group_can_reach_neither_alices_server_nor_her_dask_cluster(site, alice):
    """bob (ml-users only) with his own token: her server answers 403/redirects him away, and the
    gateway neither lists her cluster nor lets him connect to it."""
    site.api().post(f"{site.url}/hub/api/users/bob")
    bob = user_token(site, "bob")
    r = site.api(bob).get(f"{site.url}/user/alice/api/status", allow_redirects=False)
    assert r.status_code in (302, 403) and "/user/alice" not in r.headers.get("location", "/hub/"), r.status_code
    cluster = getattr(site, "alice_cluster", None)
    assert cluster, "the Dask test did not leave a cluster"
    gw = site.api(bob)
    gw.headers["Authorization"] = f"jupyterhub {bob}"
    listed = gw.get(f"{site.url}/services/dask-gateway/api/v1/clusters/")
    assert listed.status_code == 200 and cluster not in listed.json(), listed.text
    assert gw.get(f"{site.url}/services/dask-gateway/api/v1/clusters/{cluster}").status_code in (403, 404)  # no credentials


def test_the_charts_scrape_jobs_read_the_hubs_and_the_gateways_metrics(site, alice):
    """As the site's Prometheus would: each scrape job of our chart's ConfigMap `mlaas-prometheus`,
    at its Service, with the scrape service's token (registered as docs/deploy.md says): the hub
    counts alice's server, the gateway her Dask cluster and its two workers, for her and her group;
    a user's token is refused at the gateway's metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    config = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/mlaas-prometheus")
    samples: dict[str, dict[tuple, float]] = {}
    urls = {}
    for job in yaml.safe_load(config["data"]["scrape-config.yaml"]):
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.rsplit(":", 1)
        service = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/services/{host.split('.')[0]}")
        urls[job["job_name"]] = url = f"http://{service['spec']['clusterIP']}:{port}{job['metrics_path']}"
        scheme = job["authorization"].get("type", "Bearer")
        r = requests.get(url, headers={"Authorization": f"{scheme} {site.metrics_token}"}, timeout=30)
        assert r.status_code == 200, (job["job_name"], r.status_code, r.text[:300])
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    groups = site.api().get(f"{site.url}/hub/api/users/alice").json()["groups"]
    assert sum(v for k, v in samples["mlaas_servers"].items() if ("profile", MIG_PROFILE) in k) == 1
    assert samples["mlaas_dask_clusters"][(("user", "alice"),)] == 1
    assert samples["mlaas_dask_workers"][(("user", "alice"),)] == 2
    assert groups and all(samples["mlaas_group_dask_workers"][(("group", g),)] == 2 for g in groups), groups
    refused = requests.get(urls["mlaas-dask-gateway"], headers={"Authorization": f"jupyterhub {alice}"}, timeout=30)
    assert refused.status_code == 403


def test_the_idle_culler_stops_an_idle_server_and_its_slice_is_free_again(site, alice):
    """z2jh's jupyterhub-idle-culler (cull.timeout 120 s in the test site) stops alice's server once
    she is idle; the pod goes and the form counts the MIG slice as free again."""
    g = site.api(alice)
    for name in g.get(f"{site.url}/services/dask-gateway/api/v1/clusters/",
                      headers={"Authorization": f"jupyterhub {alice}"}).json():
        g.delete(f"{site.url}/services/dask-gateway/api/v1/clusters/{name}", headers={"Authorization": f"jupyterhub {alice}"})
    started = time.monotonic()
    assert wait_until(lambda: not site.api().get(f"{site.url}/hub/api/users/alice").json()["servers"], CULL_TIMEOUT + 120), \
        site.kubelet_log("hub")[-3000:]
    assert time.monotonic() - started > 20  # culled for being idle, not at once
    assert wait_until(lambda: not pods(site, "component%3Dsingleuser-server"), 60)
    assert "Culling server alice" in site.kubelet_log("hub")
    assert wait_until(lambda: capacity(site, alice, MIG_PROFILE) == (4, 4), 30)


def test_an_admin_edits_a_profile_live_and_a_later_deploy_never_overwrites_the_edit(site, browser, tmp_path):
    """Live administration on Kubernetes. Chromium: the admin page of the chart-deployed hub (a
    service in the hub's pod) changes cpu-small's memory limit; the edit lands in the live
    ConfigMap, which no Helm release owns, and bob's next server has the new limit without a
    restart. Then `mlaas deploy` again with a changed cpu.yaml: the edit stays in force, and the
    history shows both the edit and the deploy that it shadows."""
    import shutil

    page = browser.new_page()
    try:
        open_profile_editor(page, site.url, site.password("admin"), "cpu-small")
        page.fill("#profile-form [name='memory.limit']", "3Gi")
        page.click("#profile-save")
        page.wait_for_selector("#message.ok")
    finally:
        page.close()
    live = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/mlaas-profiles-live")
    assert "limit: 3Gi" in live["data"]["cpu.yaml"] and "managed-by" in json.dumps(live["metadata"]["labels"])
    deployed = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/mlaas-profiles")
    assert "limit: 3Gi" not in deployed["data"]["cpu.yaml"]  # the chart's ConfigMap is the site's files

    site.api().post(f"{site.url}/hub/api/users/bob")
    bob = user_token(site, "bob")

    def servers() -> dict | None:
        r = site.api().get(f"{site.url}/hub/api/users/bob")
        return r.json()["servers"] if r.status_code == 200 else None

    def memory_limit_of_a_new_server() -> str:
        r = site.api(bob).post(f"{site.url}/hub/api/users/bob/server", json={"profile": "cpu-small"})
        assert r.status_code in (201, 202), error_message(r)
        assert wait_until(lambda: ((servers() or {}).get("") or {}).get("ready"), 120)
        pod = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/jupyter-bob")
        site.api(bob).delete(f"{site.url}/hub/api/users/bob/server")
        assert wait_until(lambda: servers() == {}, 60)
        assert wait_until(lambda: not pods(site, "hub.jupyter.org%2Fusername%3Dbob"), 60)
        return pod["spec"]["containers"][0]["resources"]["limits"]["memory"]

    def in_force() -> bool:  # the hub follows the ConfigMaps every few seconds
        summary = next(p for p in site.api(bob).get(f"{site.url}/hub/api/mlaas/profiles").json()["profiles"]
                       if p["slug"] == "cpu-small")["summary"]
        return "3 GiB" in summary

    assert wait_until(in_force, 30)
    assert memory_limit_of_a_new_server() in ("3Gi", str(3 * 2**30))

    profiles = tmp_path / "profiles"
    shutil.copytree(REPO / "spawner_profiles", profiles)
    cpu = profiles / "cpu.yaml"
    cpu.write_text(cpu.read_text().replace("display_name: Small CPU", "display_name: Small CPU (release 2)"))
    site.deploy(profiles)
    assert memory_limit_of_a_new_server() in ("3Gi", str(3 * 2**30))  # the live edit is still in force

    page = browser.new_page()
    try:
        browser_login(page, site.url, "admin", site.password("admin"))
        page.goto(f"{site.url}/services/mlaas-admin/")
        page.wait_for_selector("#profiles-table tr[data-slug=cpu-small]")
        assert "3Gi" in page.inner_text("#profiles-table tr[data-slug=cpu-small]")

        def history() -> str:
            page.click("nav button[data-panel=history]")
            page.wait_for_selector("#history-table tbody tr")
            return page.inner_text("#history-table tbody")

        assert wait_until(lambda: "deployed file cpu.yaml" in history(), 30), history()
        text = history()
        assert "a live edit of this file stays in force over it" in text
        assert "update profile cpu-small" in text and "admin" in text and "3Gi" in text
    finally:
        page.close()
