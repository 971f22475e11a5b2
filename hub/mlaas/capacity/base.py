"""The accelerator inventory: devices a server can be given, whole GPUs or MIG instances."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from ..profiles.model import Profile


@dataclass(frozen=True)
class Device:
    uuid: str  # what CUDA_VISIBLE_DEVICES takes: GPU-… or MIG-…
    kind: Literal["gpu", "mig"]
    model: str  # product name, e.g. "NVIDIA A100-SXM4-40GB"
    memory_bytes: int
    index: str  # "0" for a GPU, "0:1" for MIG instance 1 of GPU 0
    mig_profile: str | None = None
    parent_uuid: str | None = None
    minor: int | None = None  # /dev/nvidia<minor> of the GPU (of the parent GPU, for MIG)
    caps: tuple[int, ...] = ()  # MIG: its GPU and compute instances' /dev/nvidia-caps/nvidia-cap<N>


@dataclass(frozen=True)
class DeviceUse:
    """How much one device is used now (NVML; a stand-in file in tests)."""

    uuid: str
    utilization: int | None  # percent of time a kernel ran in the last sample period; None: not known
    memory_used: int  # bytes, by the processes on it
    pids: tuple[int, ...] = ()  # the compute processes on it (this machine's PIDs)


def combined_use(devices: list[dict]) -> tuple[float | None, int]:
    """The use of these devices together (dicts with `utilization` and `memory_used`, as the
    usage view, NVML and DCGM give them): the mean utilisation of those whose use is known (None
    if none is), and the memory used in bytes."""
    known = [d["utilization"] for d in devices if d.get("utilization") is not None]
    return (sum(known) / len(known) if known else None), sum(d.get("memory_used", 0) for d in devices)


@dataclass(frozen=True)
class Inventory:
    devices: tuple[Device, ...] = ()
    source: str = ""
    unavailable_reason: str | None = None  # why there are no devices at all, for the form
    mig_enabled_gpus: tuple[str, ...] = field(default=())  # whole GPUs that are split and not assignable
    device_root: str = "/dev"  # where the devices' nodes are (the GPU fence hides those not given)

    def as_dict(self, held: dict[str, str] | None = None) -> dict:
        """The inventory as JSON-ready data; `held` adds which server holds each device."""
        devices = []
        for d in self.devices:
            entry = dict(d.__dict__)
            if held is not None:
                entry["held_by"] = held.get(d.uuid)
            devices.append(entry)
        return {
            "source": self.source,
            "unavailable_reason": self.unavailable_reason,
            "mig_enabled_gpus": list(self.mig_enabled_gpus),
            "devices": devices,
        }


@dataclass(frozen=True)
class Availability:
    """How many more servers of one profile can start now, and why none can if so."""

    free: int  # how many more servers of this profile fit now
    total: int  # how many would fit on the idle platform
    reason: str | None  # why none can be started, if free == 0
    where: str | None = None  # per site, with a federation: "at site-a 1 free, site-b 2 free"


class CapacitySource(Protocol):
    """What the form and the submit-time check ask: the local allocator or the Kubernetes cache."""

    def availability(self, profile: "Profile", exact: bool = False) -> Availability:
        """What is free for the profile; `exact`: computed now, not a view that may lag a second."""
        ...


class InventorySource(Protocol):
    def inventory(self) -> Inventory: ...

    def usage(self) -> dict[str, DeviceUse]: ...


def inventory_source(spec: str) -> InventorySource:
    """'nvml' reads the real GPUs; anything else is the path of a simulated inventory file."""
    if spec == "nvml":
        from .nvml import NvmlInventory

        return NvmlInventory()
    from .simulated import SimulatedInventory

    return SimulatedInventory(spec)
