"""The Kubernetes side without a cluster: pod manifests of KubeProfileSpawner (KubeSpawner's own
mock mode) for every shipped profile, validated against the real Kubernetes schema, and the
capacity cache fed with schema-valid Node and Pod objects (what a watch delivers)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient
from tornado import web
from traitlets.config import Config

from kube_objects import node, pod, validated
from mlaas.capacity.federation import Federation
from mlaas.capacity.kube import KubeCapacity
from mlaas.profiles import Profile, load_profile_dir
from mlaas.spawners.kube import KubeProfileSpawner, kube_capacity

REPO = Path(__file__).resolve().parents[1]
SHIPPED = load_profile_dir(REPO / "spawner_profiles")
A100 = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
POOL_TAINT = {"key": "mlaas.io/node-pool", "value": "atlas-reserved", "effect": "NoSchedule"}


class _Group:
    def __init__(self, name: str):
        self.name = name


class _User:
    """The slice of JupyterHub's User that the spawner reads (KubeSpawner's mock mode has no hub)."""

    id, admin = 1, False

    def __init__(self, name: str, groups: list[str]):
        self.name, self.url = name, f"/user/{name}/"
        self.groups = [_Group(g) for g in groups]


def cluster_nodes() -> list[dict]:
    return [
        node("gpu-1", extended={"nvidia.com/gpu": "8"}, labels=A100, taints=[GPU_TAINT]),
        node("mig-1", extended={"nvidia.com/mig-3g.20gb": "2", "nvidia.com/mig-1g.10gb": "4"}, labels=A100,
             taints=[GPU_TAINT]),
        node("atlas-1", extended={"nvidia.com/gpu": "4"},
             labels={**A100, "mlaas.io/node-pool": "atlas-reserved"}, taints=[GPU_TAINT, POOL_TAINT]),
        node("cpu-1", cpu="32", memory="128Gi"),
    ]


def spawner_for(user: str, groups: list[str], mig_strategy: str = "mixed") -> KubeProfileSpawner:
    c = Config()
    c.KubeProfileSpawner.profiles_dir = str(REPO / "spawner_profiles")
    c.KubeProfileSpawner.mig_strategy = mig_strategy
    c.KubeProfileSpawner.gpu_runtime_class = "nvidia"
    c.KubeProfileSpawner.watch_capacity = False  # the tests fill the cache with their own objects
    return KubeProfileSpawner(_mock=True, user=_User(user, groups), config=c)


def manifest(slug: str, groups=("atlas-ml", "ml-users"), mig_strategy="mixed") -> dict:
    cache = kube_capacity(mig_strategy)
    cache.replace("node", cluster_nodes() if mig_strategy == "mixed" else single_strategy_nodes())
    cache.replace("pod", [])

    async def build():
        s = spawner_for("alice", list(groups), mig_strategy)
        await s.apply_profile({"profile": slug})
        return ApiClient().sanitize_for_serialization(await s.get_pod_manifest())

    return asyncio.run(build())


def single_strategy_nodes() -> list[dict]:
    return [
        node("mig-single", extended={"nvidia.com/gpu": "2"},
             labels={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb", "nvidia.com/mig.strategy": "single"},
             taints=[GPU_TAINT]),
        node("gpu-1", extended={"nvidia.com/gpu": "8"}, labels=A100, taints=[GPU_TAINT]),
        node("cpu-1", cpu="32", memory="128Gi"),
    ]


@pytest.mark.parametrize("slug", [p.slug for p in SHIPPED.profiles])
def test_every_shipped_profile_makes_a_valid_restricted_pod(slug):
    profile = SHIPPED.get(slug)
    pod_obj = validated(manifest(slug))  # the Kubernetes 1.33 schema, strict: no unknown fields
    spec = pod_obj["spec"]
    container = spec["containers"][0]
    resources = container["resources"]
    assert float(resources["limits"]["cpu"]) == profile.cpu.limit
    assert int(resources["limits"]["memory"]) == profile.memory.limit
    assert float(resources["requests"]["cpu"]) == (profile.cpu.guarantee or profile.cpu.limit)
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not sc.get("privileged")
    assert pod_obj["metadata"]["labels"]["mlaas.io/profile"] == slug
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLAAS_PROFILE"] == slug
    tolerations = spec.get("tolerations") or []
    if profile.needs_accelerator:
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert spec["runtimeClassName"] == "nvidia"
    else:
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void" and "runtimeClassName" not in spec
        assert not any(r.startswith("nvidia.com/") for r in resources["limits"])
    if profile.gpu:
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == str(profile.gpu.count)
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        products = terms[0]["matchExpressions"][0]["values"]
        assert "NVIDIA-A100-SXM4-40GB" in products and all("A100" in p for p in products)
    if profile.mig:
        name = f"nvidia.com/mig-{profile.mig.profile}"
        assert resources["limits"][name] == resources["requests"][name] == str(profile.mig.count)
    if profile.node_pool:
        assert spec["nodeSelector"]["mlaas.io/node-pool"] == profile.node_pool
        assert {"key": "mlaas.io/node-pool", "operator": "Equal", "value": profile.node_pool,
                "effect": "NoSchedule"} in tolerations


def test_single_mig_strategy_requests_gpus_on_mig_labelled_nodes():
    spec = validated(manifest("mig-3g-20gb", mig_strategy="single"))["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    expr = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]
    assert expr["key"] == "nvidia.com/gpu.product" and "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb" in expr["values"]


def test_kube_spawner_applies_the_same_access_and_quota_checks():
    cache = kube_capacity("mixed")
    cache.replace("node", cluster_nodes())
    cache.replace("pod", [])

    async def forged():
        await spawner_for("bob", ["ml-users"]).apply_profile({"profile": "atlas-2xa100"})

    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(forged())
    assert refused.value.status_code == 403
    assert "reserved for the groups atlas-ml" in refused.value.log_message


# --- the capacity cache --------------------------------------------------------------------------
def fresh_cache(strategy="mixed") -> KubeCapacity:
    cache = KubeCapacity(strategy)
    cache.replace("node", cluster_nodes() if strategy == "mixed" else single_strategy_nodes())
    cache.replace("pod", [])
    return cache


def test_capacity_counts_nodes_minus_running_pods():
    cache = fresh_cache()
    gpu, mig3, mig1, pool = (SHIPPED.get(s) for s in ("gpu-a100", "mig-3g-20gb", "mig-1g-10gb", "atlas-2xa100"))
    assert (cache.availability(gpu).free, cache.availability(gpu).total) == (8, 8)  # the pool's GPUs are not for it
    assert cache.availability(pool).total == 2  # 4 reserved GPUs, 2 per server
    assert cache.availability(mig3).total == 2 and cache.availability(mig1).total == 4
    for i in range(5):
        cache.apply("pod", "ADDED", pod(f"p{i}", "gpu-1", {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"}))
    cache.apply("pod", "ADDED", pod("m0", "mig-1", {"cpu": "2", "memory": "8Gi", "nvidia.com/mig-3g.20gb": "1"}))
    cache.apply("pod", "ADDED", pod("pending", None, {"nvidia.com/gpu": "1"}, phase="Pending"))
    assert cache.availability(gpu).free == 3
    assert cache.availability(mig3).free == 1
    cache.apply("pod", "ADDED", pod("m1", "mig-1", {"nvidia.com/mig-3g.20gb": "1"}))
    none_free = cache.availability(mig3)
    assert none_free.free == 0 and none_free.reason == "none free: all MIG 3g.20gb slices are in use"
    cache.apply("pod", "MODIFIED", pod("m1", "mig-1", {"nvidia.com/mig-3g.20gb": "1"}, phase="Succeeded"))
    cache.apply("pod", "DELETED", pod("p0", "gpu-1", {"nvidia.com/gpu": "1"}))
    assert cache.availability(mig3).free == 1 and cache.availability(gpu).free == 4


def test_capacity_reasons_for_missing_hardware_unready_nodes_and_no_cluster():
    cache = fresh_cache()
    h100 = SHIPPED.get("gpu-a100").model_copy(update={"gpu": SHIPPED.get("gpu-a100").gpu.model_copy(update={"model": "H100"})})
    assert cache.availability(h100).reason == "no node of this platform has H100 GPUs"
    cache.apply("node", "MODIFIED", node("gpu-1", extended={"nvidia.com/gpu": "8"}, labels=A100, ready=False))
    unready = cache.availability(SHIPPED.get("gpu-a100"))
    assert unready.total == 0 and unready.reason == "the only node with A100 GPUs is not ready or cordoned"
    assert KubeCapacity().availability(SHIPPED.get("cpu-small")).reason.startswith("the cluster's capacity is not known yet")
    cache.unreachable = "ClientConnectorError: connection refused"
    assert "the cluster is unreachable" in cache.availability(SHIPPED.get("cpu-small")).reason


def test_single_strategy_capacity_and_reservations_for_spawns_in_flight():
    cache = fresh_cache("single")
    mig3 = SHIPPED.get("mig-3g-20gb")
    assert (cache.availability(mig3).free, cache.availability(mig3).total) == (2, 2)
    cache.reserve("jupyter-alice", mig3)  # submitted, pod not yet in the cache
    assert cache.availability(mig3).free == 1
    cache.apply("pod", "ADDED", pod("jupyter-alice", "mig-single", {"nvidia.com/gpu": "1"}))
    assert cache.reservations == {} and cache.availability(mig3).free == 1


def test_kube_form_shows_live_counts_from_the_cache():
    cache = kube_capacity("mixed")
    cache.replace("node", cluster_nodes())
    cache.replace("pod", [pod("x", "mig-1", {"nvidia.com/mig-1g.10gb": "3"})])

    async def form():
        return spawner_for("alice", ["atlas-ml", "ml-users"]).form_entries()

    entries = {e.profile.slug: e for e in asyncio.run(form())}
    assert entries["mig-1g-10gb"].capacity == "1 of 4 free"
    assert entries["gpu-a100"].capacity == "8 of 8 free"
    assert entries["cpu-small"].unavailable is None


# --- federation: several sites behind one hub ----------------------------------------------------
def site_cache(gpus: str) -> KubeCapacity:
    cache = KubeCapacity()
    cache.replace("node", [node("gpu-1", extended={"nvidia.com/gpu": gpus}, labels=A100, taints=[GPU_TAINT]),
                           node("cpu-1", cpu="32", memory="128Gi")])
    cache.replace("pod", [])
    return cache


def test_federation_adds_up_the_allowed_sites_and_places_where_most_is_free():
    gpu = SHIPPED.get("gpu-a100")
    fed = Federation({"site-a": site_cache("2"), "site-b": site_cache("4"), "site-c": site_cache("8")})
    only_ab = gpu.model_copy(update={"sites": ["site-a", "site-b"]})
    assert (fed.availability(only_ab).free, fed.availability(only_ab).total) == (6, 6)
    assert fed.where(only_ab) == "at site-a 2 free, site-b 4 free"
    assert fed.place(only_ab) == "site-b" and fed.place(gpu) == "site-c"
    for i in range(2):
        fed.sites["site-b"].apply("pod", "ADDED", pod(f"p{i}", "gpu-1", {"nvidia.com/gpu": "1"}))
    assert fed.place(only_ab) == "site-a"  # a tie goes to the site listed first
    fed.sites["site-a"].unreachable = "ClientConnectorError: connection refused"
    assert fed.place(only_ab) == "site-b"
    assert fed.unreachable() == {"site-a": "ClientConnectorError: connection refused"}
    assert fed.where(only_ab) == "at site-b 2 free; site-a cannot be reached"
    for i in range(2, 4):
        fed.sites["site-b"].apply("pod", "ADDED", pod(f"p{i}", "gpu-1", {"nvidia.com/gpu": "1"}))
    full = fed.availability(only_ab)
    assert full.free == 0 and fed.place(only_ab) is None
    assert full.reason == "site site-a is unreachable; at site-b: none free: all A100 GPUs are in use"
    elsewhere = gpu.model_copy(update={"sites": ["site-z"]})
    assert fed.availability(elsewhere).reason == "it runs only at site-z, which this hub does not serve"


def test_one_unnamed_cluster_ignores_sites_and_keeps_its_messages():
    gpu = SHIPPED.get("gpu-a100").model_copy(update={"sites": ["site-z"]})
    fed = Federation({"": site_cache("2")})
    assert not fed.federated and fed.where(gpu) is None
    assert fed.availability(gpu).free == 2 and fed.place(gpu) == ""


def test_a_profile_site_list_is_checked():
    base = SHIPPED.get("cpu-small").model_dump()
    for sites, message in ([], "leave `sites` out"), (["Site A"], "is not a site name"), (["a", "a"], "listed twice"):
        with pytest.raises(ValueError, match=message):
            Profile.model_validate({**base, "sites": sites})


def test_a_pod_that_is_not_seen_to_go_away_on_stop_keeps_its_quota_until_it_is_gone():
    """Seen at 1,000 nodes on 2 cores: KubeSpawner gave up waiting for a deleted pod, the hub let
    the group start more while the old pods still held their GPUs."""
    from mlaas.spawners.common import usage_ledger

    cache = kube_capacity("mixed")
    cache.replace("node", cluster_nodes())
    cache.replace("pod", [])

    async def run():
        s = spawner_for("alice", ["atlas-ml", "ml-users"])
        await s.apply_profile({"profile": "gpu-a100"})
        cache.apply("pod", "ADDED", pod(s.pod_name, "gpu-1", {"nvidia.com/gpu": "1"}, namespace=s.namespace))
        s.stop_failed()  # what stop() does when KubeSpawner's stop raises
        return s

    s = asyncio.run(run())
    lingering = [h for h in usage_ledger().holdings() if h.user == "alice"]
    assert len(lingering) == 1 and lingering[0].profile.slug == "gpu-a100"
    cache.apply("pod", "MODIFIED", pod(s.pod_name, "gpu-1", {"nvidia.com/gpu": "1"}, namespace=s.namespace))
    assert [h for h in usage_ledger().holdings() if h.user == "alice"]  # terminating, still there
    cache.apply("pod", "DELETED", pod(s.pod_name, "gpu-1", {"nvidia.com/gpu": "1"}, namespace=s.namespace))
    assert not [h for h in usage_ledger().holdings() if h.user == "alice"]


def project_manifest(user: str, groups: list[str], slug: str = "cpu-small") -> dict:
    cache = kube_capacity("mixed")
    cache.replace("node", cluster_nodes())
    cache.replace("pod", [])

    async def build():
        s = spawner_for(user, groups)
        await s.apply_profile({"profile": slug})
        return ApiClient().sanitize_for_serialization(await s.get_pod_manifest())

    return asyncio.run(build())


def test_project_storage_is_mounted_for_members_and_project_servers_only():
    """Shipped projects: atlas-ml and cms-gpu (spawner_profiles/projects.yaml)."""
    member = validated(project_manifest("alice", ["atlas-ml", "ml-users"]))
    claims = {v["persistentVolumeClaim"]["claimName"] for v in member["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert "mlaas-project-atlas-ml" in claims and "mlaas-project-cms-gpu" not in claims
    mounts = {m["mountPath"] for m in member["spec"]["containers"][0]["volumeMounts"]}
    assert "/home/jovyan/projects/atlas-ml" in mounts

    outsider = validated(project_manifest("bob", ["ml-users"]))
    assert not any("persistentVolumeClaim" in v for v in outsider["spec"].get("volumes") or [])

    project = validated(project_manifest("project-atlas-ml", []))
    env = {e["name"]: e.get("value") for e in project["spec"]["containers"][0]["env"]}
    assert env["JUPYTERHUB_ROOT_DIR"] == "/home/jovyan/projects/atlas-ml"
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "mlaas-project-atlas-ml"
               for v in project["spec"]["volumes"])


def test_a_site_refusing_the_hub_is_named_not_taken_for_unreachable():
    """An API server that answers 403 (RBAC; also for seconds after it restarts, until its RBAC
    caches fill) is a site that cannot be used now, with the permission to grant, not one that
    cannot be reached, and no spawn goes there."""
    from mlaas.capacity.federation import Federation

    up, refusing = site_cache("2"), site_cache("2")
    refusing.refused = {"node": 403}
    federation = Federation({"site-a": up, "site-b": refusing})
    assert federation.unreachable() == {}
    assert "the hub may not list nodes (RBAC, HTTP 403)" in federation.forbidden()["site-b"]
    gpu = SHIPPED.get("gpu-a100")
    assert federation.place(gpu) == "site-a"
    assert federation.breakdown(gpu)[1].availability.reason.startswith("the hub may not list nodes (RBAC")


# --- a remote site reached through its ingress (tests/test_remote_site.py runs it for real) ---------

@pytest.mark.parametrize("servers_url, host", [("https://jupyter.site-b.example.org", "jupyter.site-b.example.org"),
                                               ("http://198.51.100.7:8080", None)])
def test_a_servers_ingress_is_valid_kubernetes_at_its_own_path_and_owned_by_its_pod(servers_url, host):
    from mlaas.spawners.site_ingress import server_ingress

    ingress = validated(server_ingress("jupyter-alice--gpu", "mlaas", "/user/alice/gpu/", 8888, "4f0c-uid",
                                       {"app": "jupyterhub"}, servers_url, "site-b-nginx"))
    rule = ingress["spec"]["rules"][0]
    assert rule.get("host") == host  # an Ingress host cannot be an IP address
    assert rule["http"]["paths"] == [{"path": "/user/alice/gpu/", "pathType": "Prefix",
                                      "backend": {"service": {"name": "jupyter-alice--gpu", "port": {"number": 8888}}}}]
    assert ingress["metadata"]["ownerReferences"][0]["uid"] == "4f0c-uid"
    assert ingress["spec"]["ingressClassName"] == "site-b-nginx"


def test_site_settings_name_the_site_and_field_of_a_mistake():
    from traitlets import TraitError

    from mlaas.settings import Settings

    async def check() -> None:
        spawner = spawner_for("alice", ["ml-users"])
        with pytest.raises(TraitError, match=r"site site-b: serversURL: Extra inputs are not permitted"):
            spawner.sites = {"site-b": {"kubeconfig": "/k", "serversURL": "https://x.example.org"}}
        with pytest.raises(TraitError, match=r"site site-b: hubUrl: Input should be a valid URL"):
            spawner.sites = {"site-b": {"kubeconfig": "/k", "hubUrl": "hub.example.org"}}
        spawner.sites = {"site-a": "in-cluster", "site-b": {
            "kubeconfig": "/k", "serversUrl": "https://jupyter.site-b.example.org/", "ingressClassName": "nginx"}}
        assert not spawner.sites["site-a"].remote and spawner.sites["site-b"].remote
        assert spawner.sites["site-b"].servers_origin == "https://jupyter.site-b.example.org"

    asyncio.run(check())
    settings = Settings.model_validate({"spawner": "kubernetes", "kubernetes": {"sites": [
        {"name": "site-b", "kubeconfig": "/k", "servers_url": "https://jupyter.site-b.example.org"}]}})
    assert settings.kubernetes.sites[0].connection().servers_origin == "https://jupyter.site-b.example.org"
