"""The deployment artefacts without a cluster: our Helm chart rendered by the real Helm engine
(Helm v4's Go engine from PyPI `helm-python-sdk`, or the `helm` CLI's engine: the same code) for
both example sites, every object checked against the Kubernetes 1.33 schema (strict), pods
against Pod Security "restricted", the profile ConfigMap against the profile model, bad values
against the chart's schema; and the MIG layouts against the GPU models. No network needed."""

from __future__ import annotations

import asyncio

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kube_objects import validated
from pod_security import pod_spec_of, violations
from mlaas.deploy import CHART, helm_commands, load_site, site_values
from mlaas.mig_layout import SiteInventory, load_inventory, mig_parted_config
from mlaas.profiles.loader import load_profile_files, load_profile_texts

import helm_python as helm
REPO = Path(__file__).resolve().parents[1]
SITES = sorted(p for p in (REPO / "charts" / "sites").iterdir() if p.is_dir())


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def site_chart_values(site: Path) -> dict:
    generated, _ = site_values(site)
    return deep_merge(yaml.safe_load((site / "values.yaml").read_text()), generated)


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="mlaas-hub", namespace="mlaas", is_install=True)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module", params=[s.name for s in SITES])
def site(request) -> Path:
    return REPO / "charts" / "sites" / request.param


def test_two_example_sites_with_different_gpus():
    assert {s.name for s in SITES} >= {"site-a", "site-b"}
    models = {s.name: {p.gpu_model for p in load_site(s)[1].node_pools} for s in SITES}
    assert models["site-a"] != models["site-b"]


def test_chart_lints_clean_for_each_site(site):
    report = helm.lint(CHART, site_chart_values(site), strict=True, namespace="mlaas", kube_version="v1.33.0")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_every_rendered_object_is_valid_kubernetes_and_pods_are_restricted(site):
    objects = render(site_chart_values(site))
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "StatefulSet", "Service", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    for obj in objects:
        validated(obj)
        spec = pod_spec_of(obj)
        if spec is not None:
            assert violations(spec) == [], f"{obj['kind']}/{obj['metadata']['name']}: {violations(spec)}"


def test_profile_configmap_round_trips_to_the_same_profiles(site):
    objects = render(site_chart_values(site))
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "mlaas-profiles")
    from_chart = load_profile_texts(sorted(cm["data"].items()))
    spec, _ = load_site(site)
    from mlaas.deploy import expand

    from_files = load_profile_files(expand([REPO / p for p in spec.profiles]))
    assert from_chart.profiles == from_files.profiles and from_chart.profiles
    assert from_chart.quotas == from_files.quotas and from_chart.projects == from_files.projects
    projects = [o for o in objects if o["kind"] == "PersistentVolumeClaim"
                and o["metadata"]["labels"]["app.kubernetes.io/component"] == "project-storage"]
    assert {o["metadata"]["name"] for o in projects} == {f"mlaas-project-{p.group}" for p in from_files.projects}
    assert all(o["spec"]["accessModes"] == ["ReadWriteMany"] for o in projects)


def test_xcache_uses_the_platform_template_and_only_its_origin(site):
    values = site_chart_values(site)
    objects = render(values)
    for origin in values["xcache"]["origins"]:
        cfg = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"xcache-{origin['name']}")
        text = cfg["data"]["xcache.cfg"]
        host_port = origin["url"].removeprefix("root://")
        assert f"pss.origin {host_port}" in text and "pss.cachelib libXrdPfc.so" in text
        assert "${" not in text  # every placeholder of the shared template filled
        assert "mlaas/templates/xcache.cfg" in text  # the one template


