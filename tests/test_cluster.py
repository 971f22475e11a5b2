"""A real Kubernetes control plane (etcd, kube-apiserver with Pod Security admission,
controller-manager, scheduler; built from the Go module proxy by
tests/cluster/build.sh) with KWOK's simulated GPU/MIG nodes: what no unit test can show.

Simulated: the nodes (KWOK marks scheduled pods Running; nothing is executed in them) and the
storage (static PersistentVolumes stand in for a provisioner)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from urllib.error import HTTPError

import pytest
import yaml

from cluster.cluster import Cluster, binaries, in_range, pod_range
from helpers import state_root
from mlaas.deploy import site_values

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "charts" / "sites" / "site-a"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("test-a", state_root() / "cluster-test-a", binaries(), pod_cidr=pod_range(1))
    c.start(REPO / "tests" / "cluster" / "nodes.yaml")
    yield c
    c.stop()


def wait_for(check, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except HTTPError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def test_the_control_plane_is_the_pinned_kubernetes(cluster):
    version = cluster.request("GET", "/version")
    assert version["gitVersion"] == "v1.33.13" and version["minor"] == "33"


def test_kwok_gpu_nodes_are_ready_with_gpu_and_mig_capacity(cluster):
    def ready_nodes():
        nodes = cluster.request("GET", "/api/v1/nodes")["items"]
        ready = [n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))]
        return ready if len(ready) == 3 else None

    nodes = {n["metadata"]["name"]: n for n in wait_for(ready_nodes, what="3 ready KWOK nodes")}
    gpu = nodes["test-a-a100-mig-0"]
    assert gpu["status"]["allocatable"]["nvidia.com/mig-3g.20gb"] == "4"
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert gpu["spec"]["taints"][0]["key"] == "nvidia.com/gpu"


def helm(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
                          capture_output=True, text=True, timeout=300)


def test_helm_installs_our_chart_into_a_restricted_namespace_and_its_pods_run(cluster, tmp_path):
    for ns, labels in [("mlaas", {"pod-security.kubernetes.io/enforce": "restricted"}), ("gpu-operator", {})]:
        cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns, "labels": labels}})
    generated, _ = site_values(SITE)
    (tmp_path / "generated.yaml").write_text(yaml.safe_dump(generated))
    values = yaml.safe_load((SITE / "values.yaml").read_text())
    # static volumes for the chart's claims (no provisioner in the test cluster)
    claims = [("cache", values["xcache"]["storage"]["storageClassName"], values["xcache"]["storage"]["size"])] * len(
        values["xcache"]["origins"]) + [("project", values["projects"]["storageClassName"], values["projects"]["size"])] * len(
        generated["projects"]["claims"]) + [("tracking", values.get("tracking", {}).get("storage", {}).get("storageClassName", ""), "50Gi")]
    for i, (kind, storage_class, size) in enumerate(claims):
        mode = "ReadWriteMany" if kind == "project" else "ReadWriteOnce"
        cluster.request("POST", "/api/v1/persistentvolumes", {
            "metadata": {"name": f"pv-{kind}-{i}"},
            "spec": {"capacity": {"storage": size}, "accessModes": [mode], "storageClassName": storage_class,
                     "hostPath": {"path": f"/tmp/pv-{i}"}, "persistentVolumeReclaimPolicy": "Delete"},
        })
    r = helm(cluster, "install", "mlaas-hub", str(REPO / "charts" / "mlaas-hub"), "--namespace", "mlaas",
             "-f", str(SITE / "values.yaml"), "-f", str(tmp_path / "generated.yaml"), "--wait", "--timeout", "180s")
    assert r.returncode == 0, r.stdout + r.stderr
    pods = cluster.request("GET", "/api/v1/namespaces/mlaas/pods")["items"]
    names = {p["metadata"]["name"] for p in pods}
    tracking = {n for n in names if n.startswith("mlaas-tracking-")}  # the Deployment's one pod
    assert names - tracking == {f"xcache-{o['name']}-0" for o in values["xcache"]["origins"]} and len(tracking) == 1
    for p in pods:
        assert p["status"]["phase"] == "Running" and in_range(p["status"]["podIP"], cluster.pod_cidr), p["status"]
    cm = cluster.request("GET", "/api/v1/namespaces/gpu-operator/configmaps/mlaas-mig-parted-config")
    assert "mlaas-a100-mig" in cm["data"]["config.yaml"]
    pvcs = cluster.request("GET", "/api/v1/namespaces/mlaas/persistentvolumeclaims")["items"]
    assert all(p["status"]["phase"] == "Bound" for p in pvcs) and len(pvcs) == len(claims)


@pytest.mark.parametrize("slug", ["cpu-small", "gpu-a100", "mig-3g-20gb"])
def test_the_pods_our_spawner_makes_are_admitted_by_pod_security_restricted(cluster, slug):
    """The real API server's Pod Security admission ("restricted", enforced on a namespace of its
    own) judges the pod manifests KubeProfileSpawner builds for shipped CPU, GPU and MIG profiles
    (server-side dry run: admitted, nothing created). A pod of ours it refused would fail here."""
    from test_kube import manifest

    ns = f"psa-{slug}"
    try:
        cluster.request("POST", "/api/v1/namespaces", {"metadata": {
            "name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                   "pod-security.kubernetes.io/enforce-version": "v1.33"}}})
    except HTTPError as e:
        assert e.code == 409
    pod = manifest(slug)
    pod["metadata"].pop("namespace", None)
    if pod["spec"].get("runtimeClassName"):  # what NVIDIA's GPU operator installs at a site
        try:
            cluster.request("POST", "/apis/node.k8s.io/v1/runtimeclasses",
                            {"metadata": {"name": pod["spec"]["runtimeClassName"]}, "handler": "nvidia"})
        except HTTPError as e:
            assert e.code == 409
    try:
        admitted = cluster.request("POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", pod)
    except HTTPError as e:
        raise AssertionError(f"the API server refused our {slug} pod: {json.loads(e.read())['message']}") from None
    assert admitted["metadata"]["namespace"] == ns and admitted["spec"]["containers"][0]["securityContext"][
        "runAsNonRoot"] is True
    assert cluster.request("GET", f"/api/v1/namespaces/{ns}/pods")["items"] == []  # a dry run created nothing


def test_make_k8s_up_runs_clusters_side_by_side_and_k8s_down_stops_them(tmp_path):
    """What a developer runs: two sites at once, each with its own nodes, then both stopped."""
    import sys

    script = REPO / "tests" / "cluster" / "cluster.py"
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("pools:\n  - {name: cpu, count: 1, cpu: '8', memory: 32Gi}\n")
    servers = {}
    try:
        for name in ("side-a", "side-b"):
            r = subprocess.run([sys.executable, str(script), "up", "--name", name, "--nodes", str(nodes),
                                "--state", str(tmp_path)], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"export KUBECONFIG={tmp_path / name / 'kubeconfig'}" in r.stdout
            servers[name] = yaml.safe_load((tmp_path / name / "kubeconfig").read_text())["clusters"][0]["cluster"]["server"]
        assert servers["side-a"] != servers["side-b"]
        for name in servers:
            kubectl_like = Cluster(name, tmp_path / name, Path("."))
            kubectl_like.port = int(servers[name].rsplit(":", 1)[1])
            kubectl_like._token = yaml.safe_load((tmp_path / name / "kubeconfig").read_text())["users"][0]["user"]["token"]
            names = [n["metadata"]["name"] for n in kubectl_like.request("GET", "/api/v1/nodes")["items"]]
            assert names == [f"{name}-cpu-0"]
    finally:
        for name in ("side-a", "side-b"):
            subprocess.run([sys.executable, str(script), "down", "--name", name, "--state", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    time.sleep(1)
    for name, server in servers.items():
        port = int(server.rsplit(":", 1)[1])
        import socket

        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{name}'s apiserver still listens after k8s-down"


def test_the_hubs_capacity_watch_needs_only_our_charts_read_only_cluster_role(cluster, tmp_path):
    """The hub's ServiceAccount, with its own token (no admin credentials): refused by RBAC until
    our chart's ClusterRole is bound to it, and the form says so instead of "unreachable"; with it,
    the watch sees the GPU nodes. The role grants reading Nodes and Pods, nothing else."""
    import asyncio

    from mlaas.capacity.kube import KubeCapacity
    from mlaas.profiles.model import Profile
    from kubernetes_asyncio.client import ApiClient

    from mlaas.spawners.kube_sites import _load_configuration

    cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": "rbac-probe"}})
    kubeconfig = cluster.service_account_kubeconfig("rbac-probe", "hub", tmp_path / "hub-sa.yaml")
    mig = Profile.model_validate({"slug": "mig", "display_name": "MIG", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
                                  "mig": "3g.20gb", "groups": ["*"]})

    async def watch_for(seconds: float) -> tuple[str | None, int]:
        cache = KubeCapacity()
        async with ApiClient(configuration=_load_configuration(str(kubeconfig))) as api:
            task = asyncio.ensure_future(cache.run(api, retry_seconds=0.3))
            await asyncio.sleep(seconds)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        availability = cache.availability(mig)
        return availability.reason, availability.free

    reason, free = asyncio.run(watch_for(2))
    assert reason is not None and "the hub may not list nodes, pods (RBAC, HTTP 403)" in reason and free == 0
    assert "unreachable" not in reason
    r = helm(cluster, "install", "mlaas-hub-rbac", str(REPO / "charts" / "mlaas-hub"), "--namespace", "rbac-probe",
             "--set", "xcache.enabled=false", "--set", "migManager.enabled=false", "--set", "tracking.enabled=false",
             "--set", "site=probe",
             "--set", "rbac.clusterRoleName=mlaas-hub-capacity-probe", "--wait", "--timeout", "60s")
    assert r.returncode == 0, r.stdout + r.stderr
    role = cluster.request("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/mlaas-hub-capacity-probe")
    assert {(tuple(rule["resources"]), tuple(rule["verbs"])) for rule in role["rules"]} == {
        (("nodes",), ("get", "list", "watch")), (("pods",), ("list", "watch"))}
    reason, free = asyncio.run(watch_for(3))
    assert reason is None and free == 4  # test-a's MIG node: 4 × 3g.20gb, none in use
