"""Federation beyond one machine: the chart-deployed hub of site A (tests/deployment.py) starts
servers at site B, another machine, and reaches them only through what site B exposes.

Site B is its own network (tests/cluster/netns.py): its cluster's pods and Services live in a
network namespace joined to site A's machine by one link. Site A's machine has a route to site
B's ingress controller (Traefik 3.3.5, the site's, with its Kubernetes Ingress provider, behind a
LoadBalancer address) and to site B's API server, nothing else; site B may connect to site A's
public address (the proxy's load balancer) only, so the hub's internal Service and pod IPs are
out of its reach. Site B runs our chart's RBAC and NetworkPolicies with the remote-site values.

Shown: alice picks a site-B profile in Chromium, signs in to her JupyterLab there (the OAuth
exchange from her pod to the hub's public URL), runs code in a kernel (websockets through both
proxies); the hub made a Service and an Ingress for her server, owned by the pod and gone with
it; the NetworkPolicies of both sites, as deployed, allow exactly these paths.

Simulated: as in tests/test_deployment.py (KWOK nodes; images as environments); the two machines
are two network namespaces of one kernel; NetworkPolicies are not enforced (no CNI), so they are
judged by tests/netpol.py on the objects the API servers hold."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys

import pytest
import requests
import yaml

from cluster.cluster import Cluster, binaries, pod_range
from cluster.images import Images, image_programs
from cluster.kubelet import Kubelet
from cluster.netns import RemoteMachine
from cluster.pod_runner import wait_until
from cluster.provisioner import Provisioner
from cluster.services import ServiceNetwork
from cluster.upstream_rbac import apply_upstream_rbac, our_chart_objects
from conftest import browser_login, needs_root
from deployment import NAMESPACE, Deployment
from helpers import ARTIFACTS, run_in_kernel, state_root, user_token
from netpol import Endpoint, connection_allowed
from test_upstream_charts import charts_dir

pytestmark = [pytest.mark.platform, needs_root]

SITE_A_RANGE, SITE_B_RANGE = pod_range(10), pod_range(11)  # Deployment's cluster uses pod_range(10)
PUBLIC_A = str(ipaddress.ip_network(SITE_A_RANGE).broadcast_address - 1)  # Deployment's public address
INGRESS_B = str(ipaddress.ip_network(SITE_B_RANGE).broadcast_address - 1)  # site B's ingress load balancer
INGRESS_NS = "ingress"
INGRESS_CONTROLLER = {"app.kubernetes.io/name": "traefik"}
PROFILES = {"profiles": [
    {"slug": "cpu-here", "display_name": "CPU at site A", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
     "groups": ["*"], "sites": ["site-a"], "default": True},
    {"slug": "cpu-there", "display_name": "CPU at site B", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
     "groups": ["*"], "sites": ["site-b"]},
]}
REMOTE_VALUES = {  # our chart at site B, as docs/deploy.md §8 says
    "site": "site-b",
    "rbac": {"serverIngresses": True},
    "networkPolicy": {"serversReachableFrom": [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": INGRESS_NS}},
        "podSelector": {"matchLabels": INGRESS_CONTROLLER}}]},
}
API_PATHS = {"Ingress": "/apis/networking.k8s.io/v1/namespaces/{ns}/ingresses",
             "NetworkPolicy": "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"}


def ingress_controller(cluster: Cluster) -> None:
    """Site B's own ingress controller: Traefik with its Kubernetes Ingress provider and the
    permissions its documentation lists, behind a LoadBalancer Service."""
    req = cluster.request
    req("POST", "/api/v1/namespaces", {"metadata": {"name": INGRESS_NS}})
    req("POST", f"/api/v1/namespaces/{INGRESS_NS}/serviceaccounts", {"metadata": {"name": "traefik"}})
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    req("POST", f"{rbac}/clusterroles", {"metadata": {"name": "traefik"}, "rules": [
        {"apiGroups": [""], "resources": ["services", "secrets", "nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "ingressclasses"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses/status"], "verbs": ["update"]}]})
    req("POST", f"{rbac}/clusterrolebindings", {
        "metadata": {"name": "traefik"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                                     "name": "traefik"},
        "subjects": [{"kind": "ServiceAccount", "name": "traefik", "namespace": INGRESS_NS}]})
    req("POST", "/apis/networking.k8s.io/v1/ingressclasses", {
        "metadata": {"name": "site-b-traefik"}, "spec": {"controller": "traefik.io/ingress-controller"}})
    req("POST", f"/api/v1/namespaces/{INGRESS_NS}/pods", {
        "metadata": {"name": "traefik", "labels": INGRESS_CONTROLLER},
        "spec": {"serviceAccountName": "traefik", "containers": [{
            "name": "traefik", "image": "traefik:v3.3.5",
            "args": ["--entrypoints.web.address=:8000", "--providers.kubernetesingress=true", "--log.level=INFO"],
            "ports": [{"containerPort": 8000, "name": "web"}]}]}})
    req("POST", f"/api/v1/namespaces/{INGRESS_NS}/services", {
        "metadata": {"name": "traefik"},
        "spec": {"type": "LoadBalancer", "loadBalancerIP": INGRESS_B, "selector": INGRESS_CONTROLLER,
                 "ports": [{"name": "web", "port": 80, "targetPort": 8000}]}})


@pytest.fixture(scope="module")
def remote():
    """Site B: its machine, cluster, storage, ingress controller and our chart's remote-site parts."""
    state = state_root() / "remote-site-b"
    shutil.rmtree(state, ignore_errors=True)
    machine = RemoteMachine("mlaas-site-b").start()
    stoppers = [machine.stop]
    try:
        cluster = Cluster("site-b", state / "cluster", binaries(), pod_cidr=SITE_B_RANGE, netns=machine.name,
                          address=machine.local)
        cluster.state.mkdir(parents=True, exist_ok=True)
        nodes = cluster.state / "nodes.yaml"
        nodes.write_text(yaml.safe_dump({"pools": [{"name": "cpu", "count": 1, "cpu": "16", "memory": "64Gi"}]}))
        cluster.start(nodes)
        stoppers.append(cluster.stop)
        machine.allow(machine.local, cluster.port)  # its pods reach their own API server
        machine.allow(PUBLIC_A, 80)  # and the hub's public address, nothing else of site A
        machine.expose(INGRESS_B)  # site A reaches site B's ingress controller, nothing else of its network
        cluster.request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted"}}})
        provisioner = Provisioner(cluster, state / "volumes")
        provisioner.storage_class("standard", True)  # users' home claims
        stoppers.append(provisioner.start().stop)
        apply_upstream_rbac(cluster, NAMESPACE, charts_dir(), releases=("jupyterhub",), ours=True,
                            our_values=REMOTE_VALUES)
        for policy in our_chart_objects(NAMESPACE, REMOTE_VALUES, kinds=("NetworkPolicy",)):
            cluster.request("POST", API_PATHS["NetworkPolicy"].format(ns=NAMESPACE), policy)
        kubeconfig = cluster.service_account_kubeconfig(NAMESPACE, "hub", cluster.state / "hub.kubeconfig")
        network = ServiceNetwork(cluster, state / "network").start()
        stoppers.append(network.stop)
        kubelet = Kubelet(cluster, Images(image_programs()), state / "kubelet", network).start()
        stoppers.append(kubelet.stop)
        ingress_controller(cluster)
        yield {"cluster": cluster, "machine": machine, "kubeconfig": kubeconfig.read_text(), "kubelet": kubelet}
    finally:
        for stop in reversed(stoppers):
            try:
                stop()
            except Exception as e:  # keep stopping the rest
                print(f"site B stop: {e}", file=sys.stderr)
        logs = ARTIFACTS / "remote-site-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (state / "kubelet" / "logs").glob("*.log"):
            (logs / log.name).write_bytes(log.read_bytes())


