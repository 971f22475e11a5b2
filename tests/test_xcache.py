"""Remote data through XCache: real XRootD origins and fixed-origin caches on loopback
(Debian's xrootd-server), read with the real client through `mlaas.data`."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import needs_root
from helpers import free_port, kernel_json, start_server, stop_server, ensure_user, user_token, state_root
from mlaas import data
from mlaas.xcache import (
    DataSettings,
    OriginSettings,
    cache_process,
    client_env,
    client_map,
    origin_process,
    render_cache_config,
    xrootd_binary,
)

pytestmark = pytest.mark.skipif(
    xrootd_binary() is None and not os.environ.get("CI"),
    reason="xrootd-server is not installed (apt-get install xrootd-server xrootd-server-plugins); CI installs it",
)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(scope="module")
def site():
    """Two origins that both serve /store/same/x.txt (different bytes), a cache for each."""
    root = state_root() / f"xcache-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    origins = {}
    for name in ("alpha", "beta"):
        port = free_port()
        server = origin_process(name, port, root / "origins" / name / "data", root)
        store = server.base_dir / "data" / "store"
        (store / "same").mkdir(parents=True)
        (store / "same" / "x.txt").write_bytes(f"bytes of {name}\n".encode())
        (store / name).mkdir()
        (store / name / "big.bin").write_bytes(os.urandom(8 * 2**20))
        (store / name / "cold.bin").write_bytes(os.urandom(2**20))
        (store / name / "huge.bin").write_bytes(os.urandom(96 * 2**20))
        server.start()
        origins[name] = (port, server)
    settings = DataSettings(
        origins=[
            OriginSettings(name=n, url=f"root://127.0.0.1:{p}", namespace=f"/store/{n}", cache_port=free_port())
            for n, (p, _) in origins.items()
        ]
    )
    caches = [cache_process(o, settings, root) for o in settings.origins]
    for c in caches:
        c.start()
    env = client_env(settings, root)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"root": root, "settings": settings, "origins": origins, "caches": caches}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for c in caches:
        c.stop()
    for _, server in origins.values():
        server.stop()


def origin_url(site, name: str, path: str) -> str:
    return f"root://127.0.0.1:{site['origins'][name][0]}//{path.lstrip('/')}"


def test_read_through_the_cache_is_byte_identical_and_then_cached(site):
    original = (site["origins"]["alpha"][1].base_dir / "data" / "store" / "alpha" / "big.bin").read_bytes()
    assert sha(data.read_bytes("/store/alpha/big.bin")) == sha(original)  # logical path
    assert sha(data.read_bytes(origin_url(site, "alpha", "/store/alpha/big.bin"))) == sha(original)  # origin URL
    cached = site["root"] / "xcache" / "alpha" / "data" / "store" / "alpha"
    assert (cached / "big.bin").exists() and (cached / "big.bin.cinfo").exists()


def _local_target(f) -> str | None:
    """Where a file object returned by `mlaas.data.open` reads from, if it is a local file."""
    try:
        return os.readlink(f"/proc/self/fd/{f.fileno()}")
    except (OSError, ValueError, AttributeError, NotImplementedError, io.UnsupportedOperation):
        return None


def handed_over(path: str, within: float = 30):
    """`data.open(path)` once the cache hands over its copy: it records a file complete when the
    last block is written, mostly at once, sometimes a moment after the read that fetched it."""
    deadline = time.monotonic() + within
    while True:
        f = data.open(path)
        if _local_target(f) is not None or time.monotonic() > deadline:
            return f
        f.close()
        time.sleep(0.1)


def test_a_file_the_cache_holds_completely_is_read_from_its_copy_with_the_same_bytes(site):
    original = (site["origins"]["beta"][1].base_dir / "data" / "store" / "beta" / "cold.bin").read_bytes()
    with data.open("/store/beta/cold.bin") as f:  # first read: streamed by the cache from the origin
        assert _local_target(f) is None
        assert sha(f.read()) == sha(original)
    copy = site["root"] / "xcache" / "beta" / "data" / "store" / "beta" / "cold.bin"
    f = handed_over("/store/beta/cold.bin")  # the cache holds it all now (once it has recorded that)
    with f:
        assert _local_target(f) == str(copy)
        assert sha(f.read()) == sha(original)
    with data.open(origin_url(site, "beta", "/store/beta/cold.bin"), "r", encoding="latin-1", newline="") as f:  # text too
        assert _local_target(f) == str(copy)
        assert f.read() == original.decode("latin-1")


def test_a_file_the_cache_holds_only_in_part_is_never_handed_out(site):
    """The cache's copy of a file read only in part has holes: reading it directly would give
    wrong bytes, so the cache streams it instead (and completes it on the way)."""
    import fsspec

    original = (site["origins"]["alpha"][1].base_dir / "data" / "store" / "alpha" / "huge.bin").read_bytes()
    with fsspec.open(data.url("/store/alpha/huge.bin"), "rb", block_size=2**16) as f:
        assert f.read(4096) == original[:4096]
    copy = site["root"] / "xcache" / "alpha" / "data" / "store" / "alpha" / "huge.bin"
    assert copy.exists() and sha(copy.read_bytes()) != sha(original)  # in part: handing it out would be wrong
    with data.open("/store/alpha/huge.bin") as f:
        assert _local_target(f) is None
        assert sha(f.read()) == sha(original)


def test_a_file_in_the_caches_directory_that_the_cache_did_not_fetch_is_never_handed_out(site):
    """Only the cache's own record (its .cinfo) makes a copy complete: a file that appears in its
    directory otherwise (planted, left from another installation) is not served, and a file the
    origin does not have stays missing."""
    planted = site["root"] / "xcache" / "beta" / "data" / "store" / "beta" / "planted.bin"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"not from the origin\n")
    planted.chmod(0o644)
    with pytest.raises(data.DataAccessError, match=r"/store/beta/planted.bin does not exist at origin"):
        data.read_bytes("/store/beta/planted.bin")


def test_direct_access_only_for_caches_that_serve_this_machine_alone():
    """XRootD hands every client the local path of a complete file: a cache that other hosts use
    must not, or their reads would fail. So direct access needs a loopback cache host."""
    local = DataSettings()
    shared = DataSettings(cache_host="10.0.0.5")
    origin = local.origins[0]
    assert "pss.dca world" in render_cache_config(origin, Path("/c"), Path("/a"), "1g", True, local.direct)
    assert client_map(local, Path("/state"))["direct"] == {"root://127.0.0.1:1095": "/state/xcache/demo/data"}
    assert not shared.direct and "direct" not in client_map(shared, Path("/state"))
    assert "pss.dca" not in render_cache_config(origin, Path("/c"), Path("/a"), "1g", False, shared.direct)
    with pytest.raises(ValueError, match="serves this machine only"):
        render_cache_config(origin, Path("/c"), Path("/a"), "1g", False, True)
    remote = OriginSettings(name="far", url="root://origin.example.org:1094", cache_port=1096)
    assert "pfc.cschk off" not in render_cache_config(remote, Path("/c"), Path("/a"), "1g", True, True)


def test_two_origins_with_the_same_path_never_share_bytes(site):
    assert data.read_bytes(origin_url(site, "alpha", "/store/same/x.txt")) == b"bytes of alpha\n"
    assert data.read_bytes(origin_url(site, "beta", "/store/same/x.txt")) == b"bytes of beta\n"
    assert data.read_bytes(origin_url(site, "alpha", "/store/same/x.txt")) == b"bytes of alpha\n"


def test_the_cache_is_not_an_open_proxy(site):
    import fsspec

    alpha_cache = data.url("/store/alpha/big.bin").split("//store")[0]
    forwarding = f"{alpha_cache}//{origin_url(site, 'beta', '/store/same/x.txt')}"
    with pytest.raises(OSError, match=r"\[3011\]"):
        with fsspec.open(forwarding, "rb") as f:
            f.read()
    with pytest.raises(data.OriginNotPermitted, match=r"origin root://127.0.0.1:1 is not served by this site's caches"):
        data.read_bytes("root://127.0.0.1:1//store/same/x.txt")
    with pytest.raises(data.OriginNotPermitted, match="is under no namespace this site serves"):
        data.read_bytes("/store/gamma/x.txt")


@pytest.mark.parametrize(
    "bad",
    ["http://example.org/file", "root://127.0.0.1:1094/no-double-slash", "root://nohost//x", "/store/alpha/../beta/x",
     "relative/path.txt", "/store/alpha//x"],
)
def test_bad_urls_are_refused_with_the_reason(site, bad):
    with pytest.raises(data.BadDataURL) as e:
        data.resolve(bad)
    assert repr(bad) in str(e.value)


def test_missing_file_is_named(site):
    with pytest.raises(data.DataAccessError, match=r"/store/alpha/nope.bin does not exist at origin root://127.0.0.1:\d+"):
        data.read_bytes("/store/alpha/nope.bin")


def test_two_readers_of_one_cold_file_both_get_the_right_bytes(site):
    original = (site["origins"]["beta"][1].base_dir / "data" / "store" / "beta" / "big.bin").read_bytes()
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(sha(data.read_bytes("/store/beta/big.bin")))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [sha(original)] * 2


def test_origin_down_cached_files_still_read_uncached_fail_clearly(site):
    data.read_bytes("/store/alpha/big.bin")  # make sure it is cached
    port, origin = site["origins"]["alpha"]
    origin.stop()
    try:
        assert len(data.read_bytes("/store/alpha/big.bin")) == 8 * 2**20
        with pytest.raises(data.DataAccessError) as e:
            data.read_bytes("/store/alpha/cold.bin")
        assert f"origin root://127.0.0.1:{port} is unreachable and /store/alpha/cold.bin is not in the site cache" in str(e.value)
    finally:
        origin.start()
    # the cache reaches the origin again within seconds (and the next tests find the site whole)
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        try:
            assert len(data.read_bytes("/store/alpha/cold.bin")) == 2**20
            break
        except data.DataAccessError as e:
            last = e
            time.sleep(0.5)
    else:
        raise AssertionError(f"the cache did not reach the restarted origin in 30 s: {last}")


def test_a_users_notebook_reads_the_demo_dataset_through_the_platforms_cache(hub):
    ensure_user(hub, "reader", ["ml-users"])
    token = user_token(hub, "reader")
    start_server(hub, "reader", token, {"profile": "small"})
    try:
        facts = kernel_json(
            hub, "reader", token,
            """
