"""Servers at a remote site, reached through that site's ingress controller.

KubeSpawner fronts the pod with a Service (`services_enabled`); this adds an Ingress at the
server's own path (`/user/<name>/`, or `/user/<name>/<server>/` for a named server), so the hub
and its proxy reach the server at the site's one public address: the pod network of another
site is not routed to the hub. Both objects belong to the pod (owner reference): when the pod
goes, Kubernetes' garbage collector removes them, also when the hub is away.

Every server has its own path, and a Prefix path matches whole path segments, so one user's
Ingress never captures another's requests; the server still asks the hub who a request is from
(its OAuth), as it does behind the hub's own proxy.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlparse


def server_ingress(name: str, namespace: str, path: str, port: int, pod_uid: str, labels: dict[str, str],
                   servers_url: str, ingress_class_name: str | None = None) -> dict[str, Any]:
    """The Ingress of one server: `path` (its base URL) at the site's ingress, to the Service
    `name` (KubeSpawner's, named as the pod) on `port`. A host rule only when the site's address
    is a name (an Ingress host cannot be an IP address)."""
    host = urlparse(servers_url).hostname or ""
    try:
        ipaddress.ip_address(host)
        host = ""
    except ValueError:
        pass
    rule: dict[str, Any] = {"http": {"paths": [{
        "path": path if path.endswith("/") else path + "/",
        "pathType": "Prefix",
        "backend": {"service": {"name": name, "port": {"number": port}}},
    }]}}
    if host:
        rule["host"] = host
    spec: dict[str, Any] = {"rules": [rule]}
    if ingress_class_name:
        spec["ingressClassName"] = ingress_class_name
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": pod_uid,
                                 "blockOwnerDeletion": True}],
        },
        "spec": spec,
    }


async def create_ingress(api_client: Any, manifest: dict[str, Any]) -> None:
    """Create the Ingress; one left from an earlier pod of the same name (its garbage collection
    still pending) is replaced."""
    from kubernetes_asyncio.client import NetworkingV1Api
    from kubernetes_asyncio.client.rest import ApiException

    api = NetworkingV1Api(api_client)
    meta = manifest["metadata"]
    try:
        await api.create_namespaced_ingress(meta["namespace"], manifest)
    except ApiException as e:
        if e.status != 409:
            raise
        await api.replace_namespaced_ingress(meta["name"], meta["namespace"], manifest)
