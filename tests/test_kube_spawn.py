"""The hub with KubeProfileSpawner against a real control plane (tests/cluster): a user logs in
through the dev IdP, sees capacity that comes from the cluster's nodes and pods, starts a MIG
profile; the real scheduler puts the pod on a node with that slice; the server is reached
through the proxy; stopping deletes the pod.

Least privilege: the hub, the Dask Gateway and its controller talk to the API server with their
own ServiceAccounts' tokens, with the roles the upstream charts and ours ship (applied from the
chart mirror, tests/cluster/upstream_rbac.py); only the test harness holds admin credentials.

Simulated: the nodes (KWOK); the test kubelet (tests/cluster/pod_runner.py) runs each user's real
single-user server from the user image's environment, as the pod's account, on the pod's IP."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from cluster.cluster import Cluster, binaries, free_port, in_range, pod_range
from cluster.pod_runner import PodRunner, wait_until
from cluster.upstream_rbac import apply_upstream_rbac
from helpers import (
    ARTIFACTS, FIXTURES, RunningPlatform, ensure_user, error_message, kernel_json, oidc_login, start_platform,
    state_root, stop_server, user_token, wait_for_tracking, wait_ready,
)
from test_upstream_charts import charts_dir
from mlaas.deploy import chart_values

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.platform
NAMESPACE = "mlaas-users"


class DcgmStandIn:
    """Stands in for NVIDIA's DCGM exporter (no GPU here): its series, with its labels, for the
    pods the test names; served over HTTP for the real Prometheus to scrape."""

    def __init__(self):
        import http.server
        import threading

        self.series: dict[str, tuple[float, float]] = {}  # "namespace/pod" -> (engine active 0-1, MiB used)
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = stand_in.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def exposition(self) -> str:
        lines = ["# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge", "# TYPE DCGM_FI_DEV_FB_USED gauge"]
        for key, (active, used) in sorted(self.series.items()):
            namespace, pod = key.split("/")
            labels = (f'gpu="0",UUID="GPU-5f2e-0000",device="nvidia0",modelName="NVIDIA A100-SXM4-40GB",'
                      f'GPU_I_PROFILE="3g.20gb",GPU_I_ID="1",Hostname="spawn-a100-mig-0",container="notebook",'
                      f'namespace="{namespace}",pod="{pod}"')
            lines += [f"DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{labels}}} {active}", f"DCGM_FI_DEV_FB_USED{{{labels}}} {used}"]
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def site():
    from prom import Prometheus

    dcgm = DcgmStandIn()
    prometheus = Prometheus(state_root() / "kube-prometheus", [{"job_name": "dcgm",
                                                                 "static_configs": [{"targets": [dcgm.address]}]}]).start()
    profiles = state_root() / "kube-profiles"
    shutil.rmtree(profiles, ignore_errors=True)
    shutil.copytree(FIXTURES / "profiles", profiles)
    (profiles / "mig-idle.yaml").write_text(yaml.safe_dump({"profiles": [{
        "slug": "mig-idle", "display_name": "A MIG slice, stopped when unused", "cpu": {"limit": 1},
        "memory": {"limit": "1Gi"}, "mig": "3g.20gb", "gpu_idle_timeout": 30, "groups": ["*"]}]}))
    cluster = Cluster("spawn", state_root() / "cluster-spawn", binaries(), pod_cidr=pod_range(2))
    cluster.start(REPO / "tests" / "cluster" / "nodes.yaml")
    cluster.request("POST", "/api/v1/namespaces", {"metadata": {
        "name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    cluster.apply_crds(REPO / "tests" / "cluster" / "crds" / "dask-gateway.yaml")
    apply_upstream_rbac(cluster, NAMESPACE, charts_dir())  # z2jh's hub Role, Dask Gateway's roles
    install_chart(cluster, profiles)  # ours: project volumes, the hub's read-only ClusterRole
    accounts = {name: str(cluster.service_account_kubeconfig(NAMESPACE, name, cluster.state / f"{name}.kubeconfig"))
                for name in ("hub", "api-dask-gateway", "controller-dask-gateway")}
    runner = PodRunner(cluster, NAMESPACE, cluster.state / "pods").start()
    hub = start_platform(
        "kube", spawner="kubernetes", profiles=profiles, culling={"gpu_every": 2},
        kubernetes={"kubeconfig": accounts["hub"], "namespace": NAMESPACE, "gpu_metrics_url": prometheus.url},
        dask_gateway={"backend": "kubernetes", "port": free_port(), "api_port": free_port(), "tcp_port": free_port(),
                      "controller_port": free_port(), "kubeconfig": accounts["api-dask-gateway"],
                      "controller_kubeconfig": accounts["controller-dask-gateway"]},
        data={"enabled": False},
    )
    yield {"cluster": cluster, "hub": hub, "runner": runner, "dcgm": dcgm, "prometheus": prometheus}
    hub.platform.stop()
    runner.stop()
    cluster.stop()
    prometheus.stop()
    dcgm.stop()
    shutil.copytree(hub.log_dir, ARTIFACTS / "kube-logs", dirs_exist_ok=True)


def install_chart(cluster: Cluster, profiles: Path) -> None:
    """Our chart in the users' namespace, as a site installs it: here it brings the group
    project volumes (static RWX volumes stand in for a storage provisioner) and the hub's
    read-only ClusterRole for its capacity watch."""
    generated, _ = chart_values([profiles])
    # (the hub on this machine runs the tracking service itself: not the chart's component)
    values = {**generated, "site": "test", "xcache": {"enabled": False}, "migManager": {"enabled": False},
              "tracking": {"enabled": False},
              "projects": {**generated["projects"], "storageClassName": "rwx-test", "size": "1Gi"}}
    values_file = cluster.state / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    for claim in generated["projects"]["claims"]:
        cluster.request("POST", "/api/v1/persistentvolumes", {
            "metadata": {"name": f"pv-{claim['name']}"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "rwx-test",
                     "hostPath": {"path": str(cluster.state / "volumes" / claim["name"])}}})
    r = subprocess.run([str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig), "install", "mlaas-hub",
                        str(REPO / "charts" / "mlaas-hub"), "--namespace", NAMESPACE, "-f", str(values_file), "--wait"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def offered(hub: RunningPlatform, token: str) -> dict:
    r = hub.api(token).get(f"{hub.url}/hub/api/mlaas/profiles")
    r.raise_for_status()
    return {p["slug"]: p for p in r.json()["profiles"]}


def test_mig_spawn_lands_on_a_node_with_the_slice_and_is_reached(site):
    hub, cluster = site["hub"], site["cluster"]
    session, r = oidc_login(hub, "alice")
    assert r.status_code == 200
    token = user_token(hub, "alice")
    assert wait_until(lambda: offered(hub, token)["mig-atlas"]["capacity"] == "4 of 4 free", 30), offered(hub, token)

    r = hub.api(token).post(f"{hub.url}/hub/api/users/alice/server", json={"profile": "mig-atlas"})
    assert r.status_code in (201, 202), error_message(r)

    def ready():
        server = hub.api().get(f"{hub.url}/hub/api/users/alice").json().get("servers", {}).get("")
        return bool(server and server.get("ready"))

    if not wait_until(ready, 90):
        pods = cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
        events = cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/events")["items"]
        pytest.fail(f"not ready; pods: {[(p['metadata']['name'], p['status']) for p in pods]}\n"
                    f"events: {[(e['reason'], e['message']) for e in events][-10:]}")
    pod = cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/jupyter-alice")
    assert pod["spec"]["nodeName"] == "spawn-a100-mig-0"  # the real scheduler, by the MIG resource
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-3g.20gb"] == "1"
    assert in_range(pod["status"]["podIP"], cluster.pod_cidr)

    status = hub.api(token).get(f"{hub.url}/user/alice/api/status")
    assert status.status_code == 200, status.text
    assert wait_until(lambda: offered(hub, token)["mig-atlas"]["capacity"] == "3 of 4 free", 30)

    # experiment tracking from the pod, with nothing set: the service listens where pods reach the hub
    wait_for_tracking(hub)
    logged = kernel_json(hub, "alice", token, "import json, os, mlflow\nwith mlflow.start_run() as run:\n"
                         "    mlflow.log_metric('loss', 0.5)\n"
                         "print(json.dumps({'uri': os.environ['MLFLOW_TRACKING_URI'], 'run': run.info.run_id,"
                         " 'workspace': os.environ['MLFLOW_WORKSPACE']}))")
    settings = hub.platform.settings
    assert logged["uri"] == f"http://{settings.kubernetes.hub_connect_ip}:{settings.tracking.port}/services/mlflow"
    run = requests.get(f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get", params={"run_id": logged["run"]},
                       headers={"Authorization": f"Bearer {token}", "X-MLFLOW-WORKSPACE": logged["workspace"]}, timeout=30)
    assert run.status_code == 200, run.text

    r = hub.api(token).delete(f"{hub.url}/hub/api/users/alice/server")
    assert r.status_code in (202, 204)

    def pod_gone():
        try:
            cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/jupyter-alice")
            return False
        except Exception:
            return True

    assert wait_until(pod_gone, 60), "stopping the server did not delete its pod"
    assert wait_until(lambda: offered(hub, token)["mig-atlas"]["capacity"] == "4 of 4 free", 30)


def test_group_quota_holds_on_the_cluster_while_the_cluster_has_room(site):
    """quota-team may hold one MIG 3g.20gb slice (tests/fixtures/profiles/quotas.yaml); the
    cluster has four: the second member is refused by the quota, not by capacity."""
    from helpers import ensure_user

    hub, cluster = site["hub"], site["cluster"]
    for name in ("qa-one", "qa-two"):
        ensure_user(hub, name, ["atlas-ml", "quota-team"])
    one, two = user_token(hub, "qa-one"), user_token(hub, "qa-two")
    r = hub.api(one).post(f"{hub.url}/hub/api/users/qa-one/server", json={"profile": "mig-atlas"})
    assert r.status_code in (201, 202), error_message(r)
    try:
        assert wait_until(lambda: bool(hub.api().get(f"{hub.url}/hub/api/users/qa-one").json()["servers"].get("", {}).get("ready")), 90)
        assert offered(hub, two)["mig-atlas"]["capacity"] == "3 of 4 free"
        refused = hub.api(two).post(f"{hub.url}/hub/api/users/qa-two/server", json={"profile": "mig-atlas"})
        assert refused.status_code == 403
        assert "group quota-team uses 1 of 1 MIG 3g.20gb slices: qa-one (mig-atlas)" in error_message(refused)
        pods = cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
        assert [p["metadata"]["name"] for p in pods] == ["jupyter-qa-one"]  # nothing was created for qa-two
    finally:
        hub.api().delete(f"{hub.url}/hub/api/users/qa-one/server")
        wait_until(lambda: not cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"], 60)


def dask_api(hub: RunningPlatform, token: str, path: str = "", method: str = "GET", body: dict | None = None):
    import requests

    return requests.request(method, f"{hub.url}/services/dask-gateway/api/v1/{path}", json=body,
                            headers={"Authorization": f"jupyterhub {token}"}, timeout=30)


def test_dask_gateway_kubernetes_backend_runs_a_cluster_as_pods(site):
    """dask-gateway's KubeBackend (with our options and limits) and its controller, as hub
    services, against the cluster: a user's cluster becomes a scheduler pod and GPU worker pods,
    admitted by Pod Security 'restricted' and placed by the real scheduler on the GPU node.

    Stood in: a scheduler asks for workers through its heartbeat, which the backend writes into
    the DaskCluster's spec.replicas. The scheduler's Service name does not resolve without
    cluster DNS, so the test writes spec.replicas as the backend would."""
    from helpers import ensure_user

    hub, cluster = site["hub"], site["cluster"]
    ensure_user(hub, "dask-k8s", ["atlas-ml"])  # atlas-ml may use a MIG profile: GPU workers offered
    token = user_token(hub, "dask-k8s")
    options = dask_api(hub, token, "options").json()["cluster_options"]
    gpu_field = next(f for f in options if f["field"] == "worker_gpus")
    assert gpu_field["spec"]["options"] == ["0", "1"]
    r = dask_api(hub, token, "clusters/", "POST", {"cluster_options": {"worker_gpus": "1", "worker_cores": "1"}})
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    short = name.split(".", 1)[1]
    selector = f"gateway.dask.org/cluster%3D{short}"

    def cluster_pods(component: str) -> list[dict]:
        items = cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}")["items"]
        return [p for p in items if p["metadata"]["labels"].get("app.kubernetes.io/component") == component]

    try:
        assert wait_until(lambda: dask_api(hub, token, f"clusters/{name}").json().get("status") == "RUNNING", 90), \
            dask_api(hub, token, f"clusters/{name}").text
        (scheduler,) = cluster_pods("dask-scheduler")
        assert scheduler["spec"]["nodeName"].startswith("spawn-cpu-")  # no GPU for the scheduler
        assert scheduler["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True

        cluster.request("PATCH", f"/apis/gateway.dask.org/v1alpha1/namespaces/{NAMESPACE}/daskclusters/{short}",
                        {"spec": {"replicas": 2}}, content_type="application/merge-patch+json")
        assert wait_until(lambda: len([p for p in cluster_pods("dask-worker") if p["spec"].get("nodeName")]) == 2, 60), \
            [p["status"] for p in cluster_pods("dask-worker")]
        for worker in cluster_pods("dask-worker"):
            container = worker["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False  # kept next to the GPU
            assert worker["spec"]["nodeName"] == "spawn-a100-mig-0"  # the node with whole GPUs

        assert dask_api(hub, token, f"clusters/{name}", "DELETE").status_code == 204
        assert wait_until(lambda: not cluster_pods("dask-scheduler") and not cluster_pods("dask-worker"), 60)
    finally:
        dask_api(hub, token, f"clusters/{name}", "DELETE")


def test_project_storage_is_shared_by_members_and_the_project_server_and_absent_for_others(site):
    """The group's project volume at run time: a file one member's server writes there is read by
    another member's server and by the project server; an outsider's pod has no such mount.
    (The pod runner mounts each pod's volumes as a kubelet would; see tests/cluster/pod_runner.py.)"""
    hub = site["hub"]
    people = {"pv-ann": ["ml-users", "atlas-ml"], "pv-ben": ["ml-users", "atlas-ml"], "pv-out": ["ml-users"]}
    tokens = {}
    for name, groups in people.items():
        ensure_user(hub, name, groups)
        tokens[name] = user_token(hub, name)
    assert wait_until(lambda: offered(hub, tokens["pv-ann"])["small"]["available"], 30)  # the capacity watch is up
    started = []
    try:
        for name in people:
            r = hub.api(tokens[name]).post(f"{hub.url}/hub/api/users/{name}/server", json={"profile": "small"})
            assert r.status_code in (201, 202), error_message(r)
            started.append(name)
            wait_ready(hub, name, timeout=90)
        shared = "/home/jovyan/projects/atlas-ml"
        kernel_json(hub, "pv-ann", tokens["pv-ann"], f"""
import json
open({shared!r} + "/results.txt", "w").write("written by pv-ann")
print(json.dumps("ok"))
""")
        read = kernel_json(hub, "pv-ben", tokens["pv-ben"], f"""
import json
print(json.dumps(open({shared!r} + "/results.txt").read()))
""")
        assert read == "written by pv-ann"
        outsider = kernel_json(hub, "pv-out", tokens["pv-out"], """
import json, os
print(json.dumps([os.path.exists("/home/jovyan/projects"), os.path.exists("/home/jovyan/projects/atlas-ml")]))
""")
        assert outsider == [False, False]
        r = hub.api(tokens["pv-ann"]).post(f"{hub.url}/hub/api/users/project-atlas-ml/server", json={"profile": "small"})
        assert r.status_code in (201, 202), error_message(r)
        started.append("project-atlas-ml")
        wait_ready(hub, "project-atlas-ml", timeout=90)
        content = hub.api(tokens["pv-ben"]).get(f"{hub.url}/user/project-atlas-ml/api/contents/results.txt")
        assert content.status_code == 200, content.text
        assert content.json()["content"] == "written by pv-ann"  # the project server works in the volume
    finally:
        for name in started:
            stop_server(hub, name)


def test_a_pods_gpu_use_comes_from_dcgm_and_an_unused_slice_is_freed_while_the_user_is_active(site):
    """On Kubernetes the GPU use of a server is its pod's, as NVIDIA's DCGM exporter reports it
    (a stand-in here, DcgmStandIn: no GPU) through a real Prometheus: the admins' usage view and
    the metrics show it, and the GPU culler warns and then stops a server whose MIG slice stays
    unused (profile mig-idle, 30 s), even while its user keeps the server busy, and the pod goes."""
    import time

    hub, cluster, dcgm = site["hub"], site["cluster"], site["dcgm"]
    # the earlier tests' servers are gone, processes included: KWOK may give their IP to this pod
    assert wait_until(site["runner"].kubelet.idle, 60), site["runner"].kubelet.pods
    ensure_user(hub, "kube-idler", ["ml-users"])
    token = user_token(hub, "kube-idler")
    r = hub.api(token).post(f"{hub.url}/hub/api/users/kube-idler/server", json={"profile": "mig-idle"})
    assert r.status_code in (201, 202), error_message(r)
    try:
        wait_ready(hub, "kube-idler")
        pod = cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=hub.jupyter.org%2Fusername%3Dkube-idler")["items"][0]
        key = f"{NAMESPACE}/{pod['metadata']['name']}"
        dcgm.series[key] = (0.8, 2048)  # the slice is busy, 2 GiB in use

        def use():
            servers = hub.api().get(f"{hub.url}/hub/api/mlaas/usage").json()["servers"]
            return next((s["gpu_use"] for s in servers if s["user"] == "kube-idler"), None)

        assert wait_until(lambda: (use() or {}).get("utilization") == 80, 30), use()
        assert use() == {"devices": 1, "utilization": 80, "memory_used": 2 * 2**30}

        dcgm.series[key] = (0.0, 2048)  # unused from now on, while the user keeps working
        idle_from, warned, stopped = time.monotonic(), False, False
        while time.monotonic() - idle_from < 70:
            r = hub.api(token).get(f"{hub.url}/user/kube-idler/api/contents")
            if r.status_code != 200:
                stopped = True
                break
            warned = warned or any(f["name"].startswith("GPU idle - this server stops at") for f in r.json()["content"])
            time.sleep(2)
        assert warned and stopped, (warned, stopped)
        assert wait_until(lambda: not cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector="
                                                     f"hub.jupyter.org%2Fusername%3Dkube-idler")["items"], 60)
        # the culler logs once the hub answered its stop call, which may come just after the pod went
        assert wait_until(lambda: "GPU culler: stopped kube-idler, its GPUs idle for" in hub.hub_log(), 30), \
            [line for line in hub.hub_log().splitlines() if "GPU culler" in line]
    finally:
        dcgm.series.clear()
        stop_server(hub, "kube-idler")
