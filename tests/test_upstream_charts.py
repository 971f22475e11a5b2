"""The pinned upstream charts (Zero to JupyterHub 4.4.0, Dask Gateway 2026.3.0) with the
repository's values, from the site's chart mirror ($MLAAS_CHARTS_DIR, default ../shared/charts):
rendered by the real Helm engine and checked against the Kubernetes schema, and z2jh's own hub
configuration run with the rendered ConfigMap and Secret (JupyterHub from this environment).

A missing archive fails these tests: they are how the Kubernetes path is known to be wired.
Simulated: nothing here runs a pod; the hub configuration runs as a process of this machine in a
private mount namespace that shows it the pod's files (root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from conftest import needs_root
from helpers import deep_merge
from kube_objects import validated
from mlaas.deploy import UPSTREAM

REPO = Path(__file__).resolve().parents[1]
SITE = REPO / "charts" / "sites" / "site-a"
PINS = yaml.safe_load(UPSTREAM.read_text())["charts"]


def charts_dir() -> Path:
    """The site's chart mirror: $MLAAS_CHARTS_DIR, else ../shared/charts beside the repository."""
    path = Path(os.environ.get("MLAAS_CHARTS_DIR") or REPO.parent / "shared" / "charts")
    missing = [f"{p['chart']}-{p['version']}.tgz" for p in PINS.values() if not (path / f"{p['chart']}-{p['version']}.tgz").is_file()]
    if missing:
        pytest.fail(f"the pinned upstream chart archives {', '.join(missing)} are not in {path} "
                    "(set MLAAS_CHARTS_DIR to the site's chart mirror)")
    return path


def render_release(release: str, namespace: str = "mlaas") -> list[dict]:
    """One upstream release as `mlaas deploy` installs it: common values, then the site's."""
    pin = PINS[release]
    values: dict = {}
    for f in [REPO / pin["values"], SITE / f"{release}.yaml"]:
        if f.exists():
            values = deep_merge(values, yaml.safe_load(f.read_text()) or {})
    chart = helm.Chart.load(charts_dir() / f"{pin['chart']}-{pin['version']}.tgz")
    out = chart.render(values, name=release, namespace=namespace, is_install=True)
    return [doc for name, text in out.items() if name.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def test_the_pins_are_zero_to_jupyterhub_4_4_0_and_dask_gateway_2026_3_0():
    assert (PINS["jupyterhub"]["version"], PINS["dask-gateway"]["version"]) == ("4.4.0", "2026.3.0")
    charts_dir()


def test_both_releases_render_to_valid_objects_and_the_gateway_gets_its_hub_token():
    hub_objects, gateway_objects = render_release("jupyterhub"), render_release("dask-gateway")
    for obj in hub_objects + gateway_objects:
        group = obj["apiVersion"].rpartition("/")[0]
        if "." not in group or group.endswith(".k8s.io"):  # built-in kinds; Traefik's and Dask's CRs have no schema here
            validated(obj)
    secret = find(hub_objects, "Secret", "hub")
    assert "hub.services.dask-gateway.apiToken" in secret["data"]  # z2jh made the service's token
    api = find(gateway_objects, "Deployment", "api-dask-gateway")
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["JUPYTERHUB_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hub", "key": "hub.services.dask-gateway.apiToken"}
    assert find(gateway_objects, "Service", "traefik-dask-gateway")  # where the hub's route points
    hub = find(hub_objects, "Deployment", "hub")
    mounts = {m["mountPath"] for m in hub["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/etc/mlaas/profiles", "/etc/mlaas/data"} <= mounts


@needs_root
def test_z2jh_hub_config_runs_with_mlaas_and_keeps_its_roles_and_services(tmp_path):
    """z2jh sets the idle culler's service and role before `hub.extraConfig` runs; ours must add to
    them. Users' servers get the gateway and cache settings; users may use the gateway."""
    hub_objects = render_release("jupyterhub")
    configmap, secret = find(hub_objects, "ConfigMap", "hub"), find(hub_objects, "Secret", "hub")
    root = tmp_path / "pod"
    config, secret_dir = root / "usr-local-etc" / "jupyterhub" / "config", root / "usr-local-etc" / "jupyterhub" / "secret"
    config.mkdir(parents=True)
    secret_dir.mkdir(parents=True)
    for key, text in configmap["data"].items():
        (config / key).write_text(text)
    import base64

    for key, text in secret["data"].items():
        (secret_dir / key).write_bytes(base64.b64decode(text))
    # z2jh's hub image has these two next to the config; the chart mounts them from its files
    for name in ("jupyterhub_config.py", "z2jh.py"):
        if not (config.parent / name).exists():
            (config.parent / name).write_text(configmap["data"].get(name, ""))
    shutil.copytree("/etc", root / "etc", symlinks=True)
    shutil.copytree(REPO / "spawner_profiles", root / "etc" / "mlaas" / "profiles")
    ours = [o for o in _our_chart_objects() if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "mlaas-data"]
    (root / "etc" / "mlaas" / "data").mkdir()
    (root / "etc" / "mlaas" / "data" / "xcache.json").write_text(ours[0]["data"]["xcache.json"])
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          str(REPO / "tests" / "z2jh_hub_config.py"), str(root)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "hub")})
    assert out.returncode == 0, out.stderr[-3000:]
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert built["spawner_class"] == "KubeProfileSpawner" and built["authenticator_class"] == "MLaaSAuthenticator"
    roles = {r["name"]: r for r in built["load_roles"]}
    assert {"list:users", "read:users:activity", "read:servers", "delete:servers"} <= set(
        roles["jupyterhub-idle-culler"]["scopes"])  # z2jh's culler keeps its permissions
    assert roles["jupyterhub-idle-culler"]["services"] == ["jupyterhub-idle-culler"]
    assert "access:services!service=dask-gateway" in roles["user"]["scopes"]
    assert "mlaas-project-atlas-ml" in roles
    services = {s["name"]: s for s in built["services"]}
    assert services["dask-gateway"]["url"] == "http://traefik-dask-gateway" and services["dask-gateway"]["has_api_token"]
    assert "jupyterhub-idle-culler" in services
    env = built["kubespawner_environment"]
    assert env["DASK_GATEWAY__ADDRESS"] == "http://proxy-public/services/dask-gateway"
    cache_map = json.loads(env["MLAAS_XCACHE"].format())  # as KubeSpawner expands it into the pod
    assert cache_map["origins"]["root://eos-atlas.site-a.example.org:1094"] == "root://xcache-atlas:1094"
    assert cache_map["namespaces"]["/store/demo"] == "root://data.site-a.example.org:1094"
    assert "access:services!service=dask-gateway" in built["server_token_scopes"]
    assert "mlaas_projects" in built["template_vars"]
    # the platform's REST API, as on the one-machine hub (no machine GPU inventory on a cluster)
    assert {"/api/mlaas/profiles", "/api/mlaas/quotas", "/api/mlaas/usage"} <= set(built["extra_handlers"])
    assert "/api/mlaas/capacity" not in built["extra_handlers"]


