"""The GPU paths on a real NVIDIA machine (as root; under 5 minutes on one GPU):

    sudo .venv/bin/python tests/gpu/check.py

1. the NVML inventory as the hub reads it (mlaas.capacity.nvml): every GPU and MIG instance, with
   the device node minors and MIG capability minors the fence uses;
2. the fence (mlaas.gpu_fence): a CPU profile's process, with CUDA_VISIBLE_DEVICES unset and as an
   unprivileged account, finds no CUDA device; a process given one GPU (or MIG instance) finds
   exactly that one. CUDA is asked through the driver's own library (libcuda, cuDeviceGetCount),
   so no framework is needed;
3. GPU use (mlaas.capacity.nvml.read_nvml_usage): a process holding a CUDA context and 256 MiB on
   the first device, doing nothing, is found on that device with its PID and memory, at 0 %;
4. the GPU idle decision (mlaas.gpu_culler.GpuIdleTracker) on those real samples: warn, then stop.

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


HOLDER = r"""
import ctypes, os, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev, ctx, ptr = ctypes.c_int(0), ctypes.c_void_p(), ctypes.c_ulonglong(0)
assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev) == 0
assert cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(256 * 2**20)) == 0
print("ready", os.getpid(), flush=True)
time.sleep(float(sys.argv[1]))
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
    use_checks(inventory, check)
    print(f"{'ALL PASSED' if not failures else f'{failures} FAILED'} in {time.monotonic() - started:.1f} s")
    return 1 if failures else 0


def use_checks(inventory, check) -> None:
    from mlaas.capacity.nvml import read_nvml_usage
    from mlaas.gpu_culler import GpuIdleTracker

    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "30"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = holder.stdout.readline().split()
        if line[:1] != ["ready"]:
            check(False, "a CUDA process holds 256 MiB", line)
            return
        pid = int(line[1])
        found, deadline = None, time.monotonic() + 15
        while found is None and time.monotonic() < deadline:
            found = next((u for u in read_nvml_usage().values() if pid in u.pids), None)
            time.sleep(0.5)
        check(found is not None, f"NVML names the process {pid} on its device", found)
        if found is None:
            return
        check(found.memory_used >= 256 * 2**20, "its memory is counted", found.memory_used)
        time.sleep(2)
        samples = [read_nvml_usage()[found.uuid] for _ in range(3)]
        idle = all(u.utilization == 0 for u in samples)
        check(idle, "an idle context shows 0 % utilisation", [u.utilization for u in samples])
        server = {"user": "check", "server": "", "gpu_idle_timeout": 60,
                  "devices": [{"uuid": found.uuid, "utilization": samples[-1].utilization}]}
        tracker = GpuIdleTracker()
        kinds = [a.kind for t in (0, 45, 61) for a in tracker.observe(t, [server])]
        check(kinds == ["warn", "stop"], "the idle decision on these samples: warn, then stop", kinds)
    finally:
        holder.kill()
        holder.wait()


if __name__ == "__main__":
    sys.exit(main())
