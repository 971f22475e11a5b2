"""Pure-logic units: entitlement mapping, resource parsing, device allocation, the profile store."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from helpers import FIXTURES
from mlaas.auth import groups_from_entitlements
from mlaas.capacity import DeviceAllocator, NoCapacity
from mlaas.capacity.simulated import SimulatedInventory
from mlaas.profiles import ProfileErrors, ProfileStore, load_profile_dir
from mlaas.profiles.loader import parse_profile_text

EGI = ["urn:mace:egi.eu:group:"]


def test_egi_entitlements_map_to_groups_and_only_member_role_counts():
    urns = [
        "urn:mace:egi.eu:group:atlas-ml:role=member#aai.egi.eu",
        "urn:mace:egi.eu:group:vo.example.eu:gpu-users:role=member#aai.egi.eu",
        "urn:mace:egi.eu:group:cms:role=manager#aai.egi.eu",
        "urn:mace:egi.eu:group:atlas-ml:role=member#aai.egi.eu",
        "urn:geant:other.org:res:thing",
    ]
    assert groups_from_entitlements(urns, EGI, ["member"]) == ["atlas-ml", "vo.example.eu:gpu-users"]
    assert "cms" in groups_from_entitlements(urns, EGI, ["member", "manager"])


def test_negative_cpu_is_an_error_with_position():
    text = "profiles:\n  - slug: a\n    display_name: A\n    cpu: {limit: -2}\n    memory: {limit: 1Gi}\n    groups: ['*']\n"
    _, errors = parse_profile_text(text, "x.yaml")
    assert [str(e) for e in errors] == ["x.yaml:4 profiles[0].cpu.limit: -2 is negative"]


def test_missing_required_field_is_named():
    text = "profiles:\n  - slug: a\n    cpu: {limit: 1}\n    memory: {limit: 1Gi}\n    groups: ['*']\n"
    _, errors = parse_profile_text(text, "x.yaml")
    assert [str(e) for e in errors] == ["x.yaml:2 profiles[0] (a).display_name: is required"]


def test_allocator_gives_each_device_once_and_frees_on_release():
    pset = load_profile_dir(FIXTURES / "profiles")
    mig, gpu = pset.get("mig-atlas"), pset.get("gpu-one")
    alloc = DeviceAllocator(SimulatedInventory(FIXTURES / "inventory-a100-mig.yaml"))
    assert (alloc.availability(mig).free, alloc.availability(mig).total) == (2, 2)
    first = alloc.claim("alice/", mig)
    second = alloc.claim("carol/", mig)
    assert {d.uuid for d in first}.isdisjoint({d.uuid for d in second})
    assert all(d.uuid.startswith("MIG-") for d in first + second)
    with pytest.raises(NoCapacity, match="all 2 MIG 3g.20gb instances are in use"):
        alloc.claim("dave/", mig)
    # the MIG-split GPU is not offered whole; the other one is
    assert [d.uuid for d in alloc.claim("bob/", gpu)] == ["GPU-11111111-aaaa-bbbb-cccc-000000000001"]
    alloc.release("alice/")
    assert alloc.availability(mig).free == 1
    assert alloc.claim("dave/", mig)[0].uuid == first[0].uuid


def test_a_request_during_a_reload_gets_the_reloaded_profiles(tmp_path: Path, monkeypatch):
    """The hub's watcher thread may be parsing an edit when a request asks the store for fresh
    profiles: the request waits for that reload, never answers with the profiles before the edit
    (an admin disabled a profile and the user's next request still offered it)."""
    import asyncio
    import threading

    import mlaas.profiles.store as store_module

    directory = tmp_path / "profiles"
    shutil.copytree(FIXTURES / "profiles", directory)
    store = ProfileStore(directory, tmp_path / "snapshot.json", logging.getLogger("test-store"))
    assert "atlas-cpu" in store.current().slugs
    text = (directory / "cpu.yaml").read_text()
    (directory / "cpu.yaml").write_text(text.replace("- slug: atlas-cpu", "- slug: atlas-cpu\n    enabled: false", 1))

    parsing, release = threading.Event(), threading.Event()
    real_load = store_module.load_profile_dir

    def slow_load(path):  # the watcher's parse, held while the request comes
        parsing.set()
        release.wait(10)
        return real_load(path)

    monkeypatch.setattr(store_module, "load_profile_dir", slow_load)
    watcher = threading.Thread(target=store.refresh)
    watcher.start()
    assert parsing.wait(10)

    async def request():
        answer = asyncio.ensure_future(store.fresh())
        await asyncio.sleep(0.2)
        assert not answer.done(), "answered before the reload in progress finished"
        release.set()
        return await answer

    pset = asyncio.run(request())
    watcher.join(10)
    assert pset.get("atlas-cpu").enabled is False


def test_store_keeps_last_good_profiles_when_an_edit_is_broken(tmp_path: Path, caplog):
    directory = tmp_path / "profiles"
    shutil.copytree(FIXTURES / "profiles", directory)
    store = ProfileStore(directory, tmp_path / "snapshot.json", logging.getLogger("test-store"))
    assert "small" in store.current().slugs
    (directory / "cpu.yaml").write_text((directory / "cpu.yaml").read_text().replace("limit: 512Mi", "limit: lots"))
    with caplog.at_level(logging.ERROR, logger="test-store"):
        pset = store.current()
    assert "small" in pset.slugs and pset.get("small").memory.limit == 512 * 2**20
    assert "cpu.yaml:7 profiles[0].memory.limit: 'lots' is not a memory size" in caplog.text
    # a restarted hub with the broken file still has the last good set (from the snapshot)
    restarted = ProfileStore(directory, tmp_path / "snapshot.json", logging.getLogger("test-store"))
    assert restarted.current().slugs == pset.slugs
    assert json.loads((tmp_path / "snapshot.json").read_text())["profiles"][0]["slug"] == "small"
    # a valid edit takes effect
    (directory / "cpu.yaml").write_text((directory / "cpu.yaml").read_text().replace("limit: lots", "limit: 640Mi"))
    assert store.current().get("small").memory.limit == 640 * 2**20
    assert store.errors == []


def test_profile_errors_lists_every_problem():
    with pytest.raises(ProfileErrors) as e:
        load_profile_dir(FIXTURES / "bad")
    files = {err.file.rsplit("/", 1)[-1] for err in e.value.errors}
    assert files == {"broken.yaml", "unknown_field.yaml", "absurd.yaml"}


def test_dask_group_limits_count_all_members_clusters():
    from mlaas.dask_gateway import ClusterUse, new_cluster_refusal, scale_refusal
    from mlaas.profiles.loader import parse_file

    text = (
        "quotas:\n  - group: atlas-ml\n    dask: {clusters: 2, cores: 10}\n"
        "dask:\n  per_user: {clusters: 5, cores: 100}\n"
    )
    parsed, errors = parse_file(text, "q.yaml")
    assert errors == []
    from mlaas.profiles import ProfileSet

    pset = ProfileSet((), {}, tuple(q for q, _ in parsed.quotas), parsed.dask[0][0])
    team = frozenset({"atlas-ml"})
    a = ClusterUse("c-alice", "alice", team, workers=4, cores_per_worker=2, memory_per_worker=2**30, gpus_per_worker=0)
    b = ClusterUse("c-bob", "bob", team, workers=0, cores_per_worker=1, memory_per_worker=2**30, gpus_per_worker=0)
    reason, fits = scale_refusal(pset, [a, b], b, 3)
    assert fits == 2
    assert reason == (
        "group atlas-ml may use 10 worker cores in Dask clusters; other clusters use 8 worker cores "
        "(c-alice: 8 worker cores), so cluster c-bob can have at most 2 workers of 1 worker cores each, not 3"
    )
    assert scale_refusal(pset, [a, b], b, 2) == (None, 2)
    assert new_cluster_refusal(pset, [a, b], "carol", ["atlas-ml"]) == (
        "group atlas-ml may have 2 Dask cluster(s) and has 2: c-alice (alice), c-bob (bob)"
    )
    assert new_cluster_refusal(pset, [a, b], "carol", ["cms"]) is None


def test_project_names_are_valid_and_distinct_for_awkward_group_names():
    from mlaas.projects import project_user, role_name, unix_group

    assert project_user("atlas-ml") == "project-atlas-ml"
    assert role_name("atlas-ml") == "mlaas-project-atlas-ml"
    awkward = ["vo.example.eu:atlas-ml", "vo.example.eu/atlas-ml", "Atlas-ML", "a" * 120]
    users = {project_user(g) for g in awkward} | {project_user("atlas-ml")}
    assert len(users) == len(awkward) + 1  # never two groups on one project user
    for g in awkward:
        assert len(unix_group(g)) <= 32 and unix_group(g).startswith("mlaas-p-")
        assert project_user(g).replace("-", "").isalnum()


def test_nobody_may_log_in_under_a_project_name():
    import asyncio

    from tornado import web

    from mlaas.auth import MLaaSAuthenticator

    auth = MLaaSAuthenticator(allowed_groups={"atlas-ml"}, manage_groups=True)
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(auth.check_allowed("project-atlas-ml", {"name": "project-atlas-ml", "groups": ["atlas-ml"]}))
    assert refused.value.status_code == 403 and "reserved for group projects" in refused.value.log_message


def test_projects_section_is_validated_with_file_and_line(tmp_path):
    bad = "projects:\n  - group: atlas-ml\n  - group: '*'\n  - group: atlas-ml\n"
    (tmp_path / "p.yaml").write_text(bad)
    with pytest.raises(ProfileErrors) as e:
        load_profile_dir(tmp_path)
    text = str(e.value)
    assert "p.yaml:3 projects[1].group" in text and "is not a group name" in text


def test_account_registry_is_one_to_one_and_persistent(tmp_path):
    from mlaas.accounts import AccountRegistry, account_name

    registry = AccountRegistry(tmp_path / "accounts.sqlite")
    dotted = "x.y"
    lookalike = account_name(dotted)[len("jupyter-"):]
    assert account_name(lookalike) == account_name(dotted)  # the collision the registry exists for
    first = registry.account_for(dotted)
    second = registry.account_for(lookalike)
    assert first != second and len(second) <= 32
    again = AccountRegistry(tmp_path / "accounts.sqlite")  # a hub restart
    assert (again.account_for(lookalike), again.account_for(dotted)) == (second, first)
    names = ["u" * 60, "u" * 61, "U" * 60]
    accounts = [registry.account_for(n) for n in names]
    assert len(set(accounts)) == 3 and all(len(a) <= 32 for a in accounts)


def test_disk_quota_support_is_read_from_the_mount_options(tmp_path):
    from mlaas.diskquota import support

    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw,relatime 0 0\n"
        "/dev/vdb /srv/homes ext4 rw,relatime,usrjquota=aquota.user,jqfmt=vfsv1 0 0\n"
        "/dev/vdc /srv/homes-xfs xfs rw,uquota 0 0\n"
    )
    plain = support(tmp_path / "x", str(mounts))
    assert (plain.mount, plain.enabled) == ("/", False)
    assert "not mounted with user quotas" in plain.describe(2**30) and "a user can fill it" in plain.describe(2**30)
    assert support(tmp_path.parent / "srv" / "homes" / "a", str(mounts)).enabled is False  # not under that mount
    from pathlib import Path

    assert support(Path("/srv/homes/jupyter-a"), str(mounts)).enabled is True
    assert support(Path("/srv/homes-xfs/jupyter-a"), str(mounts)).enabled is True


