"""Each group's artifacts, for the admins' usage view. Only the tracking service sees MLflow's
storage (on this machine, or on its own volume in its pod on Kubernetes), so the hub asks it, with
the service's own hub token: a secret only the hub and the service hold."""

from __future__ import annotations

import hmac
import json
from typing import Any

from jupyterhub.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient

from . import server

USAGE_PATH = "mlaas/usage"  # under the service's prefix (no MLflow route of that name)


def is_the_hub(authorization: str, service_token: str) -> bool:
    """Whether a request's Authorization header carries the service's own token."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() in ("token", "bearer") and bool(service_token) and \
        hmac.compare_digest(token.strip().encode(), service_token.encode())


async def workspace_usage(service: Any) -> dict[str, int]:
    """Every workspace's artifact bytes, as the service measures them now (`service`: the hub's
    Service object, with its url and api_token)."""
    url = url_path_join(service.url, server.PREFIX, USAGE_PATH)
    response = await AsyncHTTPClient().fetch(url, headers={"Authorization": f"token {service.api_token}"},
                                             request_timeout=30)
    return {str(k): int(v) for k, v in json.loads(response.body)["workspaces"].items()}
