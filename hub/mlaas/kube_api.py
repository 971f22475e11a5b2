"""A small synchronous client for the API server, from inside a pod: its ServiceAccount token and
CA at the standard path, the API server at KUBERNETES_SERVICE_HOST/PORT. For the few ConfigMap
reads and writes of the admin service (a thread of its own; no event loop to share)."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_cluster() -> bool:
    """Running in a pod with its ServiceAccount mounted and the API server announced."""
    return "KUBERNETES_SERVICE_HOST" in os.environ and (SA_DIR / "namespace").exists()


def own_namespace(default: str = "default") -> str:
    """The namespace of the pod this runs in (its ServiceAccount's mounted namespace file)."""
    try:
        return (SA_DIR / "namespace").read_text().strip() or default
    except OSError:
        return default


class KubeAPIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class InClusterAPI:
    def __init__(self, sa_dir: Path = SA_DIR, timeout: float = 10.0):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        self.sa_dir, self.timeout = sa_dir, timeout
        self.namespace = (sa_dir / "namespace").read_text().strip()
        self.context = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))

    def request(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        token = (self.sa_dir / "token").read_text().strip()  # re-read: the kubelet rotates it
        req = urllib.request.Request(
            self.base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=self.timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("message", e.reason)
            except ValueError:
                message = str(e.reason)
            raise KubeAPIError(e.code, message) from None

    def configmap(self, name: str) -> dict[str, Any] | None:
        """The ConfigMap of this pod's namespace, or None when it does not exist."""
        try:
            return self.request("GET", f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
        except KubeAPIError as e:
            if e.status == 404:
                return None
            raise