def test_log_scrubbing_hides_secrets_in_urls_and_headers_and_leaves_the_rest():
    from mlaas.logscrub import scrub

    assert scrub("GET /hub/oauth_callback?code=abc123&state=eyJ0&iss=http%3A") == \
        "GET /hub/oauth_callback?code=[secret]&state=[secret]&iss=http%3A"
    assert scrub("already ?code=[secret]&state=[secret]") == "already ?code=[secret]&state=[secret]"
    assert scrub("{'Authorization': 'token abc'}") == "{'Authorization': 'token [secret]'}"
    assert scrub("?_xsrf=2|abc&token=t0k3n") == "?_xsrf=[secret]&token=[secret]"
    assert scrub("decode=ok codes=1 statement=2") == "decode=ok codes=1 statement=2"


def test_the_gpu_fence_keeps_only_the_given_gpu_or_mig_instance_nodes(tmp_path):
    """The fence's choice of device nodes, from the driver's capability files as NVIDIA's MIG user
    guide lays them out (a stand-in tree: no driver here)."""
    from mlaas.capacity.base import Device
    from mlaas.gpu_fence import hidden_nodes, mig_capability_minors

    proc = tmp_path / "capabilities"
    for path, minor in {"gpu1/mig/gi2/access": 21, "gpu1/mig/gi2/ci0/access": 22, "gpu1/mig/gi3/access": 30}.items():
        (proc / path).parent.mkdir(parents=True, exist_ok=True)
        (proc / path).write_text(f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
    assert mig_capability_minors(1, 2, 0, proc) == (21, 22)
    assert mig_capability_minors(1, 3, 0, proc) == (30,)  # a missing file gives nothing, never a guess
    dev = tmp_path / "dev"
    for name in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap21",
                 "nvidia-caps/nvidia-cap22", "nvidia-caps/nvidia-cap30"]:
        (dev / name).parent.mkdir(parents=True, exist_ok=True)
        (dev / name).touch()
    mig = Device("MIG-x", "mig", "NVIDIA A100-SXM4-40GB", 20 * 10**9, "1:0", "3g.20gb", "GPU-b", minor=1, caps=(21, 22))
    gpu = Device("GPU-a", "gpu", "NVIDIA A100-SXM4-40GB", 40 * 2**30, "0", minor=0)
    names = lambda hidden: sorted(p.removeprefix(str(dev) + "/") for p in hidden)  # noqa: E731
    assert names(hidden_nodes(dev, [mig])) == ["nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap30", "nvidia0"]
    assert names(hidden_nodes(dev, [gpu])) == ["nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap21",
                                               "nvidia-caps/nvidia-cap22", "nvidia-caps/nvidia-cap30", "nvidia1"]
    assert "nvidia0" in names(hidden_nodes(dev, [])) and "nvidiactl" not in names(hidden_nodes(dev, []))



