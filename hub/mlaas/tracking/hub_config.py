"""The tracking service in the hub's configuration (one place for the one-machine and the chart's hub)."""

from __future__ import annotations

import logging
import os
import sys

from ..settings import Settings
from . import server

log = logging.getLogger("JupyterHub.mlaas")
SERVICE_NAME = "mlflow"
ACCESS = f"access:services!service={SERVICE_NAME}"


def tracking_service(s: Settings, settings_env: dict[str, str]) -> dict | None:
    """The service (None, with the reason logged, where no MLflow server is installed)."""
    program = server.mlflow_program(s)
    if program is None:
        log.warning("Experiment tracking is off: no MLflow server is installed (`make install` installs it "
                    "beside the hub's environment; or set tracking.mlflow_command)")
        return None
    return {
        "name": SERVICE_NAME,
        "url": f"http://127.0.0.1:{s.tracking.port}",
        "command": [sys.executable, "-m", "mlaas.tracking"],
        "environment": {**settings_env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "oauth_no_confirm": True,
        "display": True,
        "info": {"description": "Experiment tracking (MLflow), per group"},
    }


def tracking_url(s: Settings) -> str:
    """Where servers reach the service (it checks their hub token itself)."""
    return f"http://127.0.0.1:{s.tracking.port}{server.PREFIX}"