import json, pandas
from mlaas import data
df = pandas.read_parquet(data.open("/store/demo/events.parquet"))
print(json.dumps({"rows": len(df), "columns": sorted(df.columns), "url": data.url("/store/demo/events.parquet")}))
""",
        )
    finally:
        stop_server(hub, "reader")
    assert facts["rows"] == 20_000
    assert facts["columns"] == ["eta", "label", "mass", "njets", "pt"]
    cache_port = hub.platform.settings.data.origins[0].cache_port
    assert facts["url"] == f"root://127.0.0.1:{cache_port}//store/demo/events.parquet"


@needs_root
def test_a_users_server_reads_the_caches_copy_but_cannot_change_it(hub):
    """The cache's copies are readable by this machine's accounts, as the cache serves them, and
    writable by the cache alone: no user can change what the next reader gets (poisoning), plant
    a file, or read the cache's records, logs and admin files."""
    ensure_user(hub, "cachereader", ["ml-users"])
    token = user_token(hub, "cachereader")
    start_server(hub, "cachereader", token, {"profile": "small"})
    base = hub.platform.settings.state_dir / "xcache" / "demo"
    try:
        facts = kernel_json(
            hub, "cachereader", token,
            f"""
import hashlib, json, os, time
from mlaas import data
first = data.read_bytes("/store/demo/events.parquet")
for _ in range(300):  # the cache hands its copy over once it has recorded it complete (mostly at once)
    f = data.open("/store/demo/events.parquet")
    if not hasattr(f, "fs"):
        break
    f.close()
    time.sleep(0.1)
where = os.readlink(f"/proc/self/fd/{{f.fileno()}}")
second = f.read()

def attempt(action):
    try:
        action()
        return "done"
    except PermissionError:
        return "refused"

base = {str(base)!r}
print(json.dumps({{
    "uid": os.getuid(), "where": where, "same": hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest(),
    "size": len(second),
    "write": attempt(lambda: open(where, "r+b").write(b"x")),
    "unlink": attempt(lambda: os.unlink(where)),
    "plant": attempt(lambda: open(os.path.join(os.path.dirname(where), "planted.parquet"), "wb")),
    "record": attempt(lambda: open(where + ".cinfo", "rb").read()),
    "logs": attempt(lambda: os.listdir(os.path.join(base, "logs"))),
    "admin": attempt(lambda: os.listdir(os.path.join(base, "admin"))),
}}))
""",
        )
    finally:
        stop_server(hub, "cachereader")
    assert facts["uid"] != 0
    assert facts["where"] == str(base / "data" / "store" / "demo" / "events.parquet")
    assert facts["same"] and facts["size"] == (base / "data" / "store" / "demo" / "events.parquet").stat().st_size
    assert {k: facts[k] for k in ("write", "unlink", "plant", "record", "logs", "admin")} == dict.fromkeys(
        ("write", "unlink", "plant", "record", "logs", "admin"), "refused")


