"""The tracking service in the hub's configuration (one place for the one-machine and the chart's hub)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..settings import Settings
from . import server
from .storage import artifacts_root

SERVICE_NAME = "mlflow"


def why_off(s: Settings) -> str | None:
    """Why the hub runs no tracking service, or None where it runs one (one decision for the
    service, the servers' environment and the usage view)."""
    if not s.tracking.enabled:
        return "tracking.enabled is false"
    if s.spawner == "kubernetes":
        return "it is not yet deployed with servers on Kubernetes (issue #18)"
    if server.mlflow_program(s) is None:
        return ("no MLflow server is installed (`make install` installs it beside the hub's environment; "
                "or set tracking.mlflow_command)")
    return None


def tracking_service(s: Settings, settings_env: dict[str, str]) -> dict:
    return {
        "name": SERVICE_NAME,
        "url": f"http://127.0.0.1:{s.tracking.port}",
        "command": [sys.executable, "-m", "mlaas.tracking"],
        "environment": {**settings_env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "oauth_no_confirm": True,
        "display": True,
        "info": {"description": "Experiment tracking (MLflow), per group"},
    }


def artifacts_dir(s: Settings) -> Path:
    """Where the MLflow server keeps each workspace's artifacts (for the usage view)."""
    return artifacts_root(server.state_dir(s) / "mlflow")


def tracking_url(s: Settings) -> str:
    """Where servers reach the service (it checks their hub token itself)."""
    return f"http://127.0.0.1:{s.tracking.port}{server.PREFIX}"
