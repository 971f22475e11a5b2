"""Servers forked from the pre-started server process (mlaas.zygote) keep every guarantee of an
exec'd start: nothing of the hub's or another user's reaches them (no secret in their memory, no
shared descriptor, no foreign environment variable), the zygote itself never holds a user's
request, users cannot talk to it, and each server has its own account, groups, umask, cgroup and
the values its own import would have computed (its home, its user name, its hub URL)."""

from __future__ import annotations

import ctypes
import os
import re
import stat
from pathlib import Path

import pytest
import yaml

from conftest import needs_root
from mlaas.capacity.process_owner import parent_of
from helpers import RunningPlatform, ensure_user, kernel_json, start_server, stop_server, user_token

pytestmark = needs_root
USERS = ("zy-alice", "zy-bob")


def zygote_pid(hub: RunningPlatform) -> int:
    return int(re.findall(r"pre-started server process \(pid (\d+)", hub.hub_log())[-1])


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def memory_holds(pid: int, needles: set[bytes]) -> set[bytes]:
    """Which of `needles` are anywhere in the process's readable memory (root reads /proc/PID/mem)."""
    found: set[bytes] = set()
    longest = max(len(n) for n in needles)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("r") or end - start > 1 << 30 or (len(fields) > 5 and fields[5] == "[vvar]"):
                continue
            tail = b""
            for offset in range(start, end, 1 << 22):
                try:
                    mem.seek(offset)
                    chunk = tail + mem.read(min(1 << 22, end - offset))
                except OSError:
                    tail = b""
                    continue
                found |= {n for n in needles if n in chunk}
                tail = chunk[-longest:]
    return found


KCMP_FILE = 0
SYS_KCMP = {"x86_64": 312, "aarch64": 272}[os.uname().machine]


