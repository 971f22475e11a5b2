"""GPU and MIG assignment through the real hub and spawner, and the GPU fence.

This machine has no NVIDIA GPU, so this platform reads a simulated inventory file in place of
NVML (tests/fixtures/inventory-a100-mig.yaml, two 3g.20gb MIG instances and one whole A100), and
its device nodes are stand-in files (conftest.gpu_device_nodes): the fence (hub/mlaas/gpu_fence.py)
hides them exactly as it hides /dev/nvidia*, in each server's own mount namespace. The NVML path
and the fence on real device nodes are checked by tests/gpu/check.py on a GPU machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from helpers import (
    ensure_user,
    error_message,
    kernel_json,
    request_server,
    start_server,
    stop_server,
    user_token,
)


def visible_devices(hub, name, token) -> str:
    return kernel_json(hub, name, token, "import os, json; print(json.dumps(os.environ['CUDA_VISIBLE_DEVICES']))")


def openable_nodes(hub, name, token) -> list[str]:
    """The device nodes the server's kernel can read something from, whatever its environment
    says (CUDA_VISIBLE_DEVICES is removed first), and whether it could lift the fence itself."""
    dev = yaml.safe_load(Path(hub.platform.settings.gpu_inventory).read_text())["device_nodes"]
    code = f"""
import json, os, subprocess
os.environ.pop("CUDA_VISIBLE_DEVICES", None)
dev = {dev!r}
seen = []
for d, _, files in os.walk(dev):
    for f in files:
        if open(os.path.join(d, f)).read():
            seen.append(os.path.relpath(os.path.join(d, f), dev))
