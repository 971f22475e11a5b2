"""The upstream charts' own RBAC, applied to a test cluster: Zero to JupyterHub's hub
ServiceAccount and namespaced Role, Dask Gateway's API and controller ServiceAccounts and roles,
rendered from the chart mirror with the repository's values. Tests give the product's clients
these accounts' own tokens (Cluster.service_account_kubeconfig), never admin credentials, so a
permission the product needs and the charts do not grant fails the test as it would at a site."""

from __future__ import annotations

from pathlib import Path
from urllib.error import HTTPError

import yaml

REPO = Path(__file__).resolve().parents[2]
PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}


def rbac_objects(release: str, namespace: str, charts_dir: Path) -> list[dict]:
    import helm_python as helm

    pins = yaml.safe_load((REPO / "charts" / "upstream.yaml").read_text())["charts"]
    pin = pins[release]
    values = yaml.safe_load((REPO / pin["values"]).read_text()) or {}
    chart = helm.Chart.load(charts_dir / f"{pin['chart']}-{pin['version']}.tgz")
    out = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs = [d for name, text in out.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return [d for d in docs if d["kind"] in PATHS]


def our_chart_objects(namespace: str, values: dict | None = None, kinds=tuple(PATHS)) -> list[dict]:
    """charts/mlaas-hub's objects of these kinds (default: its RBAC, e.g. the hub's read-only
    ClusterRole and its binding), rendered with `values` over a site without cache or MIG manager."""
    import helm_python as helm

    from helpers import deep_merge

    values = deep_merge({"site": "test", "xcache": {"enabled": False}, "migManager": {"enabled": False}}, values or {})
    out = helm.Chart.load(REPO / "charts" / "mlaas-hub").render(values, name="mlaas-hub", namespace=namespace,
                                                                  is_install=True)
    return [d for text in out.values() for d in yaml.safe_load_all(text) if d and d["kind"] in kinds]


def apply_upstream_rbac(cluster, namespace: str, charts_dir: Path, releases=("jupyterhub", "dask-gateway"),
                        ours: bool = False, our_values: dict | None = None) -> None:
    """Create the releases' ServiceAccounts and (Cluster)Roles and bindings for `namespace` (and,
    with `ours`, our chart's with `our_values`, where the test does not install the chart itself)."""
    objects = [obj for release in releases for obj in rbac_objects(release, namespace, charts_dir)]
    if ours:
        objects += our_chart_objects(namespace, our_values)
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):  # one cluster, several test namespaces
            obj["metadata"]["name"] = f"{obj['metadata']['name']}-{namespace}"
            if obj["kind"] == "ClusterRoleBinding":
                obj["roleRef"]["name"] = f"{obj['roleRef']['name']}-{namespace}"
        try:
            cluster.request("POST", PATHS[obj["kind"]].format(ns=namespace), obj)
        except HTTPError as e:
            if e.code != 409:
                raise