def test_network_policies_never_let_one_users_server_reach_another(site):
    objects = render(site_chart_values(site))
    singleuser_pod = {"component": "singleuser-server", "app": "jupyterhub", "release": "jupyterhub"}
    hub_pod = {"component": "hub", "app": "jupyterhub"}
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "mlaas-singleuser")

    def matches(peer: dict, labels: dict) -> bool:
        selector = peer.get("podSelector")
        if selector is None or "namespaceSelector" in peer:
            return False
        return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())

    assert policy["spec"]["podSelector"]["matchLabels"]["component"] == "singleuser-server"
    ingress_peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
    egress_peers = [p for rule in policy["spec"]["egress"] for p in rule.get("to", [])]
    assert not any(matches(p, singleuser_pod) for p in ingress_peers), "a server accepts traffic from servers"
    assert not any(matches(p, singleuser_pod) for p in egress_peers), "a server may connect to servers"
    assert any(matches(p, hub_pod) for p in ingress_peers) and any(matches(p, hub_pod) for p in egress_peers)
    assert all(rule.get("to") for rule in policy["spec"]["egress"]), "an egress rule without 'to' allows everything"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"xcache": {"origins": [{"name": "x", "url": "http://data.example.org", "namespace": "/x"}]}}, "/xcache/origins/0/url"),
        ({"xcache": {"image": {"repository": "r", "tag": "latest"}}}, "/xcache/image/tag"),
        ({"projects": {"size": "lots"}}, "/projects/size"),
        ({"sitename": "a"}, "sitename"),
        ({"networkPolicy": {"serversReachableFrom": [{"podSelctor": {"matchLabels": {"a": "b"}}}]}},
         "/networkPolicy/serversReachableFrom/0"),
        ({"rbac": {"serverIngresses": "yes"}}, "/rbac/serverIngresses"),
    ],
)
def test_bad_values_are_refused_by_the_schema_naming_the_field(bad, message):
    with pytest.raises(helm.HelmValuesError) as refused:
        helm.Chart.load(CHART).render(bad, name="mlaas-hub", namespace="mlaas")
    assert message in str(refused.value)


def test_mig_layout_of_site_a_is_the_mig_parted_config():
    site = load_inventory(REPO / "charts" / "sites" / "site-a" / "gpus.yaml")
    layout = mig_parted_config(site, load_profile_files(sorted((REPO / "spawner_profiles").glob("*.yaml"))).profiles)
    configs = layout.config["mig-configs"]
    assert layout.config["version"] == "v1" and "all-disabled" in configs
    assert configs["mlaas-a100-mig"] == [
        {"devices": [0, 1, 2, 3], "mig-enabled": True, "mig-devices": {"1g.10gb": 4}},
        {"devices": [4, 5], "mig-enabled": True, "mig-devices": {"3g.20gb": 2}},
        {"devices": [6, 7], "mig-enabled": False},
    ]
    assert layout.warnings == []  # every MIG profile of spawner_profiles is offered


@pytest.mark.parametrize(
    "model, layout, reason",
    [
        ("A100-SXM4-40GB", {"1g.5gb": 8}, "holds at most 7 × 1g.5gb, not 8"),
        ("A100-SXM4-40GB", {"3g.20gb": 2, "1g.5gb": 1}, "needs 9 memory slices; A100-SXM4-40GB has 8"),
        ("A100-SXM4-40GB", {"4g.20gb": 1, "3g.20gb": 1, "1g.5gb": 1}, "needs 8 compute slices"),
        ("A100-SXM4-40GB", {"3g.40gb": 1}, "has no MIG profile '3g.40gb'"),
        ("A30", {"2g.12gb": 2, "1g.6gb": 1}, "needs 5 compute slices; A30 has 4"),
    ],
)
def test_impossible_mig_layouts_are_refused_with_the_reason(model, layout, reason):
    with pytest.raises(ValueError) as refused:
        SiteInventory.model_validate(
            {"site": "x", "node_pools": [{"name": "p", "gpu_model": model, "gpus_per_node": 2, "mig": [{"gpus": [0], "layout": layout}]}]}
        )
    assert reason in str(refused.value)


