"""What accelerators exist and which are free: one interface, several sources (NVML; Kubernetes later)."""

from .allocator import DeviceAllocator, NoCapacity
from .base import Availability, CapacitySource, Device, Inventory, InventorySource, inventory_source

__all__ = [
    "Availability",
    "CapacitySource",
    "Device",
    "DeviceAllocator",
    "Inventory",
    "InventorySource",
    "NoCapacity",
    "inventory_source",
]
