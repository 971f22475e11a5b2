"""Starting and stopping the one-machine platform as an operator does (`mlaas up`, `mlaas down`,
Ctrl-C, a crash): everything the platform started stops, and nothing else. The proxy and the
hub's managed services (the Dask Gateway, the admin service, the cullers) live in processes of
their own that outlive a hub or launcher killed with SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from helpers import start_platform
from mlaas.launcher import _processes_of, _running, launch_file

pytestmark = pytest.mark.platform
MLAAS = str(Path(sys.prefix) / "bin" / "mlaas")


def test_stopping_after_a_hub_crash_leaves_no_process_behind():
    hub = start_platform("crash", data={"enabled": False})
    platform = hub.platform
    left = _processes_of(platform.launch_id)
    assert len(left) >= 3  # the hub, its proxy, the gateway and the admin service (and the dev IdP)
    os.kill(platform.hub.pid, signal.SIGKILL)
    platform.hub.wait(10)
    time.sleep(1)
    orphans = _processes_of(platform.launch_id)
    assert orphans, "nothing outlived the hub: this test no longer shows the case it is about"
    gateway = [pid for pid in orphans if b"dask-gateway-server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert gateway, "the Dask Gateway (a hub-managed service) does not carry the launch's marker"
    platform.stop()
    assert _processes_of(platform.launch_id) == []
    assert not any(_running(pid) for pid in gateway)  # gone (a zombie at most, where PID 1 does not reap)


@pytest.fixture(scope="module")
def config_dir():
    """A platform's file and state, for `mlaas up` run by a shell (the platform started here
    once to make them is stopped again)."""
    hub = start_platform("updown", data={"enabled": False})
    hub.platform.stop()
    yield hub.platform.config_file.parent, hub.url, hub.platform.settings
    shutil.rmtree(hub.state_dir, ignore_errors=True)


def _wait_up(url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/hub/health", timeout=2).status_code == 200 and "MLaaS Hub is up" in log.read_text():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"`mlaas up` did not come up:\n{log.read_text()[-3000:]}")


def test_mlaas_down_stops_the_platform_and_nothing_else_with_mlaas_config_exported(config_dir):
    """The shell that exported MLAAS_CONFIG and runs `mlaas down` carries the same value as the
    platform's processes: it and `mlaas down` survive, the platform stops, with a user's server
    and its Dask cluster, whose stop at shutdown is not an error (the gateway stops it)."""
    run_dir, url, settings = config_dir
    log = run_dir / "up.log"
    env = dict(os.environ, MLAAS_CONFIG=str(run_dir / "mlaas.yaml"))
    up = subprocess.Popen([MLAAS, "up"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_up(url, log)
        launch_id = launch_file(settings).read_text().split()[0]
        ops = requests.Session()
        ops.headers["Authorization"] = f"token {Path(settings.admin_api_token_file).read_text().strip()}"
        ops.post(f"{url}/hub/api/users/down-user").raise_for_status()
        ops.post(f"{url}/hub/api/groups/ml-users/users", json={"users": ["down-user"]})
        token = ops.post(f"{url}/hub/api/users/down-user/tokens", json={"expires_in": 600}).json()["token"]
        assert ops.post(f"{url}/hub/api/users/down-user/server", json={"profile": "small"}).status_code in (201, 202)
        deadline = time.monotonic() + 60
        while not ops.get(f"{url}/hub/api/users/down-user").json()["servers"].get("", {}).get("ready"):
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        gateway = f"{url}/services/dask-gateway/api/v1/clusters/"
        auth = {"Authorization": f"jupyterhub {token}"}
        cluster = requests.post(gateway, headers=auth, json={"cluster_options": {}}, timeout=60).json()["name"]
        while requests.get(gateway + cluster, headers=auth, timeout=10).json()["status"] != "RUNNING":
            assert time.monotonic() < deadline + 60, "the cluster did not start"
            time.sleep(0.5)
        workdir = settings.state_dir / "dask-gateway" / "clusters" / cluster
        assert _processes_in(workdir), "the cluster's scheduler is not running"

        r = subprocess.run(["bash", "-c", f'{MLAAS} down; echo "down exited $?"; echo "the shell is still here"'],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        assert r.stdout.splitlines()[-3:] == ["MLaaS Hub stopped.", "down exited 0", "the shell is still here"]
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
    assert _processes_of(launch_id) == []
    assert _processes_in(workdir) == []  # the cluster stopped with the platform
    hub_log = (settings.state_dir / "logs" / "hub.log") if (settings.state_dir / "logs" / "hub.log").exists() else log
    assert "Could not stop the Dask clusters" not in hub_log.read_text() + log.read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/hub/health", timeout=5)


def _processes_in(directory: Path) -> list[int]:
    """Processes whose working directory is `directory` (a Dask cluster's scheduler and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == directory:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_after_the_launcher_is_killed_mlaas_down_stops_what_it_left_with_the_file_in_the_directory(config_dir):
    """No MLAAS_CONFIG: `mlaas up` and `mlaas down` read ./mlaas.yaml. The launcher is killed with
    SIGKILL (it cannot stop anything); `mlaas down` then stops the hub, proxy, services and IdP it
    left running, and a second `mlaas up` over a running one is refused."""
    run_dir, url, settings = config_dir
    log = run_dir / "up2.log"
    env = {k: v for k, v in os.environ.items() if k != "MLAAS_CONFIG"}
    up = subprocess.Popen([MLAAS, "up"], cwd=run_dir, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_up(url, log)
        again = subprocess.run([MLAAS, "up"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr, again.stdout + again.stderr
        assert requests.get(f"{url}/hub/health", timeout=5).status_code == 200  # the refused start touched nothing
        launch_id = launch_file(settings).read_text().split()[0]
        assert len(_processes_of(launch_id)) >= 4  # hub, proxy, IdP, services
        up.kill()
        up.wait(10)
        assert _processes_of(launch_id), "nothing outlived the launcher: this test no longer shows its case"
        down = subprocess.run([MLAAS, "down"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "left behind" in down.stdout, down.stdout + down.stderr
        assert _processes_of(launch_id) == []
    finally:
        if up.poll() is None:
            up.kill()