def test_the_gpu_idle_decision_warns_then_stops_and_forgives_any_busy_or_unknown_sample():
    """mlaas.gpu_culler's decision from successive usage samples (the GPU use is given: no GPU here)."""
    from mlaas.gpu_culler import GpuIdleTracker

    def server(util, timeout=300, name=""):
        return {"user": "alice", "server": name, "gpu_idle_timeout": timeout,
                "devices": [{"uuid": "GPU-a", "utilization": util}]}

    t = GpuIdleTracker()
    assert t.observe(0, [server(0)]) == []
    assert [a.kind for a in t.observe(199, [server(0)])] == []
    warn = t.observe(200, [server(0)])  # a third of the timeout before the stop
    assert [(a.kind, round(a.seconds)) for a in warn] == [("warn", 100)] and warn[0].notice.endswith(".md")
    assert t.observe(250, [server(0)]) == []  # warned once
    assert [(a.kind, a.notice) for a in t.observe(260, [server(5)])] == [("clear", warn[0].notice)]  # used again
    assert t.observe(261, [server(0)]) == []  # counting from zero again
    assert [a.kind for a in t.observe(561, [server(0)])] == ["stop"]
    # a device whose use the driver cannot tell is never taken for idle; no timeout: never culled
    t2 = GpuIdleTracker()
    assert t2.observe(0, [server(None), server(0, None, "b")]) == [] and t2.observe(10_000, [server(None)]) == []


