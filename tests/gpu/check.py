"""The GPU paths on a real NVIDIA machine (as root; under 5 minutes on one GPU):

    sudo .venv/bin/python tests/gpu/check.py

1. the NVML inventory as the hub reads it (mlaas.capacity.nvml): every GPU and MIG instance, with
   the device node minors and MIG capability minors the fence uses;
2. the fence (mlaas.gpu_fence): a CPU profile's process, with CUDA_VISIBLE_DEVICES unset and as an
   unprivileged account, finds no CUDA device; a process given one GPU (or MIG instance) finds
   exactly that one. CUDA is asked through the driver's own library (libcuda, cuDeviceGetCount),
   so no framework is needed.

Prints one line per check and exits non-zero if any fails. `make test` skips it on machines
without an NVIDIA driver and says so (tests/test_gpu_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hub"))

from mlaas.capacity.nvml import read_nvml_inventory  # noqa: E402
from mlaas.gpu_fence import GpuFence  # noqa: E402

CHILD = r"""
import ctypes, json, os
os.environ.pop("CUDA_VISIBLE_DEVICES", None)
try:
    cuda = ctypes.CDLL("libcuda.so.1")
    rc = cuda.cuInit(0)
    count = ctypes.c_int(0)
    if rc == 0:
        cuda.cuDeviceGetCount(ctypes.byref(count))
    uuids = []
    for i in range(count.value):
        dev = ctypes.c_int(0); cuda.cuDeviceGet(ctypes.byref(dev), i)
        raw = (ctypes.c_ubyte * 16)(); cuda.cuDeviceGetUuid(raw, dev)
        uuids.append(bytes(raw).hex())
    print(json.dumps({"init": rc, "count": count.value, "uuids": uuids, "uid": os.getuid()}))
except OSError as e:
    print(json.dumps({"error": str(e)}))
"""


def fenced_run(fence: GpuFence, given, uid: int) -> dict:
    hidden = fence.plan(given)

    def preexec() -> None:
        fence.apply(hidden)
        if uid:
            os.setgid(uid)
            os.setuid(uid)

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120,
                       preexec_fn=preexec, env=env)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (r.stderr or r.stdout)[-500:]}


def main() -> int:
    started = time.monotonic()
    failures = 0

    def check(ok: bool, what: str, detail: object = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {what}{f': {detail}' if detail != '' else ''}", flush=True)

    t = time.perf_counter()
    inventory = read_nvml_inventory()
    check(bool(inventory.devices), f"NVML inventory in {1000 * (time.perf_counter() - t):.0f} ms",
          inventory.unavailable_reason or json.dumps(inventory.as_dict()["devices"]))
    if not inventory.devices:
        return 1
    fence = GpuFence()
    check(fence.unavailable is None, "fence available", fence.describe())
    if fence.unavailable:
        return 1
    everything = fenced_run(GpuFence(Path("/nonexistent")), [], 0)  # no node hidden: the baseline
    check(everything.get("count", 0) >= 1, "unfenced process sees the GPUs", everything)
    for uid in (0, 65534):
        cpu = fenced_run(fence, [], uid)
        check(cpu.get("count") == 0, f"CPU profile (uid {uid}, CUDA_VISIBLE_DEVICES unset) sees no GPU", cpu)
    for device in inventory.devices[:3]:
        one = fenced_run(fence, [device], 65534)
        check(one.get("count") == 1, f"given {device.kind} {device.uuid} (uid 65534) sees exactly one", one)
    print(f"{'ALL PASSED' if not failures else f'{failures} FAILED'} in {time.monotonic() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
