"""Spawns the platform refuses before starting anything, counted by reason for Prometheus
(`mlaas_spawn_refusals_total`): JupyterHub alone would count them as failed spawns."""

from __future__ import annotations

from prometheus_client import Counter
from tornado import web

SPAWN_REFUSALS = Counter("mlaas_spawn_refusals", "Spawns the platform refused before starting anything, by reason",
                         ["reason"])
REASONS = ("not-allowed", "quota", "no-capacity", "invalid-request")
for _reason in REASONS:
    SPAWN_REFUSALS.labels(reason=_reason)  # every series exists from the start (rate() needs them)


def refusal_reason(error: web.HTTPError) -> str:
    if error.status_code == 409:
        return "no-capacity"
    if error.status_code == 403:
        return "quota" if (error.log_message or "").startswith("Quota exceeded") else "not-allowed"
    return "invalid-request"


def count_refusal(error: web.HTTPError) -> None:
    SPAWN_REFUSALS.labels(reason=refusal_reason(error)).inc()
