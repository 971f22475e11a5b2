"""What accelerators exist and which are free: one interface, several sources (NVML; Kubernetes later)."""

from .allocator import DeviceAllocator, NoCapacity
from .base import Device, Inventory, InventorySource, inventory_source

__all__ = ["Device", "DeviceAllocator", "Inventory", "InventorySource", "NoCapacity", "inventory_source"]
