"""Isolation between users on one machine (hub as root: one system account per user).

Code in alice's kernel tries to reach bob's files, processes and server.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import requests

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
args = open(f"/proc/{os.getppid()}/cmdline").read().split("\\0")
sock = next(a.split("=", 1)[1] for a in args if a.startswith("--ServerApp.sock="))
print(json.dumps({"home": os.path.expanduser("~"), "server_pid": os.getppid(), "socket": sock, "uid": os.getuid()}))
""",
    )
    probe = f"""
import json, os, signal, socket
bob = {bob!r}
def attempt(fn):
    try:
        return "allowed: " + repr(fn())[:80]
    except Exception as e:
        return type(e).__name__
def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(bob["socket"])
    s.sendall(b"GET /api/contents/secret.txt HTTP/1.0\\r\\n\\r\\n")
    return s.recv(100)
print(json.dumps({{
    "uid": os.getuid(),
    "list_home": attempt(lambda: os.listdir(bob["home"])),
    "read_file": attempt(lambda: open(bob["home"] + "/secret.txt").read()),
    "read_environ": attempt(lambda: open(f"/proc/{{bob['server_pid']}}/environ").read()),
    "signal": attempt(lambda: os.kill(bob["server_pid"], signal.SIGTERM)),
    "connect_server": attempt(connect),
    "list_sockets": attempt(lambda: os.listdir(os.path.dirname(bob["socket"]))),
    "read_idp_passwords": attempt(lambda: open({str(hub.state_dir / "secrets" / "dev-idp-passwords.yaml")!r}).read()),
}}))
"""
    alice = kernel_json(hub, "iso-alice", pair["iso-alice"], probe)
    assert alice["uid"] != bob["uid"] and 0 not in (alice["uid"], bob["uid"])
    assert alice["list_home"] == "PermissionError"
    assert alice["read_file"] == "PermissionError"
    assert alice["read_environ"] == "PermissionError"  # bob's server token lives there
    assert alice["signal"] == "PermissionError"
    assert alice["connect_server"] == "PermissionError"  # bob's server listens where only he may go
    assert alice["list_sockets"] == "PermissionError"
    assert alice["read_idp_passwords"] == "PermissionError"  # nobody signs in as the demo admin
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


TAKEOVER = r'''
import json, os, subprocess, sys, time
target = __TARGET__
listener = """
import os, socket, sys, time
target, out = sys.argv[1], sys.argv[2]
try:
    if target.startswith("http+unix://"):
        from urllib.parse import unquote
        path = unquote(target[len("http+unix://"):])
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
    else:
        host, port = target.split("://", 1)[1].rsplit(":", 1)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    s.listen(8)
    open(out + ".bind", "w").write("bound")
except Exception as e:
    open(out + ".bind", "w").write("refused: " + type(e).__name__)
    sys.exit(0)
s.settimeout(20)
deadline = time.time() + 20
while time.time() < deadline:
    try:
        conn, _ = s.accept()
    except OSError:
        break
    conn.settimeout(2)
    try:
        data = conn.recv(65536)
    except OSError:
        data = b""
    with open(out, "ab") as f:
        f.write(data)
    conn.close()
"""
out = os.path.expanduser("~/captured")
for suffix in ("", ".bind"):
    try:
        os.unlink(out + suffix)
    except FileNotFoundError:
        pass
subprocess.Popen([sys.executable, "-c", listener, target, out], start_new_session=True,
                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(100):
    if os.path.exists(out + ".bind"):
        break
    time.sleep(0.05)
print(json.dumps(open(out + ".bind").read()))
'''


def test_a_dead_servers_address_cannot_be_taken_over_by_another_user(hub):
    """Route takeover: bob's server dies; before the hub notices, alice's process tries to listen
    where the proxy sends bob's requests. She must get no request and no token of his."""
    ensure_user(hub, "iso-victim", ["ml-users"])
    ensure_user(hub, "iso-thief", ["ml-users"])
    victim, thief = user_token(hub, "iso-victim"), user_token(hub, "iso-thief")
    start_server(hub, "iso-thief", thief, {"profile": "small"})
    start_server(hub, "iso-victim", victim, {"profile": "small"})
    try:
        routes = re.findall(r"Adding user iso-victim to proxy /user/iso-victim/ => (\S+)", hub.hub_log())
        assert routes, "the hub did not log the victim's route"
        target = routes[-1]
        server_pid = kernel_json(hub, "iso-victim", victim, "import os, json; print(json.dumps(os.getppid()))")
        os.kill(server_pid, signal.SIGKILL)  # the server dies; the hub has not noticed yet
        time.sleep(0.5)
        bind = kernel_json(hub, "iso-thief", thief, TAKEOVER.replace("__TARGET__", repr(target)))
        r = requests.get(f"{hub.url}/user/iso-victim/api/contents", headers={"Authorization": f"token {victim}"},
                         timeout=30, allow_redirects=False)
        time.sleep(1)
        captured = kernel_json(hub, "iso-thief", thief, """
import json, os
path = os.path.expanduser("~/captured")
print(json.dumps(open(path, errors="replace").read() if os.path.exists(path) else ""))
""")
    finally:
        stop_server(hub, "iso-victim")
        stop_server(hub, "iso-thief")
    assert victim not in captured, "the other user's process received the victim's token"
    assert captured == "", f"the other user's process received the victim's request: {captured[:200]!r}"
    assert bind.startswith("refused"), f"another account could listen at the victim's address ({bind})"
    assert r.status_code != 200