@pytest.fixture(scope="module")
def site(remote):
    """Site A's hub, federated with site B through site B's ingress (custom.mlaas.sites)."""
    state = state_root() / "remote-site-a"
    profiles = state / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    (profiles / "remote.yaml").write_text(yaml.safe_dump(PROFILES))
    hub_values = {
        "cull": {"enabled": False},
        "custom": {"mlaas": {"sites": {
            "site-a": "in-cluster",
            "site-b": {"kubeconfig": "/etc/mlaas/sites/site-b.yaml", "serversUrl": f"http://{INGRESS_B}",
                       "ingressClassName": "site-b-traefik"}}}},
        "hub": {"extraFiles": {"site-b": {"mountPath": "/etc/mlaas/sites/site-b.yaml",
                                          "stringData": remote["kubeconfig"]}}},
    }
    deployment = Deployment(state, charts_dir(), profiles=profiles, hub_values=hub_values)
    try:
        deployment.start()
        assert deployment.public_ip == PUBLIC_A
        yield deployment
    finally:
        deployment.stop()
        logs = ARTIFACTS / "remote-site-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in (state / "kubelet" / "logs").glob(f"{NAMESPACE}_hub*.log"):
            (logs / f"site-a-{log.name}").write_bytes(log.read_bytes())


PROBE = """
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        sys.exit(0 if "version" in json.loads(r.read()) else 1)
except Exception:
    sys.exit(1)
"""


