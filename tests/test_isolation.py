"""Isolation between users on one machine (hub as root: one system account per user).

Code in alice's kernel tries to reach bob's files, processes and server.
"""

from __future__ import annotations

import pytest

from conftest import needs_root
from helpers import RunningPlatform, ensure_user, kernel_json, start_server, stop_server, user_token

pytestmark = needs_root


@pytest.fixture(scope="module")
def pair(hub: RunningPlatform):
    ensure_user(hub, "iso-alice", ["ml-users"])
    ensure_user(hub, "iso-bob", ["ml-users"])
    tokens = {name: user_token(hub, name) for name in ("iso-alice", "iso-bob")}
    for name, token in tokens.items():
        start_server(hub, name, token, {"profile": "small"})
    yield tokens
    for name in tokens:
        stop_server(hub, name)


def test_users_cannot_reach_each_others_files_processes_or_servers(hub, pair):
    bob = kernel_json(
        hub,
        "iso-bob",
        pair["iso-bob"],
        """
import json, os
open(os.path.expanduser("~/secret.txt"), "w").write("bob's data")
print(json.dumps({"home": os.path.expanduser("~"), "server_pid": os.getppid(),
                  "server_url": os.environ["JUPYTERHUB_SERVICE_URL"], "uid": os.getuid()}))
""",
    )
    probe = f"""
import json, os, signal, urllib.request, urllib.error
bob = {bob!r}
def attempt(fn):
    try:
        return "allowed: " + repr(fn())[:80]
    except Exception as e:
        return type(e).__name__
def http(token):
    req = urllib.request.Request(bob["server_url"].rstrip("/") + "/api/contents/secret.txt")
    if token:
        req.add_header("Authorization", "token " + token)
    try:
        return urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
print(json.dumps({{
    "uid": os.getuid(),
    "list_home": attempt(lambda: os.listdir(bob["home"])),
    "read_file": attempt(lambda: open(bob["home"] + "/secret.txt").read()),
    "read_environ": attempt(lambda: open(f"/proc/{{bob['server_pid']}}/environ").read()),
    "signal": attempt(lambda: os.kill(bob["server_pid"], signal.SIGTERM)),
    "http_no_token": http(None),
    "http_own_token": http(os.environ["JUPYTERHUB_API_TOKEN"]),
}}))
"""
    alice = kernel_json(hub, "iso-alice", pair["iso-alice"], probe)
    assert alice["uid"] != bob["uid"] and 0 not in (alice["uid"], bob["uid"])
    assert alice["list_home"] == "PermissionError"
    assert alice["read_file"] == "PermissionError"
    assert alice["read_environ"] == "PermissionError"  # bob's server token lives there
    assert alice["signal"] == "PermissionError"
    assert alice["http_no_token"] in (302, 403)  # to the hub's login, or refused
    assert alice["http_own_token"] == 403
    # bob's server survived all of it
    model = hub.api().get(f"{hub.url}/hub/api/users/iso-bob").json()
    assert model["servers"][""]["ready"]


def test_an_existing_account_is_moved_to_this_platforms_home(hub):
    """Accounts outlive a state directory (reinstall, a moved state dir, earlier test runs):
    the server must still start in the current private home, never in a stale one."""
    import pwd
    import subprocess

    from mlaas.accounts import account_name

    ensure_user(hub, "iso-mover", ["ml-users"])
    token = user_token(hub, "iso-mover")
    name = account_name("iso-mover")
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent/old-home", name], check=True)
    subprocess.run(["usermod", "--home", "/nonexistent/old-home", name], check=True)
    start_server(hub, "iso-mover", token, {"profile": "small"})
    try:
        where = kernel_json(hub, "iso-mover", token, "import os, json; print(json.dumps([os.getcwd(), os.path.expanduser('~')]))")
    finally:
        stop_server(hub, "iso-mover")
    expected = str(hub.state_dir / "homes" / name)
    assert where == [expected, expected]
    assert pwd.getpwnam(name).pw_dir == expected
