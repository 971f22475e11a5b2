"""The accelerator inventory: devices a server can be given, whole GPUs or MIG instances."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class Device:
    uuid: str  # what CUDA_VISIBLE_DEVICES takes: GPU-… or MIG-…
    kind: Literal["gpu", "mig"]
    model: str  # product name, e.g. "NVIDIA A100-SXM4-40GB"
    memory_bytes: int
    index: str  # "0" for a GPU, "0:1" for MIG instance 1 of GPU 0
    mig_profile: str | None = None
    parent_uuid: str | None = None


@dataclass(frozen=True)
class Inventory:
    devices: tuple[Device, ...] = ()
    source: str = ""
    unavailable_reason: str | None = None  # why there are no devices at all, for the form
    mig_enabled_gpus: tuple[str, ...] = field(default=())  # whole GPUs that are split and not assignable


class InventorySource(Protocol):
    def inventory(self) -> Inventory: ...


def inventory_source(spec: str) -> InventorySource:
    """'nvml' reads the real GPUs; anything else is the path of a simulated inventory file."""
    if spec == "nvml":
        from .nvml import NvmlInventory

        return NvmlInventory()
    from .simulated import SimulatedInventory

    return SimulatedInventory(spec)
