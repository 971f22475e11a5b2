"""The real GPUs of this machine through NVML (nvidia-ml-py): whole GPUs and MIG instances.

Without an NVIDIA driver the inventory is empty and says why; it never raises.
"""

from __future__ import annotations

import threading
import time

from ..gpu_fence import mig_capability_minors
from ..profiles.mig import mig_profile_from_device_name
from .base import Device, DeviceUse, Inventory

CACHE_SECONDS = 30.0


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def read_nvml_inventory() -> Inventory:
    try:
        import pynvml
    except ImportError as e:  # the package is a dependency; a broken install must not crash the hub
        return Inventory(source="nvml", unavailable_reason=f"nvidia-ml-py is not installed ({e})")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return Inventory(source="nvml", unavailable_reason=f"no NVIDIA GPU driver on this machine (NVML: {e})")
    try:
        devices: list[Device] = []
        split: list[str] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            try:
                mig_on = pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
            except pynvml.NVMLError:  # GPUs without MIG support
                mig_on = False
            minor = _minor(pynvml, handle)
            if not mig_on:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
                devices.append(Device(uuid, "gpu", name, int(memory), str(i), minor=minor))
                continue
            split.append(uuid)
            for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                except pynvml.NVMLError:
                    continue  # empty slot
                mig_name = _text(pynvml.nvmlDeviceGetName(mig))
                devices.append(
                    Device(
                        uuid=_text(pynvml.nvmlDeviceGetUUID(mig)),
                        kind="mig",
                        model=name,
                        memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(mig).total),
                        index=f"{i}:{j}",
                        mig_profile=mig_profile_from_device_name(mig_name),
                        parent_uuid=uuid,
                        minor=minor,
                        caps=_mig_caps(pynvml, mig, minor),
                    )
                )
        reason = None if devices or split else "NVML found no GPUs on this machine"
        return Inventory(tuple(devices), "nvml", reason, tuple(split))
    except pynvml.NVMLError as e:
        return Inventory(source="nvml", unavailable_reason=f"NVML error while listing GPUs: {e}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _minor(pynvml, handle) -> int | None:
    try:
        return int(pynvml.nvmlDeviceGetMinorNumber(handle))
    except pynvml.NVMLError:
        return None


def _mig_caps(pynvml, mig, gpu_minor: int | None) -> tuple[int, ...]:
    """The capability nodes of a MIG instance (its GPU and compute instance), for the GPU fence."""
    if gpu_minor is None:
        return ()
    try:
        gi, ci = pynvml.nvmlDeviceGetGpuInstanceId(mig), pynvml.nvmlDeviceGetComputeInstanceId(mig)
    except pynvml.NVMLError:
        return ()
    return mig_capability_minors(gpu_minor, int(gi), int(ci))


def read_nvml_usage() -> dict[str, DeviceUse]:
    """Each whole GPU's and MIG instance's use now: its compute processes and their memory, and
    its utilisation (a whole GPU: the driver's sample; a MIG instance: the SM use of its processes
    from the parent GPU's per-process samples where the driver gives them, else unknown)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver: nothing is used
        return {}
    out: dict[str, DeviceUse] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                mig_on = pynvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE
            except pynvml.NVMLError:
                mig_on = False
            if not mig_on:
                pids, memory = _processes(pynvml, handle)
                try:
                    util: int | None = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except pynvml.NVMLError:
                    util = None
                out[_text(pynvml.nvmlDeviceGetUUID(handle))] = DeviceUse(
                    _text(pynvml.nvmlDeviceGetUUID(handle)), util, memory, pids)
                continue
            sm = _process_sm_use(pynvml, handle)
            for j in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                except pynvml.NVMLError:
                    continue
                pids, memory = _processes(pynvml, mig)
                if not pids:
                    util = 0  # nothing runs on it
                elif sm is None:
                    util = None  # processes, but the driver gives no per-process samples: not known
                else:
                    util = max(sm.get(pid, 0) for pid in pids)
                uuid = _text(pynvml.nvmlDeviceGetUUID(mig))
                out[uuid] = DeviceUse(uuid, util, memory, pids)
        return out
    except pynvml.NVMLError:
        return out
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _processes(pynvml, handle) -> tuple[tuple[int, ...], int]:
    try:
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return (), 0
    return tuple(int(p.pid) for p in procs), sum(int(p.usedGpuMemory or 0) for p in procs)


def _process_sm_use(pynvml, handle) -> dict[int, int] | None:
    """pid -> SM utilisation (%) over the last seconds, from the GPU's per-process samples."""
    try:
        samples = pynvml.nvmlDeviceGetProcessUtilization(handle, int((time.time() - 10) * 1e6))
    except pynvml.NVMLError:
        return None
    use: dict[int, int] = {}
    for s in samples:
        use[int(s.pid)] = max(use.get(int(s.pid), 0), int(s.smUtil))
    return use


class NvmlInventory:
    """Cached for a short while: the hardware changes rarely, forms are viewed often."""

    def __init__(self, cache_seconds: float = CACHE_SECONDS):
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, Inventory] | None = None

    def inventory(self) -> Inventory:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.cache_seconds:
                self._cached = (now, read_nvml_inventory())
            return self._cached[1]

    def usage(self) -> dict[str, DeviceUse]:
        return read_nvml_usage()