def descriptors(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return out


def shared_descriptors(pid: int, other: int) -> list[str]:
    """Descriptors of `pid` (beyond stdin, stdout, stderr) that are the very same open file as one
    of `other`'s: kcmp(2), which also tells apart anonymous inodes (epoll, eventfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    mine, theirs = descriptors(pid), descriptors(other)
    return [f"{fd} -> {target}" for fd, target in mine.items() if fd > 2 and any(
        libc.syscall(SYS_KCMP, pid, other, KCMP_FILE, fd, their_fd) == 0 for their_fd in theirs)]


def platform_secrets(hub: RunningPlatform, hub_pid: int) -> set[bytes]:
    """Every secret the platform holds: its secrets directory, the ops token, the proxy's token."""
    values: set[str] = {hub.ops_token}
    for path in (hub.state_dir / "secrets").iterdir():
        text = path.read_text()
        if path.suffix == ".yaml":
            values |= {str(v) for v in (yaml.safe_load(text).get("passwords") or {}).values()}
        else:
            values.add(text.strip())
    proxy_token = environment_of(hub_pid).get("CONFIGPROXY_AUTH_TOKEN")
    if proxy_token:
        values.add(proxy_token)
    secrets = {v.encode() for v in values if len(v) >= 16}
    cookie = (hub.state_dir / "secrets" / "jupyterhub-cookie-secret").read_text().strip()
    secrets.add(bytes.fromhex(cookie))  # the hub holds it as bytes
    return secrets


@pytest.fixture(scope="module")
def forked(hub: RunningPlatform):
    for name in USERS:
        ensure_user(hub, name, ["ml-users"])
    tokens = {name: user_token(hub, name) for name in USERS}
    servers = {}
    for name in USERS:  # one after the other: bob's server is forked after alice's request was served
        start_server(hub, name, tokens[name], {"profile": "small"})
        servers[name] = kernel_json(hub, name, tokens[name], """
import json, os
print(json.dumps({"pid": os.getppid(), "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
                  "home": os.path.expanduser("~")}))
""", keep=True)
    yield tokens, servers
    for name in USERS:
        stop_server(hub, name)


def test_servers_are_forked_by_the_zygote_as_their_own_account(hub, forked):
    tokens, servers = forked
    zygote = zygote_pid(hub)
    for name in USERS:
        pid, seen = servers[name]["pid"], servers[name]
        assert parent_of(pid) == zygote, f"{name}'s server was not forked by the zygote"
        fields = status_fields(pid)
        assert fields["Uid"].split() == [str(seen["uid"])] * 4 and seen["uid"] != 0
        assert fields["Gid"].split() == [str(seen["gid"])] * 4
        assert fields["Umask"] == "0007"
        assert sorted(int(g) for g in fields["Groups"].split()) == seen["groups"]
        assert os.stat(f"/proc/{pid}/environ").st_uid == seen["uid"]  # "dumpable" as after an exec
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        assert "mlaas" in cgroup, cgroup  # its own placement, not the hub's cgroup
        assert Path(f"/proc/{pid}/cwd").resolve() == Path(seen["home"]).resolve()
        assert os.getsid(pid) == pid  # a session of its own
    assert servers["zy-alice"]["uid"] != servers["zy-bob"]["uid"]


def test_a_forked_server_has_its_own_environment_and_import_time_values(hub, forked):
    tokens, servers = forked
    hub_env = environment_of(parent_of(zygote_pid(hub)))
    for name in USERS:
        pid = servers[name]["pid"]
        env = environment_of(pid)
        assert env["JUPYTERHUB_USER"] == name and env["USER"] != "root"
        assert env["HOME"] == servers[name]["home"]
        assert not [k for k, v in env.items() if "mlaas-zygote-" in v]  # no stand-in value left
        hub_only = {"MLAAS_LAUNCH", "MLAAS_CONFIG", "CONFIGPROXY_AUTH_TOKEN", "JUPYTERHUB_CRYPT_KEY", "PGPASSFILE"}
        assert not hub_only & set(env), hub_only & set(env)
        assert "MLAAS_LAUNCH" in hub_env  # (the hub has it: the check above means something)
        cmdline = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        assert cmdline[1].endswith("/jupyterhub-singleuser")  # ps shows the server, as after an exec
    # values a server's own import computes from its environment are its user's: JupyterLab's
    # settings go to bob's home (the zygote imported JupyterLab with a home of its own)
    url = f"{hub.url}/user/zy-bob/lab/api/settings/@jupyterlab/apputils-extension:themes"
    r = hub.api(tokens["zy-bob"]).put(url, json={"raw": '{"theme": "JupyterLab Dark"}'})
    if r.status_code == 503:  # the proxy wrote to a kept-alive connection the server had just closed
        r = hub.api(tokens["zy-bob"]).put(url, json={"raw": '{"theme": "JupyterLab Dark"}'})  # (CHP: EPIPE, once in CI)
    assert r.status_code == 204, r.text
    saved = Path(servers["zy-bob"]["home"]) / ".jupyter/lab/user-settings/@jupyterlab/apputils-extension/themes.jupyterlab-settings"
    assert "JupyterLab Dark" in saved.read_text()
    assert "JupyterLab Dark" not in hub.hub_log()


def test_no_secret_of_the_hub_or_another_user_is_in_a_forked_server_or_the_zygote(hub, forked):
    tokens, servers = forked
    zygote = zygote_pid(hub)
    hub_pid = parent_of(zygote)
    alice_token = environment_of(servers["zy-alice"]["pid"])["JUPYTERHUB_API_TOKEN"].encode()
    bob_token = environment_of(servers["zy-bob"]["pid"])["JUPYTERHUB_API_TOKEN"].encode()
    secrets = platform_secrets(hub, hub_pid)
    assert memory_holds(hub_pid, secrets), "the scan finds the secrets where they are"  # the scan works
    assert memory_holds(servers["zy-bob"]["pid"], {bob_token}) == {bob_token}  # and a server's own token
    assert memory_holds(servers["zy-bob"]["pid"], secrets | {alice_token}) == set()
    assert memory_holds(servers["zy-alice"]["pid"], secrets | {bob_token}) == set()
    # the zygote forks before anything is read: no user's request ever entered its memory
    assert memory_holds(zygote, secrets | {alice_token, bob_token}) == set()


def test_a_forked_server_shares_no_descriptor_with_the_hub_the_zygote_or_another_server(hub, forked):
    tokens, servers = forked
    zygote = zygote_pid(hub)
    bob = descriptors(servers["zy-bob"]["pid"])
    assert len(bob) > 3, "the server has descriptors of its own (its socket, its event loop)"
    assert shared_descriptors(servers["zy-bob"]["pid"], servers["zy-bob"]["pid"]), "kcmp finds what is shared"
    for other, label in ((zygote, "zygote"), (parent_of(zygote), "hub"), (servers["zy-alice"]["pid"], "alice")):
        shared = shared_descriptors(servers["zy-bob"]["pid"], other)
        assert not shared, f"bob's server shares {shared} with the {label}"


def test_users_cannot_reach_the_zygote(hub, forked):
    tokens, servers = forked
    socket_dir = Path(re.findall(r"pre-started server process \(pid \d+, ([^)]+)\)", hub.hub_log())[-1]).parent
    mode = stat.S_IMODE(os.stat(socket_dir).st_mode)
    assert mode == 0o700 and os.stat(socket_dir).st_uid == os.getuid()
    tried = kernel_json(hub, "zy-bob", tokens["zy-bob"], f"""
import glob, json, socket
results = []
for path in glob.glob("/run/mlaas-*/zygote/spawn.sock") + [{str(socket_dir / "spawn.sock")!r}]:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.sendall(b"S")
        results.append("answered: " + repr(s.recv(4)))
    except OSError as e:
        results.append(type(e).__name__)
print(json.dumps(results))
""")
    assert tried and all(r == "PermissionError" for r in tried), tried