def test_hub_names_that_map_alike_never_share_an_account_home_or_cgroup(hub):
    """`iso.dot` needs hashing (`jupyter-iso-dot-<hash>`); a second user whose name is exactly that
    hashed form, and a pair of long names, must each get their own account, home and cgroup, and
    starting one must not end the other."""
    from mlaas.accounts import account_name

    dotted = "iso.dot"
    lookalike = account_name(dotted)[len("jupyter-"):]
    long_name = "iso-" + "l" * 40
    long_lookalike = account_name(long_name)[len("jupyter-"):]
    names = [dotted, lookalike, long_name, long_lookalike]
    tokens = {}
    for name in names:
        ensure_user(hub, name, ["ml-users"])
        tokens[name] = user_token(hub, name)
    facts = {}
    try:
        for name in names:
            start_server(hub, name, tokens[name], {"profile": "small"})
            facts[name] = kernel_json(hub, name, tokens[name], f"""
import json, os
open(os.path.expanduser("~/owner.txt"), "w").write({name!r})
print(json.dumps({{"uid": os.getuid(), "home": os.path.expanduser("~"),
                  "cgroup": open("/proc/self/cgroup").read()}}))
""")
        for name in names:  # every server still runs, and each home holds only its owner's file
            model = hub.api().get(f"{hub.url}/hub/api/users/{name}").json()
            assert model["servers"][""]["ready"], f"{name}'s server was ended by another user's start"
            owner = kernel_json(hub, name, tokens[name], """
import json, os
print(json.dumps(open(os.path.expanduser("~/owner.txt")).read()))
""")
            assert owner == name
    finally:
        for name in names:
            stop_server(hub, name)
    assert len({f["uid"] for f in facts.values()}) == len(names)
    assert len({f["home"] for f in facts.values()}) == len(names)
    assert len({f["cgroup"] for f in facts.values()}) == len(names)


def test_a_fork_bomb_ends_at_the_servers_process_limit(hub, pair):
    """The test platform allows 256 processes and threads per server (`max_processes`): forking
    beyond it fails in the server, and the machine (and bob's server) carry on."""
    bomb = """
import json, os, signal, time
children, error = [], None
try:
    for _ in range(600):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
except OSError as e:
    error = type(e).__name__
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print(json.dumps({"forked": len(children), "error": error}))
"""
    # in a child of the kernel: the kernel and the server need a few threads of their own meanwhile
    result = kernel_json(hub, "iso-alice", pair["iso-alice"], f"""
import subprocess, sys
print(subprocess.run([sys.executable, "-c", {bomb!r}], capture_output=True, text=True, timeout=120).stdout)
""")
    assert result["error"] == "BlockingIOError"  # EAGAIN: the limit, not the machine's end
    assert 100 < result["forked"] < 256
    model = hub.api().get(f"{hub.url}/hub/api/users/iso-bob").json()
    assert model["servers"][""]["ready"]


def test_the_hub_names_its_process_and_disk_limits_at_start(hub):
    log = hub.hub_log()
    assert re.search(r"Resource limits for local servers: .*(pids\.max 256|RLIMIT_NPROC 256)", log)
    assert re.search(r"Disk quotas for homes: (user quotas on \S+|none: \S+ \(\w+\) is .*a user can fill it)", log)


def test_deleting_a_user_removes_their_account_and_keeps_their_home_for_admins_only(hub: RunningPlatform):
    """An admin deletes a user (the REST API the admin page uses): the system account is gone, the
    home is moved under state/removed (root only) with its files, and a new user of the same
    name starts with a new, empty home."""
    import pwd
    import stat

    ensure_user(hub, "leaver", ["ml-users"])
    token = user_token(hub, "leaver")
    start_server(hub, "leaver", token, {"profile": "small"})
    account = kernel_json(hub, "leaver", token, "import json, os, pwd; print(json.dumps(pwd.getpwuid(os.getuid()).pw_name))")
    r = hub.api(token).put(f"{hub.url}/user/leaver/api/contents/notes.txt",
                           json={"type": "file", "format": "text", "content": "results of 3 years"})
    assert r.status_code in (200, 201), r.text
    stop_server(hub, "leaver")
    homes = hub.platform.settings.homes_dir
    assert (homes / account / "notes.txt").exists()

    assert hub.api().delete(f"{hub.url}/hub/api/users/leaver").status_code == 204
    with pytest.raises(KeyError):
        pwd.getpwnam(account)
    assert not (homes / account).exists()
    removed = homes.parent / "removed"
    (kept,) = removed.glob(f"{account}-*")
    assert (kept / "notes.txt").read_text() == "results of 3 years"
    assert stat.S_IMODE(removed.stat().st_mode) == 0o700 and removed.stat().st_uid == 0
    assert "Removed user leaver: account" in hub.hub_log()

    ensure_user(hub, "leaver", ["ml-users"])  # the name again: a new person's empty home
    token = user_token(hub, "leaver")
    try:
        start_server(hub, "leaver", token, {"profile": "small"})
        names = [f["name"] for f in hub.api(token).get(f"{hub.url}/user/leaver/api/contents").json()["content"]]
        assert "notes.txt" not in names
    finally:
        stop_server(hub, "leaver")
