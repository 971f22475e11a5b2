"""Run Zero to JupyterHub's own hub configuration (its chart's jupyterhub_config.py and z2jh.py)
with the ConfigMap and Secret the chart rendered, as the hub pod would, and print what it built.

Used by tests/test_upstream_charts.py: `unshare --mount` gives this process a private view in
which the rendered files appear at the pod's paths (/usr/local/etc/jupyterhub/{config,secret},
/etc/mlaas/{profiles,data}); nothing else of the machine changes. Usage:
    z2jh_hub_config.py <pod root dir>   (its usr-local-etc/ and etc/ replace the pod's paths)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def mount_pod_paths(root: Path) -> None:
    """Bind the pod's files where the pod sees them, in this private mount namespace."""
    subprocess.run(["mount", "--bind", str(root / "usr-local-etc"), "/usr/local/etc"], check=True)
    subprocess.run(["mount", "--bind", str(root / "etc"), "/etc"], check=True)


def main() -> None:
    root = Path(sys.argv[1])
    mount_pod_paths(root)
    # what Kubernetes gives the hub pod: its namespace and the Services it finds by name
    os.environ.update(
        POD_NAMESPACE="mlaas", HUB_SERVICE_HOST="hub", HUB_SERVICE_PORT="8081",
        PROXY_API_SERVICE_HOST="proxy-api", PROXY_API_SERVICE_PORT="8001",
        PROXY_PUBLIC_SERVICE_HOST="proxy-public", PROXY_PUBLIC_SERVICE_PORT="80",
        CONFIGPROXY_AUTH_TOKEN="from-the-proxy-secret", HELM_RELEASE_NAME="jupyterhub",
    )
    from traitlets.config import PyFileConfigLoader

    config_dir = "/usr/local/etc/jupyterhub"
    sys.path.insert(0, config_dir)
    c = PyFileConfigLoader("jupyterhub_config.py", path=config_dir).load_config()
    jh, ks = c.JupyterHub, c.KubeSpawner

    def value(section, name, initial):
        """A setting as the traits will see it: plain values as set, lazy ones applied to `initial`."""
        v = section.get(name)
        return v.get_value(initial) if hasattr(v, "get_value") else v

    print(json.dumps({
        "spawner_class": getattr(jh.spawner_class, "__name__", str(jh.spawner_class)),
        "authenticator_class": getattr(jh.authenticator_class, "__name__", str(jh.authenticator_class)),
        "load_roles": jh.load_roles,
        "services": [{k: v for k, v in s.items() if k != "api_token"} | {"has_api_token": bool(s.get("api_token"))}
                     for s in jh.services],
        "kubespawner_environment": value(ks, "environment", value(c.Spawner, "environment", {})),
        "server_token_scopes": value(c.Spawner, "server_token_scopes", []),
        "template_vars": sorted(value(jh, "template_vars", {}) or {}),
        "extra_handlers": [h[0] for h in value(jh, "extra_handlers", []) or []],
    }, default=str))


if __name__ == "__main__":
    main()