def test_valid_mixes_fit(tmp_path):
    for model, layout in [("A100-SXM4-40GB", {"4g.20gb": 1, "2g.10gb": 1, "1g.5gb": 1}), ("A100-SXM4-40GB", {"1g.5gb": 7}),
                          ("H100-SXM5-80GB", {"3g.40gb": 2}), ("A30", {"2g.12gb": 1, "1g.6gb": 2})]:
        SiteInventory.model_validate(
            {"site": "x", "node_pools": [{"name": "p", "gpu_model": model, "gpus_per_node": 1, "mig": [{"gpus": [0], "layout": layout}]}]}
        )


def test_mig_layout_cli_names_file_and_field_and_warns_about_unmet_profiles(tmp_path):
    bad = tmp_path / "gpus.yaml"
    bad.write_text("site: x\nnode_pools:\n  - name: p\n    gpu_model: A100-SXM4-40GB\n    gpus_per_node: 8\n"
                   "    mig:\n      - gpus: [0]\n        layout: {1g.5gb: 8}\n")
    r = subprocess.run([sys.executable, "-m", "mlaas.cli", "mig-layout", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and f"{bad} node_pools.0" in r.stderr and "at most 7 × 1g.5gb" in r.stderr
    r = subprocess.run([sys.executable, "-m", "mlaas.cli", "mig-layout", str(REPO / "charts/sites/site-b/gpus.yaml"),
                        "--profiles", str(REPO / "spawner_profiles")], capture_output=True, text=True)
    assert r.returncode == 0 and "mlaas-h100" in r.stdout
    assert "profile 'mig-3g-20gb' asks for MIG 3g.20gb, which no node pool of site-b provides" in r.stderr


def test_deploy_installs_our_chart_and_the_pinned_upstream_charts(site, tmp_path):
    commands = helm_commands(site, tmp_path / "generated.yaml")
    upstream = yaml.safe_load((REPO / "charts" / "upstream.yaml").read_text())["charts"]
    assert commands[0][:4] == ["helm", "upgrade", "--install", "mlaas-hub"]
    for release, pin in upstream.items():
        cmd = next(c for c in commands if c[3] == release)
        assert cmd[cmd.index("--version") + 1] == str(pin["version"]) and cmd[cmd.index("--repo") + 1] == pin["repository"]


def test_deploy_takes_upstream_charts_from_local_archives_when_given(site, tmp_path):
    """Air-gapped sites: `mlaas deploy --charts-dir` installs the pinned charts from `helm pull` archives."""
    (tmp_path / "jupyterhub-4.4.0.tgz").write_bytes(b"")
    commands = {c[3]: c for c in helm_commands(site, tmp_path / "generated.yaml", tmp_path)}
    assert commands["jupyterhub"][4] == str(tmp_path / "jupyterhub-4.4.0.tgz") and "--repo" not in commands["jupyterhub"]
    assert "--repo" in commands["dask-gateway"]  # no archive of the pinned version: from its repository


def test_upstream_values_use_what_our_chart_and_package_provide(tmp_path):
    hub_values = yaml.safe_load((REPO / "charts/values/jupyterhub.yaml").read_text())
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert hub_values["hub"]["extraVolumes"][0]["configMap"]["name"] == chart_defaults["profiles"]["configMapName"]
    assert hub_values["singleuser"]["networkPolicy"]["enabled"] is False  # ours replaces it
    from traitlets.config import Config

    c = Config()
    snippet = hub_values["hub"]["extraConfig"]["00-mlaas"]
    assert 'profiles_dir="/etc/mlaas/profiles"' in snippet
    exec(snippet.replace('profiles_dir="/etc/mlaas/profiles"',
                         f'profiles_dir="{REPO / "spawner_profiles"}", state_dir="{tmp_path}"'),
         {"c": c, "get_config": lambda key, default=None: default})  # z2jh's config gives extraConfig get_config
    assert c.JupyterHub.spawner_class.__name__ == "KubeProfileSpawner"
    roles = c.JupyterHub.load_roles  # added lazily to whatever the hub's config set before
    roles = roles.get_value([]) if hasattr(roles, "get_value") else roles
    assert any(r["name"] == "mlaas-project-atlas-ml" for r in roles)
    gw_values = yaml.safe_load((REPO / "charts/values/dask-gateway.yaml").read_text())
    g = Config()
    exec(gw_values["gateway"]["extraConfig"]["mlaas"], {"c": g})
    assert g.MLaaSKubeBackend.profiles_configmap == chart_defaults["profiles"]["configMapName"]  # read through the API
    assert g.KubeClusterConfig.scheduler_cmd == ["dask", "scheduler"]  # distributed 2026 has no dask-scheduler
    # the files the ConfigMap mirror writes (tests/test_deployment.py reads them through a real API server)
    g.MLaaSKubeBackend.profiles_configmap = ""
    g.MLaaSKubeBackend.profiles_dir = str(REPO / "spawner_profiles")

    class User:
        name, groups = "alice", {"atlas-ml", "ml-users"}

    # what the Dask Gateway chart's own configuration sets from these values
    g.KubeClusterConfig.worker_extra_container_config = gw_values["gateway"]["backend"]["worker"]["extraContainerConfig"]
    backend = g.DaskGateway.backend_class(config=g)
    assert backend.profiles_dir == str(REPO / "spawner_profiles")
    options = asyncio.run(backend.get_cluster_options(User()))
    assert {f.field for f in options.fields} >= {"worker_cores", "worker_memory", "worker_gpus"}
    gpu_worker = options.get_configuration(options.parse_options({"worker_gpus": "1"}), User())
    container = gpu_worker["worker_extra_container_config"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["runAsNonRoot"] is True  # Pod Security "restricted" still admits it


def test_users_servers_reach_the_internet_but_not_the_cluster_or_the_metadata_service(site):
    """The rendered mlaas-singleuser policy, judged by tests/netpol.py (the test clusters do not
    enforce NetworkPolicies): z2jh's default egress (DNS, the platform, the internet), never
    cluster-internal ranges or the cloud metadata address; a site can open more, or close it."""
    from netpol import Destination, egress_allows

    def policy(values: dict) -> dict:
        objects = render(deep_merge(site_chart_values(site), values))
        return next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "mlaas-singleuser")

    default = policy({})
    other_server = Destination("10.42.3.7", 8888, pod_labels={"component": "singleuser-server"}, namespace="mlaas")
    hub = Destination("10.42.1.2", 8081, pod_labels={"component": "hub", "app": "jupyterhub"}, namespace="mlaas")
    dns = Destination("10.42.0.10", 53, "UDP", pod_labels={"k8s-app": "kube-dns"}, namespace="kube-system",
                      namespace_labels={"kubernetes.io/metadata.name": "kube-system"})
    cases = {
        "PyPI/GitHub over HTTPS": (Destination("151.101.0.223", 443), True),
        "git over ssh": (Destination("140.82.112.3", 22), True),
        "the hub API": (hub, True),
        "DNS": (dns, True),
        "another user's server": (other_server, False),
        "the cloud metadata service": (Destination("169.254.169.254", 80), False),
        "a cluster-internal database": (Destination("10.0.5.5", 5432), False),
        "a private network of the site": (Destination("192.168.10.20", 443), False),
    }
    verdicts = {name: egress_allows(default, dest) for name, (dest, _) in cases.items()}
    assert verdicts == {name: expected for name, (_, expected) in cases.items()}
    opened = policy({"networkPolicy": {"egress": {"allow": ["192.168.10.0/24"]}}})
    assert egress_allows(opened, Destination("192.168.10.20", 443))  # the site's package mirror
    assert not egress_allows(opened, other_server)
    closed = policy({"networkPolicy": {"egress": {"internet": False}}})
    assert not egress_allows(closed, Destination("151.101.0.223", 443)) and egress_allows(closed, hub)


def test_the_tracking_component_is_reached_by_servers_the_proxy_and_the_hub_only(site):
    """The rendered policies, as an enforcing CNI judges them (tests/netpol.py): users' servers (the
    mlflow client), the proxy (browsers) and the hub (usage view) reach the tracking pod on the
    service's port, never MLflow's own; Dask workers do not reach it; it reaches the hub's API but
    not users' servers."""
    from netpol import Endpoint, connection_allowed

    objects = render(site_chart_values(site))
    policies = [{**o, "metadata": {**o["metadata"], "namespace": "mlaas"}} for o in objects if o["kind"] == "NetworkPolicy"]
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlaas-tracking")
    tracking = Endpoint("10.42.2.9", deployment["spec"]["template"]["metadata"]["labels"], "mlaas")
    server = Endpoint("10.42.3.7", {"component": "singleuser-server", "app": "jupyterhub"}, "mlaas")
    proxy = Endpoint("10.42.1.3", {"component": "proxy", "app": "jupyterhub"}, "mlaas")
    hub = Endpoint("10.42.1.2", {"component": "hub", "app": "jupyterhub"}, "mlaas")
    worker = Endpoint("10.42.4.4", {"app.kubernetes.io/name": "dask-gateway", "app.kubernetes.io/component": "dask-worker"}, "mlaas")
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "mlaas-tracking")
    port = service["spec"]["ports"][0]["port"]
    assert port == 8006 and service["spec"]["selector"].items() <= tracking.pod_labels.items()
    cases = {
        "a user's server, the service": (server, tracking, port, True),
        "the proxy, the service": (proxy, tracking, port, True),
        "the hub, the service": (hub, tracking, port, True),
        "a user's server, MLflow's own port": (server, tracking, 8007, False),
        "a Dask worker, the service": (worker, tracking, port, False),
        "the tracking pod, the hub's API": (tracking, hub, 8081, True),
        "the tracking pod, a user's server": (tracking, server, 8888, False),
    }
    verdicts = {name: connection_allowed(policies, *case[:3]) for name, case in cases.items()}
    assert verdicts == {name: case[3] for name, case in cases.items()}
    off = render(deep_merge(site_chart_values(site), {"tracking": {"enabled": False}}))
    assert not [o for o in off if "tracking" in o["metadata"]["name"]]


def test_the_tracking_component_uses_postgresql_where_the_site_says(site):
    """tracking.database: the service's settings name the server (never the password, which comes
    from the site's Secret as a file), and the pod may reach that port; without the Secret's name
    the render fails naming the value."""
    import yaml as _yaml
    from netpol import Destination, egress_allows

    database = {"url": "postgresql://mlflow@db.site-a.example.org:5433/mlflow",
                "passwordSecret": {"name": "mlflow-db", "key": "password"}}
    objects = render(deep_merge(site_chart_values(site), {"tracking": {"database": database}}))
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "mlaas-tracking")
    settings = _yaml.safe_load(config["data"]["mlaas.yaml"])
    assert settings["tracking"]["database_url"] == database["url"]
    from mlaas.settings import Settings

    assert Settings.model_validate(settings).tracking.database_password_file is not None  # the platform's own model
    pod = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlaas-tracking")["spec"]["template"]["spec"]
    secret = next(v["secret"] for v in pod["volumes"] if "secret" in v)
    assert secret["secretName"] == "mlflow-db" and secret["items"] == [{"key": "password", "path": "password"}]
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "mlaas-tracking")
    assert egress_allows(policy, Destination("10.3.0.7", 5433)) and not egress_allows(policy, Destination("10.3.0.7", 5432))
    with pytest.raises(Exception, match="tracking.database.passwordSecret.name"):
        render(deep_merge(site_chart_values(site), {"tracking": {"database": {"url": database["url"]}}}))
