"""Idle servers stop by themselves on one machine too: jupyterhub-idle-culler as a hub-managed
service with a role of its own, as Zero to JupyterHub runs it on Kubernetes (`cull:` in the chart
values; the platform file's `culling:` here).

A server reports its activity to the hub every `activity_interval(timeout)` seconds (JupyterHub's
default, 5 minutes, would let a short timeout cull a user who is working), and the hub reads the
proxy's activity as often."""

from __future__ import annotations

import sys

from pydantic import BaseModel, ConfigDict, Field, model_validator

CULLER = "idle-culler"  # the service's name, as in Zero to JupyterHub
CULLER_ROLE = {
    "name": "idle-culler",
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
    "services": [CULLER],
}


class CullSettings(BaseModel):
    """`culling:` in the platform file."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    timeout: int = Field(3600, ge=30, description="Seconds without activity after which a server is stopped.")
    every: int = Field(0, ge=0, description="How often the culler looks, in seconds (0: a tenth of the timeout, "
                                            "between 10 s and 10 min).")
    max_age: int = Field(0, ge=0, description="Stop servers older than this many seconds even if active (0: never).")
    gpu_every: int = Field(30, ge=1, le=600, description="How often GPU use is sampled for profiles with a "
                                                         "`gpu_idle_timeout` (mlaas.gpu_culler), in seconds.")

    @model_validator(mode="after")
    def _every(self) -> "CullSettings":
        if not self.every:
            self.every = min(600, max(10, self.timeout // 10))
        return self


def activity_interval(timeout: int) -> int:
    """How often servers report activity: often enough that a report is never older than a sixth
    of the timeout (at least every 5 minutes, at most every 10 seconds)."""
    return min(300, max(10, timeout // 6))


def culler_service(cull: CullSettings) -> dict:
    command = [sys.executable, "-m", "mlaas.hub_service", "jupyterhub_idle_culler", f"--timeout={cull.timeout}",
               f"--cull-every={cull.every}", "--concurrency=10"]
    if cull.max_age:
        command.append(f"--max-age={cull.max_age}")
    return {"name": CULLER, "command": command}


def configure_culling(c, cull: CullSettings) -> tuple[list[dict], list[dict], dict[str, str]]:
    """The culler's service and role, and the servers' activity interval (to add to the hub's lists)."""
    if not cull.enabled:
        return [], [], {}
    interval = activity_interval(cull.timeout)
    c.JupyterHub.last_activity_interval = interval
    return [culler_service(cull)], [dict(CULLER_ROLE)], {"JUPYTERHUB_ACTIVITY_INTERVAL": str(interval)}