def _our_chart_objects() -> list[dict]:
    from mlaas.deploy import CHART, site_values

    generated, _ = site_values(SITE)
    values = deep_merge(yaml.safe_load((SITE / "values.yaml").read_text()), generated)
    out = helm.Chart.load(CHART).render(values, name="mlaas-hub", namespace="mlaas", is_install=True)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def test_the_scrape_jobs_name_services_the_releases_create_and_pass_promtool(tmp_path):
    """Our chart's scrape jobs point at the hub's and the Dask Gateway's Services as the pinned
    charts create them (name and port), and Prometheus' own checker accepts them as a config."""
    services = {(o["metadata"]["name"], p["port"]) for o in render_release("jupyterhub") + render_release("dask-gateway")
                if o["kind"] == "Service" for p in o["spec"]["ports"]}
    prometheus = find(_our_chart_objects(), "ConfigMap", "mlaas-prometheus")
    jobs = {j["job_name"]: j for j in yaml.safe_load(prometheus["data"]["scrape-config.yaml"])}
    assert {name: j["metrics_path"] for name, j in jobs.items()} == {
        "mlaas-hub": "/hub/metrics", "mlaas-dask-gateway": "/api/mlaas/metrics"}
    assert jobs["mlaas-dask-gateway"]["authorization"]["type"] == "jupyterhub"  # the gateway's own scheme
    for job in jobs.values():
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.rsplit(":", 1)
        assert host.endswith(".mlaas.svc") and (host.split(".")[0], int(port)) in services, target
        job["authorization"]["credentials_file"] = str(tmp_path / "token")
    (tmp_path / "token").write_text("x" * 32)
    (tmp_path / "alerts.yaml").write_text(prometheus["data"]["alerts.yaml"])
    config = {"rule_files": [str(tmp_path / "alerts.yaml")], "scrape_configs": list(jobs.values())}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
