"""Idle culling on one machine: jupyterhub-idle-culler runs as a hub service with its own role
(hub/mlaas/culling.py), with real servers. A server nobody uses is stopped after the timeout; a
server whose user keeps working (API requests through the proxy) outlives it, because servers
report activity often enough for a short timeout."""

from __future__ import annotations

import time

import pytest

from cluster.pod_runner import wait_until
from helpers import ensure_user, start_platform, start_server, stop_server, user_token

pytestmark = pytest.mark.platform
TIMEOUT = 40


@pytest.fixture(scope="module")
def hub():
    running = start_platform("culling", culling={"timeout": TIMEOUT, "every": 10}, tracking={"enabled": False})
    yield running
    running.platform.stop()


def running_servers(hub, name: str) -> dict:
    return hub.api().get(f"{hub.url}/hub/api/users/{name}").json().get("servers", {})


def test_an_idle_server_is_culled_and_a_working_users_server_is_not(hub):
    for name in ("idler", "worker"):
        ensure_user(hub, name, ["ml-users"])
    worker_token = user_token(hub, "worker")
    try:
        start_server(hub, "idler", user_token(hub, "idler"))
        start_server(hub, "worker", worker_token)
        started = time.monotonic()
        session = hub.api(worker_token)
        while time.monotonic() - started < TIMEOUT + 40:  # past the timeout and two culler rounds
            assert session.get(f"{hub.url}/user/worker/api/contents").status_code == 200, "the working user lost the server"
            if not running_servers(hub, "idler"):
                break
            time.sleep(5)
        assert wait_until(lambda: not running_servers(hub, "idler"), 30), "the idle server was not culled"
        assert running_servers(hub, "worker").get("", {}).get("ready"), "the working user's server was culled"
        culled_after = time.monotonic() - started
        assert culled_after >= TIMEOUT - 5  # not before its time
        log = hub.hub_log()
        assert "idle-culler" in log and "DELETE /hub/api/users/idler/server" in log
    finally:
        stop_server(hub, "idler")
        stop_server(hub, "worker")
