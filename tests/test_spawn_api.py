"""Spawning through the hub's REST API on the real platform: who sees which profiles, forged and
impossible requests, the profile's limits inside the server, progress, and live profile edits."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from conftest import needs_root
from helpers import (
    RunningPlatform,
    ensure_user,
    error_message,
    kernel_json,
    request_server,
    start_server,
    stop_server,
    user_token,
    wait_ready,
)


@pytest.fixture(scope="module")
def users(hub: RunningPlatform) -> dict[str, str]:
    """Two users of different groups, with their own tokens."""
    ensure_user(hub, "ann", ["ml-users", "atlas-ml"])
    ensure_user(hub, "ben", ["ml-users"])
    return {"ann": user_token(hub, "ann"), "ben": user_token(hub, "ben")}


def profiles_of(hub: RunningPlatform, token: str) -> dict[str, dict]:
    r = hub.api(token).get(f"{hub.url}/hub/api/mlaas/profiles")
    r.raise_for_status()
    return {p["slug"]: p for p in r.json()["profiles"]}


def test_users_of_different_groups_see_different_profiles(hub, users):
    ann, ben = profiles_of(hub, users["ann"]), profiles_of(hub, users["ben"])
    assert list(ann) == ["small", "atlas-cpu", "gpu-one", "mig-atlas"]
    assert list(ben) == ["small", "gpu-one"]
    assert ann["small"]["default"] and ann["small"]["available"]


def test_forged_request_for_a_forbidden_profile_is_refused_and_starts_nothing(hub, users):
    r = request_server(hub, "ben", users["ben"], {"profile": "atlas-cpu"})
    assert r.status_code == 403
    assert "reserved for the groups atlas-ml; you are in: ml-users" in error_message(r)
    model = hub.api().get(f"{hub.url}/hub/api/users/ben").json()
    assert model["servers"] == {} and not model["pending"]


@needs_root
def test_a_plain_start_after_a_refused_request_starts_the_default_profile(hub, users):
    """JupyterHub reuses the last request's options when a spawn request has no body: a refused
    request's profile must not be the one a plain start (the API without a body) asks for."""
    r = request_server(hub, "ben", users["ben"], {"profile": "atlas-cpu"})
    assert r.status_code == 403
    r = hub.api(users["ben"]).post(f"{hub.url}/hub/api/users/ben/server")
    assert r.status_code in (201, 202), error_message(r)
    try:
        wait_ready(hub, "ben")
        server = hub.api().get(f"{hub.url}/hub/api/users/ben").json()["servers"][""]
        assert server["state"]["profile"]["slug"] == "small"  # the default, not the refused atlas-cpu
    finally:
        stop_server(hub, "ben")


def test_unknown_profile_and_unknown_options_are_refused_by_name(hub, users):
    r = request_server(hub, "ben", users["ben"], {"profile": "huge"})
    assert r.status_code == 400
    assert "There is no profile 'huge'. Profiles open to you: small, gpu-one." in error_message(r)
    r = request_server(hub, "ben", users["ben"], {"profile": "small", "image": "evil/image"})
    assert r.status_code == 400 and "'image'" in error_message(r)


def test_gpu_profile_on_a_machine_without_gpus_is_refused_with_the_reason(hub, users):
    listed = profiles_of(hub, users["ben"])["gpu-one"]
    assert not listed["available"]
    assert "no NVIDIA GPU driver on this machine" in listed["unavailable_reason"]
    r = request_server(hub, "ben", users["ben"], {"profile": "gpu-one"})
    assert r.status_code == 409
    assert "Profile 'gpu-one' cannot start now: no NVIDIA GPU driver on this machine" in error_message(r)


@needs_root
def test_profile_limits_and_environment_are_in_force_in_the_server(hub, users):
    start_server(hub, "ann", users["ann"], {"profile": "small"})
    try:
        facts = kernel_json(
            hub,
            "ann",
            users["ann"],
            """
import json, os, subprocess, sys
def alloc(mb):
    code = f"s = b'x' * ({mb} * 2**20); print(len(s))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode
print(json.dumps({
    "cpus": len(os.sched_getaffinity(0)),
    "small_alloc": alloc(64),
    "too_big_alloc": alloc(700),
    "env": {k: os.environ.get(k) for k in ("MLAAS_TEST_MARKER", "MLAAS_PROFILE", "CPU_LIMIT", "MEM_LIMIT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")},
    "uid": os.getuid(),
}))
""",
        )
    finally:
        stop_server(hub, "ann")
    assert facts["cpus"] == 1  # cpu limit 1
    assert facts["small_alloc"] == 0  # 64 MiB fits in 512 MiB
    assert facts["too_big_alloc"] != 0  # 700 MiB does not: killed or MemoryError
    assert facts["env"] == {
        "MLAAS_TEST_MARKER": "from-profile",
        "MLAAS_PROFILE": "small",
        "CPU_LIMIT": "1",
        "MEM_LIMIT": str(512 * 2**20),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    assert facts["uid"] != 0


def test_spawn_reports_progress_events(hub, users):
    result: dict = {}
    spawn = threading.Thread(target=lambda: result.update(r=request_server(hub, "ben", users["ben"], {"profile": "small"})))
    spawn.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not hub.api().get(f"{hub.url}/hub/api/users/ben").json().get("pending"):
        time.sleep(0.02)
    messages = []
    with hub.api(users["ben"]).get(f"{hub.url}/hub/api/users/ben/server/progress", stream=True, timeout=60) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:])
                messages.append(event.get("message", ""))
                if event.get("ready") or event.get("failed"):
                    break
    spawn.join()
    try:
        assert result["r"].status_code in (201, 202)
        wait_ready(hub, "ben")
    finally:
        stop_server(hub, "ben")
    text = "\n".join(messages)
    assert "Profile Small test server: 1 CPU, 512 MiB" in text
    assert "Starting JupyterLab" in text
    assert "Limits: 1 CPU core(s), 512 MiB memory" in text


def test_profile_edits_apply_without_restart_and_broken_edits_keep_the_last_good(hub, users):
    cpu = hub.profiles_dir / "cpu.yaml"
    original = cpu.read_text()
    try:
        cpu.write_text(original.replace("limit: 512Mi", "limit: 512XB"))
        deadline = time.monotonic() + 10
        while "cpu.yaml:7 profiles[0].memory.limit: '512XB' is not a memory size" not in hub.hub_log():
            assert time.monotonic() < deadline, "the broken edit was not logged with file, line and field"
            time.sleep(0.2)
        assert "keeping the last good profiles" in hub.hub_log()
        assert list(profiles_of(hub, users["ben"])) == ["small", "gpu-one"]  # still served
        start_server(hub, "ben", users["ben"], {"profile": "small"})
        stop_server(hub, "ben")

        cpu.write_text(
            original
            + "\n  - slug: added-live\n    display_name: Added live\n    cpu: {limit: 1}\n"
            "    memory: {limit: 256Mi}\n    groups: [ml-users]\n"
        )
        assert list(profiles_of(hub, users["ben"])) == ["small", "added-live", "gpu-one"]
    finally:
        cpu.write_text(original)
    assert "added-live" not in profiles_of(hub, users["ben"])


def test_health_is_reachable_without_login(hub):
    assert requests.get(f"{hub.url}/hub/health").status_code == 200
