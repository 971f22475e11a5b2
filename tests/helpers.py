"""Test helpers: a real platform on free ports, its REST API, the OIDC login, and kernels.

Nothing here is mocked: the platform is the one `make up` starts (dev IdP, JupyterHub, its
proxy, single-user servers); only ports, state directory and profiles are the test's own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import websocket
import yaml

from mlaas.accounts import untraversable_ancestor
from mlaas.launcher import Platform
from mlaas.settings import REPO_ROOT, load_settings

FIXTURES = Path(__file__).parent / "fixtures"
ARTIFACTS = REPO_ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_root() -> Path:
    """Where test platforms keep state: inside the repo if per-user accounts can reach it."""
    root = REPO_ROOT / ".test-state"
    if untraversable_ancestor(REPO_ROOT) is not None:
        root = Path("/var/tmp/mlaas-test-state")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    return root


@dataclass
class RunningPlatform:
    platform: Platform
    url: str
    ops_token: str
    profiles_dir: Path
    state_dir: Path
    log_dir: Path

    def api(self, token: str | None = None) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"token {token or self.ops_token}"
        return s

    def hub_log(self) -> str:
        return (self.log_dir / "hub.log").read_text(errors="replace")


def start_platform(
    name: str, gpu_inventory: str = "nvml", profiles: Path = FIXTURES / "profiles", **overrides: Any
) -> RunningPlatform:
    run_dir = state_root() / f"{name}-{uuid.uuid4().hex[:8]}"
    state_dir, log_dir, profiles_dir = run_dir / "state", run_dir / "logs", run_dir / "profiles"
    shutil.copytree(profiles, profiles_dir)
    state_dir.mkdir(parents=True)
    token_file = run_dir / "ops-token"
    ops_token = secrets.token_hex(24)
    token_file.write_text(ops_token)
    os.chmod(token_file, 0o600)
    port, idp_port, origin_port, cache_port = free_port(), free_port(), free_port(), free_port()
    config = {
        "state_dir": str(state_dir),
        "profiles_dir": str(profiles_dir),
        "public_url": f"http://127.0.0.1:{port}",
        "hub_port": free_port(),
        "proxy_api_port": free_port(),
        "oidc": {"issuer": f"http://127.0.0.1:{idp_port}"},
        "dev_idp": {"port": idp_port},
        "gpu_inventory": gpu_inventory,
        "admin_api_token_file": str(token_file),
        "admin_service_port": free_port(),
        "dask_gateway": {"port": free_port(), "api_port": free_port(), "tcp_port": free_port()},
        "data": {
            "demo_origin": {"port": origin_port},
            "origins": [{"name": "demo", "url": f"root://127.0.0.1:{origin_port}", "namespace": "/store/demo",
                         "cache_port": cache_port}],
        },
        **overrides,
    }
    config_file = run_dir / "mlaas.yaml"
    config_file.write_text(yaml.safe_dump(config))
    settings = load_settings(config_file, environ={})
    platform = Platform(settings, config_file=config_file, log_dir=log_dir)
    platform.start(timeout=120)
    return RunningPlatform(platform, settings.public_url, ops_token, profiles_dir, state_dir, log_dir)


# --- users, tokens, servers --------------------------------------------------------------------
def ensure_user(hub: RunningPlatform, name: str, groups: list[str]) -> None:
    api = hub.api()
    r = api.get(f"{hub.url}/hub/api/users/{name}")
    if r.status_code == 404:
        api.post(f"{hub.url}/hub/api/users/{name}").raise_for_status()
    for group in groups:
        if api.get(f"{hub.url}/hub/api/groups/{group}").status_code == 404:
            api.post(f"{hub.url}/hub/api/groups/{group}").raise_for_status()
        api.post(f"{hub.url}/hub/api/groups/{group}/users", json={"users": [name]}).raise_for_status()


def user_token(hub: RunningPlatform, name: str) -> str:
    r = hub.api().post(f"{hub.url}/hub/api/users/{name}/tokens", json={"note": "test", "expires_in": 3600})
    r.raise_for_status()
    return r.json()["token"]


def request_server(hub: RunningPlatform, name: str, token: str, options: dict | None = None) -> requests.Response:
    return hub.api(token).post(f"{hub.url}/hub/api/users/{name}/server", json=options or {})


def wait_ready(hub: RunningPlatform, name: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = hub.api().get(f"{hub.url}/hub/api/users/{name}").json()
        server = model.get("servers", {}).get("")
        if server and server.get("ready"):
            return server
        if not model.get("pending") and not server:
            raise AssertionError(f"{name}'s server stopped while starting; hub log:\n{hub.hub_log()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{name}'s server not ready after {timeout}s")


def start_server(hub: RunningPlatform, name: str, token: str, options: dict | None = None) -> dict[str, Any]:
    r = request_server(hub, name, token, options)
    assert r.status_code in (201, 202), f"spawn of {name} refused: {r.status_code} {r.text}"
    return wait_ready(hub, name)


def stop_server(hub: RunningPlatform, name: str, timeout: float = 30) -> None:
    api = hub.api()
    r = api.delete(f"{hub.url}/hub/api/users/{name}/server")
    assert r.status_code in (202, 204, 400), r.text
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = api.get(f"{hub.url}/hub/api/users/{name}").json()
        if not model.get("servers") and not model.get("pending"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{name}'s server did not stop")


def error_message(response: requests.Response) -> str:
    try:
        return response.json().get("message", response.text)
    except ValueError:
        return response.text


# --- the OIDC login, as a browser does it (redirects, the IdP's form, cookies) -----------------
def oidc_login(hub: RunningPlatform, username: str, password: str) -> tuple[requests.Session, requests.Response]:
    s = requests.Session()
    r = s.get(f"{hub.url}/hub/oauth_login")
    r.raise_for_status()
    action = re.search(r'action="([^"]+)"', r.text)
    assert action, f"no login form at {r.url}: {r.text[:500]}"
    form_url = requests.compat.urljoin(r.url, action.group(1))
    r = s.post(form_url, data={"username": username, "password": password})
    return s, r


# --- code in a user's kernel -------------------------------------------------------------------
def run_in_kernel(hub: RunningPlatform, name: str, token: str, code: str, timeout: float = 60) -> dict[str, Any]:
    """Run code in a new kernel of `name`'s server (through the proxy); return stdout and error."""
    base = f"{hub.url}/user/{name}"
    api = hub.api(token)
    r = api.post(f"{base}/api/kernels", json={"name": "python3"}, timeout=timeout)
    r.raise_for_status()
    kernel_id = r.json()["id"]
    ws = websocket.create_connection(
        f"ws://{base.split('://', 1)[1]}/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {token}"],
        timeout=timeout,
    )
    msg_id = uuid.uuid4().hex
    ws.send(
        json.dumps(
            {
                "header": {"msg_id": msg_id, "username": name, "session": uuid.uuid4().hex,
                           "msg_type": "execute_request", "version": "5.3"},
                "parent_header": {},
                "metadata": {},
                "content": {"code": code, "silent": False, "store_history": False,
                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    stdout, error = [], None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                stdout.append(msg["content"]["text"])
            elif kind == "error":
                error = f"{msg['content']['ename']}: {msg['content']['evalue']}"
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        ws.close()
        api.delete(f"{base}/api/kernels/{kernel_id}", timeout=timeout)
    return {"stdout": "".join(stdout), "error": error}


def kernel_json(hub: RunningPlatform, name: str, token: str, code: str) -> Any:
    """Run code that prints one JSON document; return it parsed."""
    out = run_in_kernel(hub, name, token, code)
    assert out["error"] is None, out["error"]
    return json.loads(out["stdout"].strip().splitlines()[-1])