def answers(url: str, machine: RemoteMachine | None = None) -> bool:
    """A JupyterHub or Jupyter server answers its API at `url`, from this machine or from the remote
    one. (The machine's own network accepts any TCP connection to an address it does not know and
    answers it itself, so a connection alone proves nothing.)"""
    argv = ["/usr/bin/python3", "-c", PROBE, url]
    return (machine.run(*argv) if machine else subprocess.run(argv, capture_output=True, timeout=30)).returncode == 0


def remote_objects(cluster: Cluster, kind: str) -> dict[str, dict]:
    path = API_PATHS.get(kind, f"/api/v1/namespaces/{{ns}}/{kind.lower()}s").format(ns=NAMESPACE)
    return {o["metadata"]["name"]: o for o in cluster.request("GET", path)["items"]}


def test_a_researcher_gets_jupyterlab_at_the_other_site_through_its_ingress(site, remote, browser):
    """Chromium: sign in at site A's public address, pick the site-B profile, JupyterLab opens
    (served by the pod at site B through site B's ingress; the server's OAuth exchange with the hub
    goes to the hub's public URL, the only address of site A that site B reaches). A kernel runs
    there; the pod was told the public hub URL, never the hub's in-cluster name."""
    cluster, machine = remote["cluster"], remote["machine"]
    hub_pod = site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=component%3Dhub")["items"][0]
    # the two machines are as separate as the test says: site B reaches site A's public address only
    assert answers(f"{site.url}/hub/api", machine)
    assert not answers(f"http://{hub_pod['status']['podIP']}:8081/hub/api", machine)

    page = browser.new_page()
    try:
        browser_login(page, site.url, "alice", site.password("alice"))
        page.goto(f"{site.url}/hub/spawn")
        there = page.locator('[data-profile="cpu-there"]')
        assert "site-b" in there.inner_text()
        there.locator("input").check()
        page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
        page.wait_for_selector(".jp-Launcher", timeout=180_000)
        assert page.url.startswith(f"{site.url}/user/alice/")
    finally:
        page.close()

    pods = remote_objects(cluster, "Pod")
    assert "jupyter-alice" in pods, list(pods)
    assert not any(p["metadata"]["name"] == "jupyter-alice"
                   for p in site.cluster.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"])
    pod = pods["jupyter-alice"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["JUPYTERHUB_API_URL"] == f"{site.url}/hub/api"
    assert env["JUPYTERHUB_ACTIVITY_URL"] == f"{site.url}/hub/api/users/alice/activity"
    assert not answers(f"http://{pod['status']['podIP']}:8888/user/alice/api")  # site A has no route to site B's pods
    assert answers(f"http://{INGRESS_B}/user/alice/api")  # but to site B's ingress

    token = user_token(site, "alice")
    out = run_in_kernel(site, "alice", token, "import os, socket\nprint(socket.gethostname(), os.environ['JUPYTERHUB_API_URL'])")
    assert out["error"] is None, out
    assert out["stdout"].split() == ["jupyter-alice", f"{site.url}/hub/api"]
    # experiment tracking from site B: through site A's public address (its Service is site A's)
    assert env["MLFLOW_TRACKING_URI"] == f"{site.url}/services/mlflow"
    logged = run_in_kernel(site, "alice", token, "import mlflow\nwith mlflow.start_run() as run:\n"
                           "    mlflow.log_metric('loss', 0.5)\nprint(run.info.run_id)", timeout=120)
    assert logged["error"] is None, logged
    run = requests.get(f"{site.url}/services/mlflow/api/2.0/mlflow/runs/get", timeout=30,
                       params={"run_id": logged["stdout"].split()[-1]},
                       headers={"Authorization": f"Bearer {token}", "X-MLFLOW-WORKSPACE": env["MLFLOW_WORKSPACE"]})
    assert run.status_code == 200 and run.json()["run"]["data"]["metrics"][0]["value"] == 0.5, run.text

    # what the hub made at site B for it: a Service and an Ingress at alice's path, owned by her pod
    service, ingress = remote_objects(cluster, "Service")["jupyter-alice"], remote_objects(cluster, "Ingress")["jupyter-alice"]
    for obj in (service, ingress):
        assert [(o["kind"], o["name"], o["uid"]) for o in obj["metadata"]["ownerReferences"]] == \
            [("Pod", "jupyter-alice", pod["metadata"]["uid"])]
    assert ingress["spec"]["ingressClassName"] == "site-b-traefik"
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert (path["path"], path["pathType"], path["backend"]["service"]["name"]) == ("/user/alice/", "Prefix", "jupyter-alice")


def test_another_user_cannot_use_alices_path_at_the_other_sites_ingress(site, remote):
    """Site B's ingress is an address anyone at the site may reach: alice's server there still
    asks the hub who a request is from, so bob's token and no token get nothing of hers."""
    ensure = site.api().get(f"{site.url}/hub/api/users/bob")
    if ensure.status_code == 404:
        site.api().post(f"{site.url}/hub/api/users/bob").raise_for_status()
    bob = user_token(site, "bob")
    direct = f"http://{INGRESS_B}/user/alice/api/contents"
    assert remote["machine"].run("/usr/bin/python3", "-c", "import urllib.request, sys\n"
                                 f"r = urllib.request.urlopen(urllib.request.Request({direct!r}, headers="
                                 f"{{'Authorization': 'token {bob}'}}), timeout=10)\nsys.exit(0 if r.status == 200 else 1)"
                                 ).returncode != 0  # from site B's own network, with bob's token: refused
    through_hub = site.api(bob).get(f"{site.url}/user/alice/api/contents", allow_redirects=False)
    assert through_hub.status_code in (302, 403), through_hub.status_code
    assert site.api(bob).get(direct, allow_redirects=False).status_code in (302, 403)
    alice = user_token(site, "alice")
    assert site.api(alice).get(f"{site.url}/user/alice/api/contents").status_code == 200


def test_the_network_policies_of_both_sites_allow_exactly_the_federation_paths(site, remote):
    """The NetworkPolicies as the two API servers hold them (site A: Zero to JupyterHub's and
    ours; site B: ours with the remote-site values), judged by tests/netpol.py: the hub reaches
    site B's API server and ingress, the proxy reaches site B's ingress, site B's ingress
    controller reaches users' servers, users' servers reach the hub's public address, and no
    server reaches another's."""
    cluster, machine = remote["cluster"], remote["machine"]
    policies_a = list(remote_objects(site.cluster, "NetworkPolicy").values())
    policies_b = list(remote_objects(cluster, "NetworkPolicy").values())
    assert {p["metadata"]["name"] for p in policies_b} >= {"mlaas-singleuser"}
    ns = {"kubernetes.io/metadata.name": NAMESPACE}

    def pod(c: Cluster, name_or_component: str) -> Endpoint:
        items = c.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
        p = next(i for i in items if name_or_component in (i["metadata"]["name"], i["metadata"]["labels"].get("component")))
        return Endpoint(p["status"]["podIP"], p["metadata"]["labels"], NAMESPACE, ns)

    hub, proxy, alice_b = pod(site.cluster, "hub"), pod(site.cluster, "proxy"), pod(cluster, "jupyter-alice")
    bob_b = Endpoint(str(ipaddress.ip_address(alice_b.ip) + 1), {**alice_b.pod_labels, "hub.jupyter.org/username": "bob"},
                     NAMESPACE, ns)
    ingress_b, api_b, public_a = Endpoint(INGRESS_B), Endpoint(machine.local), Endpoint(PUBLIC_A)
    controller = cluster.request("GET", f"/api/v1/namespaces/{INGRESS_NS}/pods/traefik")
    traefik = Endpoint(controller["status"]["podIP"], controller["metadata"]["labels"], INGRESS_NS,
                       {"kubernetes.io/metadata.name": INGRESS_NS})

    assert connection_allowed(policies_a, hub, api_b, cluster.port)
    assert connection_allowed(policies_a, hub, ingress_b, 80)
    assert connection_allowed(policies_a, proxy, ingress_b, 80)
    assert connection_allowed(policies_b, traefik, alice_b, 8888)
    assert connection_allowed(policies_b, alice_b, public_a, 80)
    assert not connection_allowed(policies_b, bob_b, alice_b, 8888)
    assert not connection_allowed(policies_b, alice_b, Endpoint("169.254.169.254"), 80)  # the metadata address


def test_stopping_the_server_removes_its_pod_service_and_ingress_at_the_other_site(site, remote):
    cluster = remote["cluster"]
    r = site.api().delete(f"{site.url}/hub/api/users/alice/server")
    assert r.status_code in (202, 204), r.text
    gone = lambda: not any("jupyter-alice" in remote_objects(cluster, kind) for kind in ("Pod", "Service", "Ingress"))  # noqa: E731
    assert wait_until(gone, 120), {kind: list(remote_objects(cluster, kind)) for kind in ("Pod", "Service", "Ingress")}
    assert wait_until(lambda: site.api().get(f"{site.url}/hub/api/users/alice").json()["servers"] == {}, 30)