def _cache_port(site, name: str) -> int:
    return next(o.cache_port for o in site["settings"].origins if o.name == name)


def test_origins_and_caches_refuse_writes_and_deletes(site):
    """Nobody changes a site's data through the platform's XRootD servers: the origin and the
    cache export read-only (XRootD's `r/o`), whatever the client asks."""
    from XRootD import client
    from XRootD.client.flags import OpenFlags

    origin_file = site["origins"]["alpha"][1].base_dir / "data" / "store" / "alpha" / "cold.bin"
    before = origin_file.read_bytes()
    for port in (site["origins"]["alpha"][0], _cache_port(site, "alpha")):
        base = f"root://127.0.0.1:{port}"
        status, _ = client.FileSystem(base).rm("/store/alpha/cold.bin")
        assert not status.ok, f"deleted through {base}"
        f = client.File()
        status, _ = f.open(f"{base}//store/alpha/new.bin", OpenFlags.NEW)
        assert not status.ok, f"created a file through {base}"
        status, _ = f.open(f"{base}//store/alpha/cold.bin", OpenFlags.UPDATE)
        assert not status.ok, f"opened for writing through {base}"
        status, _ = client.FileSystem(base).mkdir("/store/alpha/newdir")
        assert not status.ok, f"made a directory through {base}"
    assert origin_file.read_bytes() == before
    assert not (origin_file.parent / "new.bin").exists() and not (origin_file.parent / "newdir").exists()


def _global_ipv4() -> str | None:
    import subprocess

    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        return line.split()[3].split("/")[0]
    return None


def _stat_ok(url: str, path: str) -> bool:
    """Stat through a fresh client process with short connection retries (the XRootD client reads
    them once per process, and this one already has the defaults: minutes of retrying)."""
    import subprocess
    import sys

    code = f"from XRootD import client; print(client.FileSystem({url!r}).stat({path!r})[0].ok)"
    env = dict(os.environ, XRD_CONNECTIONRETRY="1", XRD_CONNECTIONWINDOW="3", XRD_REQUESTTIMEOUT="5",
               XRD_STREAMERRORWINDOW="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return out.stdout.strip() == "True"


def test_the_demo_origin_and_loopback_caches_refuse_other_hosts(site):
    """XRootD listens on every interface (5.5 cannot bind one address): `xrd.allow` makes the demo
    origin and a cache whose clients are on this machine refuse any other host."""
    address = _global_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    for port in (site["origins"]["alpha"][0], _cache_port(site, "alpha")):
        assert _stat_ok(f"root://127.0.0.1:{port}", "/store/alpha/cold.bin")
        assert not _stat_ok(f"root://{address}:{port}", "/store/alpha/cold.bin"), f"port {port} answered {address}"
