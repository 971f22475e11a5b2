"""The tracking service in the hub's configuration: one place for the one-machine hub (which runs
the service itself) and the chart's hub (where the service is charts/mlaas-hub's component
`mlaas-tracking`, registered as `hub.services.mlflow`)."""

from __future__ import annotations

import os
import sys
from typing import Any

from ..settings import Settings
from . import server

SERVICE_NAME = "mlflow"
# what the hub needs to know of the service on both paths (its address and token come per path)
SERVICE_OPTIONS = {
    "oauth_no_confirm": True,
    "display": True,
    "info": {"description": "Experiment tracking (MLflow), per group"},
}


def why_off(s: Settings) -> str | None:
    """Why the hub runs no tracking service, or None where it runs one (one decision for the
    service, the servers' environment and the usage view)."""
    if not s.tracking.enabled:
        return "tracking.enabled is false"
    if server.mlflow_program(s) is None:
        return ("no MLflow server is installed (`make install` installs it beside the hub's environment; "
                "or set tracking.mlflow_command)")
    return None


def service_url(s: Settings) -> str:
    """Where the service listens: where the servers reach the hub (their pods' side, with servers
    on Kubernetes), and the proxy forwards /services/mlflow/ to it."""
    host = s.kubernetes.hub_connect_ip if s.spawner == "kubernetes" else "127.0.0.1"
    return f"http://{host}:{s.tracking.port}"


def tracking_service(s: Settings, settings_env: dict[str, str]) -> dict:
    return {
        "name": SERVICE_NAME,
        "url": service_url(s),
        "command": [sys.executable, "-m", "mlaas.tracking"],
        "environment": {**settings_env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        **SERVICE_OPTIONS,
    }


def chart_tracking_service(services: Any) -> dict | None:
    """The chart's tracking service among a chart-deployed hub's services (`hub.services.mlflow`
    of the site's values: Zero to JupyterHub registered it and keeps its token in the hub Secret,
    where the component reads it), completed with what the hub needs to know of it; None where the
    site has none (it turned tracking off)."""
    listed = services.get_value([]) if hasattr(services, "get_value") else services  # also unset (lazy) config
    service = next((s for s in listed if s.get("name") == SERVICE_NAME), None)
    if service is not None:
        for key, value in SERVICE_OPTIONS.items():
            service.setdefault(key, value)
    return service


def tracking_url(url: str) -> str:
    """Where servers reach the service at `url` (it checks their hub token itself)."""
    return url.rstrip("/") + server.PREFIX
