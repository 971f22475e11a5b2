"""GPU and MIG assignment through the real hub and spawner.

This machine has no NVIDIA GPU, so this platform reads a simulated inventory file in place of
NVML (the only part not real: tests/fixtures/inventory-a100-mig.yaml, two 3g.20gb MIG instances
and one whole A100). The NVML path itself is exercised by `mlaas gpus` on a GPU machine.
"""

from __future__ import annotations

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
        stop_server(gpu_hub, "gpu-user")
        start_server(gpu_hub, "gpu-user", token, {"profile": "small"})
        assert visible_devices(gpu_hub, "gpu-user", token) == ""
    finally:
        stop_server(gpu_hub, "gpu-user")
