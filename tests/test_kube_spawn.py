"""The hub with KubeProfileSpawner against a real control plane (tests/cluster): a user logs in
through the dev IdP, sees capacity that comes from the cluster's nodes and pods, starts a MIG
profile; the real scheduler puts the pod on a node with that slice; the server is reached
through the proxy; stopping deletes the pod.

Simulated: the nodes (KWOK) and the kubelet's work; tests/cluster/pod_runner.py runs the real
single-user server with the pod's environment on the pod's (loopback) IP."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.cluster import Cluster, binaries
from cluster.pod_runner import PodRunner, wait_until
from helpers import ARTIFACTS, RunningPlatform, error_message, oidc_login, start_platform, state_root, user_token
from mlaas.deploy import chart_values

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.platform
NAMESPACE = "mlaas-users"


@pytest.fixture(scope="module")
def site():
    cluster = Cluster("spawn", state_root() / "cluster-spawn", binaries())
    cluster.start(REPO / "tests" / "cluster" / "nodes.yaml")
    cluster.request("POST", "/api/v1/namespaces", {"metadata": {
        "name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    runner = PodRunner(cluster, NAMESPACE, cluster.state / "pods").start()
    hub = start_platform(
        "kube", spawner="kubernetes",
        kubernetes={"kubeconfig": str(cluster.kubeconfig), "namespace": NAMESPACE},
        dask_gateway={"enabled": False}, data={"enabled": False},
    )
    install_chart(cluster, hub)
    yield {"cluster": cluster, "hub": hub, "runner": runner}
    hub.platform.stop()
    runner.stop()
    cluster.stop()
    shutil.copytree(hub.log_dir, ARTIFACTS / "kube-logs", dirs_exist_ok=True)


def install_chart(cluster: Cluster, hub: RunningPlatform) -> None:
    """Our chart in the users' namespace, as a site installs it: here it brings the group
    project volumes (static RWX volumes stand in for a storage provisioner)."""
    generated, _ = chart_values([hub.profiles_dir])
    values = {**generated, "site": "test", "xcache": {"enabled": False}, "migManager": {"enabled": False},
              "projects": {**generated["projects"], "storageClassName": "rwx-test", "size": "1Gi"}}
    values_file = cluster.state / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    for claim in generated["projects"]["claims"]:
        cluster.request("POST", "/api/v1/persistentvolumes", {
            "metadata": {"name": f"pv-{claim['name']}"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "rwx-test",
                     "hostPath": {"path": f"/tmp/{claim['name']}"}}})
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
    session, r = oidc_login(hub, "alice", "alice-pw")
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
    assert pod["status"]["podIP"].startswith("127.1.")

    status = hub.api(token).get(f"{hub.url}/user/alice/api/status")
    assert status.status_code == 200, status.text
    assert wait_until(lambda: offered(hub, token)["mig-atlas"]["capacity"] == "3 of 4 free", 30)

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
