"""Federation: one hub, three clusters as three sites (tests/cluster), profiles that say where
they may run. A spawn lands on the allowed site with the most room; with one site's API server
stopped, new spawns go to the others and the form (in Chromium) says that site cannot be
reached; when it is back, it is used again.

The hub uses, at each site, its own ServiceAccount's token with the roles the charts ship
(z2jh's namespaced Role, our read-only ClusterRole), never admin credentials.

Simulated: the nodes (KWOK); the test kubelet (tests/cluster/pod_runner.py) runs each user's real
single-user server from the user image's environment, as the pod's account, on the pod's IP (each
site its own range)."""

from __future__ import annotations

import shutil

import pytest
import yaml

from cluster.cluster import Cluster, binaries, in_range, pod_range
from cluster.pod_runner import PodRunner, wait_until
from cluster.upstream_rbac import apply_upstream_rbac
from conftest import browser_login
from helpers import ARTIFACTS, RunningPlatform, ensure_user, error_message, start_platform, state_root, user_token
from test_upstream_charts import charts_dir

pytestmark = pytest.mark.platform
NAMESPACE = "mlaas-users"
SITES = {  # name -> (pod IP range, node pools)
    "fed-a": (pod_range(3), [{"name": "gpu", "count": 1, "cpu": "8", "memory": "32Gi",
                                 "extended": {"nvidia.com/gpu": "1"},
                                 "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
                                 "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}]),
    "fed-b": (pod_range(4), [{"name": "gpu", "count": 1, "cpu": "8", "memory": "32Gi",
                                 "extended": {"nvidia.com/gpu": "2"},
                                 "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                                 "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}]),
    "fed-c": (pod_range(5), [{"name": "cpu", "count": 1, "cpu": "8", "memory": "32Gi"}]),
}
PROFILES = {"profiles": [
    {"slug": "gpu-ab", "display_name": "One GPU at site A or B", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
     "gpu": {"count": 1}, "groups": ["*"], "sites": ["fed-a", "fed-b"]},
    {"slug": "gpu-b", "display_name": "One GPU at site B", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
     "gpu": {"count": 1}, "groups": ["*"], "sites": ["fed-b"]},
    {"slug": "cpu-bc", "display_name": "CPU at site B or C", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
     "groups": ["*"], "sites": ["fed-b", "fed-c"], "default": True},
]}


@pytest.fixture(scope="module")
def federation():
    clusters, runners, accounts = {}, [], {}
    profiles = state_root() / "federation-profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    (profiles / "federation.yaml").write_text(yaml.safe_dump(PROFILES))
    try:
        for name, (cidr, pools) in SITES.items():
            cluster = Cluster(name, state_root() / f"cluster-{name}", binaries(), pod_cidr=cidr)
            nodes = cluster.state / "nodes.yaml"
            cluster.state.mkdir(parents=True, exist_ok=True)
            nodes.write_text(yaml.safe_dump({"pools": pools}))
            clusters[name] = cluster
            cluster.start(nodes)
            cluster.request("POST", "/api/v1/namespaces", {"metadata": {
                "name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
            apply_upstream_rbac(cluster, NAMESPACE, charts_dir(), releases=("jupyterhub",), ours=True)
            accounts[name] = cluster.service_account_kubeconfig(NAMESPACE, "hub", cluster.state / "hub.kubeconfig")
            runners.append(PodRunner(cluster, NAMESPACE, cluster.state / "pods").start())
        hub = start_platform(
            "federation", profiles=profiles, spawner="kubernetes",
            kubernetes={"namespace": NAMESPACE,
                        "sites": [{"name": n, "kubeconfig": str(accounts[n])} for n in clusters]},
            dask_gateway={"enabled": False}, data={"enabled": False},
        )
        yield {"hub": hub, "clusters": clusters}
        hub.platform.stop()
        shutil.copytree(hub.log_dir, ARTIFACTS / "federation-logs", dirs_exist_ok=True)
    finally:
        for runner in runners:
            runner.stop()
        for cluster in clusters.values():
            cluster.stop()


def offered(hub: RunningPlatform, token: str) -> tuple[dict, list[str]]:
    r = hub.api(token).get(f"{hub.url}/hub/api/mlaas/profiles")
    r.raise_for_status()
    return {p["slug"]: p for p in r.json()["profiles"]}, r.json()["notices"]


def ready(hub: RunningPlatform, user: str) -> bool:
    server = hub.api().get(f"{hub.url}/hub/api/users/{user}").json().get("servers", {}).get("")
    return bool(server and server.get("ready"))


def pods(cluster: Cluster) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]}


def spawn(hub: RunningPlatform, user: str, profile: str):
    ensure_user(hub, user, [])
    token = user_token(hub, user)
    return token, hub.api(token).post(f"{hub.url}/hub/api/users/{user}/server", json={"profile": profile})


def stop_all(hub: RunningPlatform, clusters: dict[str, Cluster], users: list[str]) -> None:
    for user in users:
        hub.api().delete(f"{hub.url}/hub/api/users/{user}/server")
    for cluster in clusters.values():
        assert wait_until(lambda: not pods(cluster), 60), f"pods left at {cluster.name}: {list(pods(cluster))}"


def test_spawns_go_to_the_allowed_site_with_the_most_room(federation):
    hub, clusters = federation["hub"], federation["clusters"]
    ensure_user(hub, "fed-1", [])
    token = user_token(hub, "fed-1")
    assert wait_until(lambda: offered(hub, token)[0]["gpu-ab"]["capacity"] == "3 of 3 free", 30), offered(hub, token)
    profiles, notices = offered(hub, token)
    assert profiles["gpu-ab"]["sites"] == "at fed-a 1 free, fed-b 2 free"
    assert profiles["gpu-b"]["sites"] == "at fed-b 2 free"
    assert notices == []

    placed = {}
    try:
        for user in ("fed-1", "fed-2", "fed-3"):  # fed-b has 2 free, then a tie (fed-a first), then fed-b
            _, r = spawn(hub, user, "gpu-ab")
            assert r.status_code in (201, 202), error_message(r)
            assert wait_until(lambda: ready(hub, user), 90), f"{user}'s server did not become ready"
            placed[user] = next(name for name, c in clusters.items() if f"jupyter-{user}" in pods(c))
            status = hub.api(user_token(hub, user)).get(f"{hub.url}/user/{user}/api/status")
            assert status.status_code == 200, status.text  # reached at the pod's IP on its site
        assert placed == {"fed-1": "fed-b", "fed-2": "fed-a", "fed-3": "fed-b"}
        usage = hub.api().get(f"{hub.url}/hub/api/mlaas/usage").json()
        assert {u["user"]: u["site"] for u in usage["servers"]} == placed  # what the admins' usage view shows
        assert all(u["gpus"] == 1 and u["devices"] == [] for u in usage["servers"])  # the cluster hands out GPUs
        assert usage["devices"] is None  # no local GPU inventory is offered for a cluster's servers
        pod = pods(clusters["fed-a"])["jupyter-fed-2"]
        assert pod["spec"]["nodeName"] == "fed-a-gpu-0" and in_range(pod["status"]["podIP"], clusters["fed-a"].pod_cidr)

        assert wait_until(lambda: offered(hub, token)[0]["gpu-ab"]["available"] is False, 30)
        _, refused = spawn(hub, "fed-4", "gpu-ab")
        assert refused.status_code == 409
        assert "at fed-a: none free: all GPUs are in use; at fed-b: none free" in error_message(refused)
        assert not any("jupyter-fed-4" in pods(c) for c in clusters.values())
    finally:
        stop_all(hub, clusters, ["fed-1", "fed-2", "fed-3", "fed-4"])


def test_a_site_whose_api_server_is_down_is_skipped_and_named_in_the_form(federation, browser):
    hub, clusters = federation["hub"], federation["clusters"]
    ensure_user(hub, "fed-5", [])
    token = user_token(hub, "fed-5")
    clusters["fed-b"].stop_apiserver()
    try:
        assert wait_until(lambda: offered(hub, token)[1], 30), "the hub did not notice that fed-b is down"
        profiles, notices = offered(hub, token)
        assert notices == ["Site fed-b cannot be reached; servers start at the other sites."]  # no address for users
        assert profiles["gpu-ab"]["capacity"] == "1 of 1 free"
        assert profiles["gpu-ab"]["sites"] == "at fed-a 1 free; fed-b cannot be reached"
        assert profiles["gpu-b"]["unavailable_reason"] == "site fed-b is unreachable"

        # what a person sees
        page = browser.new_page()
        browser_login(page, hub.url, "carol", hub.password("carol"))
        page.goto(f"{hub.url}/hub/spawn")
        page.wait_for_selector(".mlaas-notice")
        assert "Site fed-b cannot be reached" in page.inner_text(".mlaas-notice")
        gpu_b = page.locator('[data-profile="gpu-b"]')
        assert "Unavailable: site fed-b is unreachable" in gpu_b.inner_text()
        assert gpu_b.locator("input").is_disabled()
        assert "fed-b cannot be reached" in page.locator('[data-profile="cpu-bc"]').inner_text()
        page.close()

        # new spawns go to the sites that are up
        _, r = spawn(hub, "fed-5", "cpu-bc")
        assert r.status_code in (201, 202), error_message(r)
        assert wait_until(lambda: ready(hub, "fed-5"), 90)
        assert "jupyter-fed-5" in pods(clusters["fed-c"])
        _, refused = spawn(hub, "fed-6", "gpu-b")
        assert refused.status_code == 409 and "site fed-b is unreachable" in error_message(refused)
        stop_all(hub, {n: c for n, c in clusters.items() if n != "fed-b"}, ["fed-5"])
    finally:
        clusters["fed-b"].start_apiserver()

    # back: the site is offered and used again
    assert wait_until(lambda: not offered(hub, token)[1], 60), offered(hub, token)
    _, r = spawn(hub, "fed-6", "gpu-b")
    assert r.status_code in (201, 202), error_message(r)
    try:
        assert wait_until(lambda: ready(hub, "fed-6"), 90)
        assert "jupyter-fed-6" in pods(clusters["fed-b"])
    finally:
        stop_all(hub, clusters, ["fed-6"])