def test_a_hub_that_cannot_see_gpu_use_says_which_gpu_idle_timeouts_it_cannot_enforce(caplog):
    from types import SimpleNamespace

    from mlaas.hubconfig import warn_if_gpu_idle_unenforced
    from mlaas.profiles import Profile

    gpu = Profile.model_validate({"slug": "gpu-a", "display_name": "A", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
                                  "gpu": {"count": 1}, "gpu_idle_timeout": 600, "groups": ["*"]})
    store = SimpleNamespace(current=lambda: SimpleNamespace(profiles=[gpu]))
    with caplog.at_level("WARNING", logger="JupyterHub.mlaas"):
        warn_if_gpu_idle_unenforced(store, enforced=True)
        assert not caplog.records
        warn_if_gpu_idle_unenforced(store, enforced=False)
    assert "gpu_idle_timeout of gpu-a is not enforced" in caplog.text and "gpuMetricsUrl" in caplog.text


def test_a_hub_service_ends_on_sigint_even_when_inherited_ignored_and_with_its_hub(tmp_path):
    """mlaas.hub_service (the cullers' wrapper): JupyterHub stops a service with SIGINT, which a
    hub started as a background job passes on ignored; and a killed hub must leave none behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    service = [sys.executable, "-m", "mlaas.hub_service", "http.server", "0", "--bind", "127.0.0.1"]
    ignored = subprocess.Popen(service, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    ignored.send_signal(signal.SIGINT)
    assert ignored.wait(5) == 0

    hub = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                            f"c = subprocess.Popen({service!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                            "print(c.pid, flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    child = int(hub.stdout.readline())
    time.sleep(1.5)
    hub.kill()  # the hub dies without stopping its services
    hub.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the service outlived its hub")


def test_dask_worker_pods_gpu_use_is_their_clusters_and_the_counts_add_up_per_user_and_group():
    """The gateway's metrics (mlaas.dask_metrics) from its clusters and DCGM's per-pod series (as
    DcgmUsage.by_pod returns them; no GPU here): a worker pod's GPU use is its cluster's, a cluster
    whose name extends another's keeps its own, the scheduler and other pods count for none."""
    from prometheus_client.parser import text_string_to_metric_families

    from mlaas.dask_gateway import ClusterUse
    from mlaas.dask_metrics import render, worker_gpu_use

    a = ClusterUse("abc", "ann", frozenset({"atlas-ml"}), 2, 1.0, 2**30, 1)
    b = ClusterUse("abc1", "ben", frozenset({"atlas-ml", "cms"}), 1, 2.0, 2**30, 1)
    by_pod = {
        "dask/dask-worker-abc-x1": [{"utilization": 80, "memory_used": 2**30}],
        "dask/dask-worker-abc-x2": [{"utilization": 40, "memory_used": 2**30}],
        "dask/dask-worker-abc1-y1": [{"utilization": 10, "memory_used": 5}],
        "dask/dask-scheduler-abc": [{"utilization": 99, "memory_used": 7}],
        "mlaas/jupyter-ann": [{"utilization": 99, "memory_used": 7}],
    }
    gpu = worker_gpu_use(by_pod, [a, b])
    assert {k: len(v) for k, v in gpu.items()} == {"abc": 2, "abc1": 1}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(render([a, b], gpu).decode()) for s in f.samples}
    assert samples[("mlaas_dask_cluster_gpu_utilization_percent", (("cluster", "abc"), ("user", "ann")))] == 60
    assert samples[("mlaas_dask_cluster_gpu_memory_used_bytes", (("cluster", "abc"), ("user", "ann")))] == 2 * 2**30
    assert samples[("mlaas_dask_cluster_gpu_utilization_percent", (("cluster", "abc1"), ("user", "ben")))] == 10
    assert samples[("mlaas_group_dask_workers", (("group", "atlas-ml"),))] == 3
    assert samples[("mlaas_group_dask_worker_gpus", (("group", "cms"),))] == 1
    assert samples[("mlaas_dask_worker_cores", (("user", "ben"),))] == 2
    assert samples[("mlaas_dask_clusters", (("user", "ann"),))] == 1