lifted = subprocess.run(["umount", os.path.join(dev, "nvidia0")], capture_output=True).returncode == 0
print(json.dumps([sorted(seen), lifted]))
"""
    seen, lifted = kernel_json(hub, name, token, code)
    assert not lifted, "the server's account could undo its fence"
    return seen


def test_mig_instances_go_to_one_server_each_and_come_back_on_stop(gpu_hub):
    names = ["mig-a", "mig-b", "mig-c"]
    tokens = {}
    for name in names:
        ensure_user(gpu_hub, name, ["atlas-ml"])
        tokens[name] = user_token(gpu_hub, name)
    try:
        start_server(gpu_hub, "mig-a", tokens["mig-a"], {"profile": "mig-atlas"})
        start_server(gpu_hub, "mig-b", tokens["mig-b"], {"profile": "mig-atlas"})
        a = visible_devices(gpu_hub, "mig-a", tokens["mig-a"])
        b = visible_devices(gpu_hub, "mig-b", tokens["mig-b"])
        assert a.startswith("MIG-") and b.startswith("MIG-") and a != b
        # the fence: its GPU and its own instance's capabilities; not the other instance, not the
        # whole GPU, not the MIG config and monitor capabilities
        caps = {"MIG-22222222-aaaa-bbbb-cccc-000000000001": ["nvidia-caps/nvidia-cap21", "nvidia-caps/nvidia-cap22"],
                "MIG-22222222-aaaa-bbbb-cccc-000000000002": ["nvidia-caps/nvidia-cap30", "nvidia-caps/nvidia-cap31"]}
        assert openable_nodes(gpu_hub, "mig-a", tokens["mig-a"]) == sorted(["nvidia1", "nvidiactl", *caps[a]])
        assert openable_nodes(gpu_hub, "mig-b", tokens["mig-b"]) == sorted(["nvidia1", "nvidiactl", *caps[b]])
        # admins see which server holds which device
        capacity = gpu_hub.api().get(f"{gpu_hub.url}/hub/api/mlaas/capacity").json()
        held = {d["uuid"]: d["held_by"] for d in capacity["devices"]}
        assert held[a] == "mig-a/" and held[b] == "mig-b/"
        assert capacity["mig_enabled_gpus"] == ["GPU-11111111-aaaa-bbbb-cccc-000000000002"]
        assert gpu_hub.api(tokens["mig-a"]).get(f"{gpu_hub.url}/hub/api/mlaas/capacity").status_code == 403

        listed = gpu_hub.api(tokens["mig-c"]).get(f"{gpu_hub.url}/hub/api/mlaas/profiles").json()
        mig = next(p for p in listed["profiles"] if p["slug"] == "mig-atlas")
        assert mig["available"] is False and mig["capacity"] == "0 of 2 free"

        r = request_server(gpu_hub, "mig-c", tokens["mig-c"], {"profile": "mig-atlas"})
        assert r.status_code == 409
        assert "all 2 MIG 3g.20gb instances are in use" in error_message(r)

        stop_server(gpu_hub, "mig-a")
        start_server(gpu_hub, "mig-c", tokens["mig-c"], {"profile": "mig-atlas"})
        assert visible_devices(gpu_hub, "mig-c", tokens["mig-c"]) == a  # the freed instance
    finally:
        for name in names:
            stop_server(gpu_hub, name)


def test_whole_gpu_and_cpu_profiles_see_only_their_devices(gpu_hub):
    ensure_user(gpu_hub, "gpu-user", ["ml-users"])
    token = user_token(gpu_hub, "gpu-user")
    try:
        start_server(gpu_hub, "gpu-user", token, {"profile": "gpu-one"})
        # the MIG-split A100 is never handed out whole
        assert visible_devices(gpu_hub, "gpu-user", token) == "GPU-11111111-aaaa-bbbb-cccc-000000000001"
        assert openable_nodes(gpu_hub, "gpu-user", token) == ["nvidia0", "nvidiactl"]  # its GPU only
        # JupyterLab's GPU dashboards (jupyterlab-nvdashboard) are served; they read NVML inside the
        # fence (no driver here: no GPU to show)
        dash = gpu_hub.api(token).get(f"{gpu_hub.url}/user/gpu-user/nvdashboard/accelerators/check")
        assert dash.status_code == 200 and dash.json()["ngpus"] == 0, dash.text
        extensions = gpu_hub.api(token).get(f"{gpu_hub.url}/user/gpu-user/lab/api/extensions").json()
        names = {e["name"] for e in (extensions[0] if isinstance(extensions, list) and extensions and
                                     isinstance(extensions[0], list) else extensions)}
        assert "jupyterlab-nvdashboard" in names, names
        stop_server(gpu_hub, "gpu-user")
        start_server(gpu_hub, "gpu-user", token, {"profile": "small"})
        assert visible_devices(gpu_hub, "gpu-user", token) == ""
        assert openable_nodes(gpu_hub, "gpu-user", token) == ["nvidiactl"]  # no GPU at all
        assert "GPUs of local servers: GPU fence: each server's own mount namespace hides" in gpu_hub.hub_log()
    finally:
        stop_server(gpu_hub, "gpu-user")


def set_gpu_use(hub, uuid: str, utilization: int, memory_used: str = "0") -> None:
    """What NVML would report now for one device (the simulated inventory's `usage:`)."""
    path = Path(hub.platform.settings.gpu_inventory)
    inventory = yaml.safe_load(path.read_text())
    inventory.setdefault("usage", {})[uuid] = {"utilization": utilization, "memory_used": memory_used}
    path.write_text(yaml.safe_dump(inventory))


def test_gpu_use_per_server_user_and_group_and_an_unused_gpu_is_freed_even_from_an_active_server(gpu_hub, browser):
    """The admins' usage view maps each device's use (NVML, here the stand-in file) to the server
    holding it, its user and groups. A server of a profile with `gpu_idle_timeout` (30 s) whose GPU
    stays unused gets a notice in JupyterLab's file browser, then is stopped and its GPU freed,
    while its user's browser keeps the server active (requests through the proxy every 2 s)."""

    gpu = "GPU-11111111-aaaa-bbbb-cccc-000000000001"
    ensure_user(gpu_hub, "gpu-idler", ["ml-users"])
    token = user_token(gpu_hub, "gpu-idler")
    api, me = gpu_hub.api(), gpu_hub.api(token)
    try:
        set_gpu_use(gpu_hub, gpu, 80, "2Gi")
        start_server(gpu_hub, "gpu-idler", token, {"profile": "gpu-idle"})
        usage = api.get(f"{gpu_hub.url}/hub/api/mlaas/usage").json()
        server = next(s for s in usage["servers"] if s["user"] == "gpu-idler")
        assert server["gpu_use"] == {"devices": 1, "utilization": 80, "memory_used": 2 * 2**30}
        assert server["gpu_idle_timeout"] == 30
        assert usage["users"]["gpu-idler"]["gpu_use"]["utilization"] == 80
        assert usage["groups"]["ml-users"]["gpu_use"]["memory_used"] >= 2 * 2**30
        page = browser.new_page()  # what an admin sees in the usage view
        try:
            from conftest import open_profile_editor

            open_profile_editor(page, gpu_hub.url, gpu_hub.password("admin"), "small")
            page.click("nav button[data-panel=usage]")
            page.click("#usage-refresh")
            row = page.locator("#usage-servers tbody tr", has_text="gpu-idler")
            row.wait_for()
            assert row.locator("td.gpu-use").inner_text() == "80 %, 2 GiB"
        finally:
            page.close()

        set_gpu_use(gpu_hub, gpu, 0)  # the user stops using the GPU, but keeps the tab open
        idle_from, warned_at, notices = time.monotonic(), None, []
        while time.monotonic() - idle_from < 60:
            r = me.get(f"{gpu_hub.url}/user/gpu-idler/api/contents")
            if r.status_code != 200:
                break  # stopped
            notices = [f["name"] for f in r.json()["content"] if f["name"].startswith("GPU idle - this server stops at")]
            if notices and warned_at is None:
                warned_at = time.monotonic() - idle_from
            time.sleep(2)
        stopped_at = time.monotonic() - idle_from
        assert warned_at is not None and 10 <= warned_at < 30, warned_at  # warned ahead of the stop
        assert 25 <= stopped_at < 50, stopped_at
        deadline = time.monotonic() + 30  # the stop the culler asked for completes
        while api.get(f"{gpu_hub.url}/hub/api/users/gpu-idler").json()["servers"] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert api.get(f"{gpu_hub.url}/hub/api/users/gpu-idler").json()["servers"] == {}
        capacity = api.get(f"{gpu_hub.url}/hub/api/mlaas/capacity").json()
        assert {d["uuid"]: d["held_by"] for d in capacity["devices"]}[gpu] is None  # freed
        home = next(gpu_hub.state_dir.glob("homes/*/" + notices[0].replace("[", "?")))  # the notice stays, telling why
        assert "unless a GPU is used again" in home.read_text()
        deadline = time.monotonic() + 30  # the culler logs once the hub answered its stop call
        while "GPU culler: stopped gpu-idler, its GPUs idle for" not in gpu_hub.hub_log() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "GPU culler: stopped gpu-idler, its GPUs idle for" in gpu_hub.hub_log()
    finally:
        set_gpu_use(gpu_hub, gpu, 0)
        stop_server(gpu_hub, "gpu-idler")


def test_each_gpu_process_belongs_to_its_server_and_use_outside_an_assignment_is_shown(gpu_hub, browser):
    """NVML's list of processes per device (the stand-in file's `pids:`, naming the real kernel
    processes of two real servers) is mapped to servers through the process tree: the admins'
    usage view, its page and the metrics name each process's server, and flag a process on a
    device its server was not given (which the fence prevents where it is in force)."""
    gpu, mig = "GPU-11111111-aaaa-bbbb-cccc-000000000001", "MIG-22222222-aaaa-bbbb-cccc-000000000001"
    path = Path(gpu_hub.platform.settings.gpu_inventory)
    for name in ("proc-gpu", "proc-cpu"):
        ensure_user(gpu_hub, name, ["ml-users"])
    tokens = {name: user_token(gpu_hub, name) for name in ("proc-gpu", "proc-cpu")}
    api = gpu_hub.api()
    original = path.read_text()
    try:
        start_server(gpu_hub, "proc-gpu", tokens["proc-gpu"], {"profile": "gpu-one"})
        start_server(gpu_hub, "proc-cpu", tokens["proc-cpu"], {"profile": "small"})
        # GPU work of a kernel (a child of the server) and of a program it started (a grandchild)
        pid = {"proc-gpu": kernel_json(gpu_hub, "proc-gpu", tokens["proc-gpu"], "import os; print(os.getpid())", keep=True),
               "proc-cpu": kernel_json(gpu_hub, "proc-cpu", tokens["proc-cpu"], "import subprocess; "
                                       "print(subprocess.Popen(['sleep', '600']).pid)", keep=True)}
        inventory = yaml.safe_load(original)
        inventory["usage"] = {gpu: {"utilization": 70, "memory_used": "1Gi", "pids": [pid["proc-gpu"], pid["proc-cpu"]]},
                              mig: {"utilization": 5, "memory_used": "1Gi", "pids": [pid["proc-cpu"]]}}
        path.write_text(yaml.safe_dump(inventory))

        usage = api.get(f"{gpu_hub.url}/hub/api/mlaas/usage").json()
        server = next(s for s in usage["servers"] if s["user"] == "proc-gpu")
        assert server["devices"][0]["processes"] == [{"pid": pid["proc-gpu"], "server": "proc-gpu/"},
                                                     {"pid": pid["proc-cpu"], "server": "proc-cpu/"}]
        assert usage["gpu_processes_outside_assignment"] == [
            {"uuid": gpu, "pid": pid["proc-cpu"], "server": "proc-cpu/", "held_by": "proc-gpu/"},
            {"uuid": mig, "pid": pid["proc-cpu"], "server": "proc-cpu/", "held_by": None},
        ]
        assert api.get(f"{gpu_hub.url}/hub/api/mlaas/usage", headers={
            "Authorization": f"token {tokens['proc-cpu']}"}).status_code == 403  # admins only

        page = browser.new_page()
        try:
            from conftest import open_profile_editor

            open_profile_editor(page, gpu_hub.url, gpu_hub.password("admin"), "small")
            page.click("nav button[data-panel=usage]")
            page.click("#usage-refresh")
            warning = page.locator("#usage-outside")
            warning.wait_for(state="visible")
            text = warning.inner_text()
            assert f"process {pid['proc-cpu']} of server proc-cpu/ on {gpu} (held by proc-gpu/)" in text, text
            assert f"on {mig} (not handed out)" in text and f"process {pid['proc-gpu']} " not in text, text
        finally:
            page.close()
    finally:
        path.write_text(original)
        for name in tokens:
            stop_server(gpu_hub, name)


def test_a_user_runs_named_servers_with_their_own_profiles_counted_by_gpus_and_quotas(gpu_hub, browser):
    """JupyterHub's named servers: a CPU default server and a GPU server "train" side by side, the
    GPU held by that server alone, both on the home page and in the usage view; a group's
    servers_per_user counts every server; KubeSpawner-style profile options get a clear refusal."""
    from helpers import run_in_kernel

    ensure_user(gpu_hub, "bob", ["ml-users"])
    ensure_user(gpu_hub, "capped", ["quota-team"])
    token, capped = user_token(gpu_hub, "bob"), user_token(gpu_hub, "capped")
    api = gpu_hub.api(token)
    named = f"{gpu_hub.url}/hub/api/users/bob/servers/train"
    try:
        start_server(gpu_hub, "bob", token, {"profile": "small"})
        r = api.post(named, json={"profile": "gpu-one"})
        assert r.status_code in (201, 202), r.text
        deadline = time.monotonic() + 60
        while not api.get(f"{gpu_hub.url}/hub/api/users/bob").json()["servers"].get("train", {}).get("ready"):
            assert time.monotonic() < deadline, "the named server did not start"
            time.sleep(0.3)
        seen = run_in_kernel(gpu_hub, "bob/train", token, "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
        assert seen["stdout"].strip() == "GPU-11111111-aaaa-bbbb-cccc-000000000001", seen
        assert visible_devices(gpu_hub, "bob", token) == ""  # the default server: CPU only
        capacity = gpu_hub.api().get(f"{gpu_hub.url}/hub/api/mlaas/capacity").json()
        assert {d["uuid"]: d["held_by"] for d in capacity["devices"]}["GPU-11111111-aaaa-bbbb-cccc-000000000001"] == "bob/train"
        usage = gpu_hub.api().get(f"{gpu_hub.url}/hub/api/mlaas/usage").json()
        mine = sorted((s["server"], s["profile"]) for s in usage["servers"] if s["user"] == "bob")
        assert mine == [("", "small"), ("train", "gpu-one")] and usage["users"]["bob"]["servers"] == 2
        page = browser.new_page()  # JupyterHub's named-server list on bob's home page
        try:
            from conftest import browser_login

            browser_login(page, gpu_hub.url, "bob", gpu_hub.password("bob"))
            page.goto(f"{gpu_hub.url}/hub/home")
            row = page.locator("tr.home-server-row[data-server-name=train]")
            row.wait_for()
            assert "/user/bob/train/" in row.inner_text()
        finally:
            page.close()

        # a second GPU server finds the only whole GPU taken by the first
        r = api.post(f"{gpu_hub.url}/hub/api/users/bob/servers/more", json={"profile": "gpu-one"})
        assert r.status_code == 409 and "in use" in error_message(r)
        r = api.post(f"{gpu_hub.url}/hub/api/users/bob/servers/opts",
                     json={"profile": "small", "profile-option-small--image": "other"})
        assert r.status_code == 400 and "Profile options ('profile-option-small--image') are not offered" in error_message(r)

        start_server(gpu_hub, "capped", capped, {"profile": "small"})
        r = gpu_hub.api(capped).post(f"{gpu_hub.url}/hub/api/users/capped/servers/second", json={"profile": "small"})
        assert r.status_code == 403 and "allows 1 running server(s) per member" in error_message(r)
    finally:
        api.delete(named)
        stop_server(gpu_hub, "bob")
        stop_server(gpu_hub, "capped")
    deadline = time.monotonic() + 30
    while gpu_hub.api().get(f"{gpu_hub.url}/hub/api/users/bob").json()["servers"]:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    capacity = gpu_hub.api().get(f"{gpu_hub.url}/hub/api/mlaas/capacity").json()
    assert {d["uuid"]: d["held_by"] for d in capacity["devices"]}["GPU-11111111-aaaa-bbbb-cccc-000000000001"] is None