def test_the_zygote_starts_by_exec_what_it_cannot_serve_and_names_a_failed_step(tmp_path):
    """A real zygote (mlaas.zygote): interpreter variables and other commands are refused before
    it is asked; a variable its imports read with another value makes it answer "exec" (naming
    the variable); an entry that cannot be entered fails with the step's error."""
    import asyncio
    import os

    from mlaas.limits import Placement
    from mlaas.server_entry import ServerEntry
    from mlaas.spawners.local import SERVER_ENV_KEEP, USER_JUPYTER_CONFIG, server_path
    from mlaas.zygote.client import ServerEntryFailed, Zygote, ZygoteUnavailable, server_command

    assert "PYTHONPATH" in Zygote.cannot_serve([server_command(), "--x"], {"PYTHONPATH": "/tmp"})
    assert "/bin/sh" in Zygote.cannot_serve(["/bin/sh"], {})
    assert Zygote.cannot_serve([server_command()], {"HOME": "/home/x"}) is None
    zygote = Zygote(tmp_path / "z", tmp_path / "zygote-home", USER_JUPYTER_CONFIG, server_path(tmp_path / "zygote-home"),
                    SERVER_ENV_KEEP)
    zygote.start()
    home = tmp_path / "user"
    home.mkdir()
    env = {"PATH": server_path(home), "HOME": str(home), "JUPYTER_CONFIG_PATH": str(USER_JUPYTER_CONFIG),
           **{k: os.environ[k] for k in SERVER_ENV_KEEP if k in os.environ}}
    try:
        moved = ServerEntry([server_command()], {**env, "JUPYTERLAB_SETTINGS_DIR": str(home / "s")}, str(home),
                            Placement("t"))
        with pytest.raises(ZygoteUnavailable, match="JUPYTERLAB_SETTINGS_DIR"):
            asyncio.run(zygote.spawn(moved, timeout=60))
        nowhere = ServerEntry([server_command()], env, str(tmp_path / "no-such-home"), Placement("t"))
        with pytest.raises(ServerEntryFailed, match="no-such-home"):
            asyncio.run(zygote.spawn(nowhere, timeout=60))
        assert zygote.running()  # a failed child is the child's end, not the zygote's
    finally:
        zygote.stop()
    assert not zygote.running()


def test_a_blocked_hub_event_loop_is_logged_with_the_code_that_blocked_it(caplog):
    """An operator sees which code held the hub's event loop, and for how long (mlaas.loop_watch);
    short steps are not reported."""
    import asyncio
    import time

    from mlaas.loop_watch import STALLS, watch_running_loop

    def parse_everything_at_once() -> None:  # stands for any synchronous step inside a handler
        time.sleep(0.15)

    async def hub() -> dict:
        watch = watch_running_loop()
        await asyncio.sleep(0.1)
        for _ in range(5):
            time.sleep(0.005)  # short steps: nothing to report
            await asyncio.sleep(0.02)
        parse_everything_at_once()
        await asyncio.sleep(0.1)
        watch.stop()
        return dict(watch.places)

    with caplog.at_level(logging.WARNING, logger="JupyterHub.mlaas.loop"):
        places = asyncio.run(hub())
    assert list(places) and all("parse_everything_at_once" in p for p in places), places
    assert len(places) == 1 and sum(places.values()) == 1
    blocked = [r.getMessage() for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert len(blocked) == 1 and "parse_everything_at_once" in blocked[0]
    assert 100 <= int(blocked[0].split("blocked ")[1].split(" ms")[0]) < 1000  # late by the stall, less a beat
    where = next(iter(places)).split(" (", 1)[0]
    assert STALLS.labels(where, "work")._value.get() == 1  # a blocking call: the hub's doing, not the machine's
    assert "on a CPU" in blocked[0] and "waiting for one" in blocked[0] and ": work) in" in blocked[0]


def test_the_batched_activity_update_moves_timestamps_forward_in_few_queries():
    """The hub's activity update from the proxy's routes (mlaas.activity, replacing JupyterHub's
    one-lookup-per-route loop) gives every user and server the proxy's last activity, never moves
    one back, names routes of unknown users, and asks the database a few times per 200 users
    instead of twice per route. Real JupyterHub ORM on SQLite; the routes are the proxy's format."""
    import asyncio
    from datetime import datetime, timedelta

    from jupyterhub import orm
    from sqlalchemy import event

    from mlaas import activity

    db = orm.new_session_factory("sqlite://")()
    base = datetime(2026, 11, 28, 12, 0, 0)
    for i in range(450):
        user = orm.User(name=f"u{i:03d}", last_activity=base)
        db.add(user)
        db.add(orm.Spawner(name="", user=user, last_activity=base))
        if i % 3 == 0:
            db.add(orm.Spawner(name="gpu", user=user, last_activity=base))
    db.commit()
    later, earlier = base + timedelta(minutes=5), base - timedelta(minutes=5)
    routes = {f"/user/u{i:03d}/": {"data": {"user": f"u{i:03d}", "server_name": "",
                                            "last_activity": (later if i % 2 else earlier).isoformat() + "Z"}}
              for i in range(450)}
    routes["/user/u003/gpu/"] = {"data": {"user": "u003", "server_name": "gpu", "last_activity": later.isoformat() + "Z"}}
    routes["/user/ghost/"] = {"data": {"user": "ghost", "server_name": "", "last_activity": later.isoformat() + "Z"}}
    routes["/services/x/"] = {"data": {"service": "x"}}
    statements: list[str] = []
    event.listen(db.get_bind(), "before_cursor_execute", lambda *a: statements.append(a[2].split()[0]))
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    activity.log.addHandler(handler)
    try:
        found = asyncio.run(activity.apply_activity(db, activity.route_activity(routes)))
    finally:
        activity.log.removeHandler(handler)
    during = list(statements)
    assert found == 450
    db.expire_all()
    users = {u.name: u for u in db.query(orm.User)}
    assert users["u001"].last_activity == later and users["u001"].orm_spawners[""].last_activity == later
    assert users["u002"].last_activity == base and users["u002"].orm_spawners[""].last_activity == base  # never back
    assert users["u003"].orm_spawners["gpu"].last_activity == later and users["u006"].orm_spawners["gpu"].last_activity == base
    assert "Found no user ghost for a route" in warnings
    # 3 batches of 200: the users with what the ORM loads with them (groups, roles, shares, servers and
    # their OAuth clients) in a query each, plus one connection check; JupyterHub's own: 2 per route
    assert during.count("SELECT") <= 3 * 6 + 1, during
    assert 0 < during.count("UPDATE") <= 226 + 1 + 75, during  # the rows that changed only


def test_token_files_are_stretched_only_while_one_holds_a_short_token(caplog):
    """A token from a file is checked at the hub's speed only where every file holds 32+ characters;
    a short one keeps JupyterHub's password stretching and the log names its file."""
    from traitlets.config import Config

    from mlaas.hubconfig import trust_provided_tokens

    strong = Config()
    trust_provided_tokens(strong, {"admin_api_token_file": "a1" * 24, "metrics_token_file": "b2" * 16})
    assert strong.JupyterHub.trust_user_provided_tokens is True
    weak = Config()
    with caplog.at_level(logging.WARNING, logger="JupyterHub.mlaas"):
        trust_provided_tokens(weak, {"admin_api_token_file": "a1" * 24, "metrics_token_file": "short-token"})
    assert "trust_user_provided_tokens" not in weak.JupyterHub
    assert "metrics_token_file" in caplog.text and "admin_api_token_file" not in caplog.text


def test_artifacts_from_before_a_project_move_onto_its_storage_merged_and_readable_by_its_group(tmp_path):
    """mlaas.tracking.storage.move_into: MLflow's paths stay the same (merged into what is there),
    and what moved is given to the project's group, readable by it."""
    import grp
    import os

    from mlaas.tracking.storage import move_into

    old, project = tmp_path / "workspace", tmp_path / "project"
    (old / "3" / "run-a" / "artifacts").mkdir(parents=True)
    (old / "3" / "run-a" / "artifacts" / "model.pkl").write_bytes(b"m")
    (old / "3" / "run-a" / "artifacts" / "model.pkl").chmod(0o600)
    (project / "3" / "run-b" / "artifacts").mkdir(parents=True)
    (project / "3" / "run-b" / "artifacts" / "notes.txt").write_text("n")
    group = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()) if os.geteuid() == 0 else os.getgid()
    assert move_into(old, project, group) == 1
    assert list(old.iterdir()) == []
    moved = project / "3" / "run-a" / "artifacts" / "model.pkl"
    assert moved.read_bytes() == b"m" and (project / "3" / "run-b" / "artifacts" / "notes.txt").read_text() == "n"
    assert moved.stat().st_gid == group and moved.stat().st_mode & 0o040
    assert (project / "3" / "run-a").stat().st_gid == group
