"""A simulated GPU inventory read from YAML — for tests and demos on machines without GPUs.

It stands in for NVML only; allocation, the form and the spawner run unchanged on top of it.

    gpus:
      - {uuid: GPU-aaaa, name: NVIDIA A100-SXM4-40GB, memory: 40Gi}
      - uuid: GPU-bbbb
        name: NVIDIA A100-SXM4-40GB
        memory: 40Gi
        mig: [{uuid: MIG-b1, profile: 3g.20gb, caps: [21, 22]}, {uuid: MIG-b2, profile: 1g.10gb}]
    device_nodes: /dev     # where the GPU fence finds the device nodes (tests: a directory of stand-ins)
    usage:                 # what NVML would report now (tests rewrite it), per device
      GPU-aaaa: {utilization: 35, memory_used: 3Gi, pids: [4242]}

A GPU's device node is /dev/nvidia<minor> (`minor`, default its position); a MIG instance's
capability nodes are `caps` (default none).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ..profiles.quantities import parse_bytes
from .base import Device, DeviceUse, Inventory


class SimulatedInventory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def inventory(self) -> Inventory:
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            return Inventory(source=f"simulated:{self.path}", unavailable_reason=f"cannot read {self.path}: {e}")
        devices: list[Device] = []
        split: list[str] = []
        for i, gpu in enumerate(data.get("gpus") or []):
            memory = parse_bytes(gpu.get("memory", "40Gi"))
            minor = int(gpu.get("minor", i))
            if not gpu.get("mig"):
                devices.append(Device(gpu["uuid"], "gpu", gpu["name"], memory, str(i), minor=minor))
                continue
            split.append(gpu["uuid"])
            for j, mig in enumerate(gpu["mig"]):
                gb = re.search(r"\.(\d+)gb", mig["profile"])
                devices.append(
                    Device(
                        uuid=mig["uuid"],
                        kind="mig",
                        model=gpu["name"],
                        memory_bytes=int(gb.group(1)) * 10**9 if gb else 0,
                        index=f"{i}:{j}",
                        mig_profile=mig["profile"],
                        parent_uuid=gpu["uuid"],
                        minor=minor,
                        caps=tuple(int(c) for c in mig.get("caps") or ()),
                    )
                )
        reason = None if devices else f"the simulated inventory {self.path} lists no GPUs"
        return Inventory(tuple(devices), f"simulated:{self.path}", reason, tuple(split),
                         device_root=str(data.get("device_nodes") or "/dev"))

    def usage(self) -> dict[str, DeviceUse]:
        """The file's `usage:` (read again each time: tests change it while servers run); a device
        it does not name is idle."""
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}
        listed = data.get("usage") or {}
        out = {}
        for device in self.inventory().devices:
            use = listed.get(device.uuid) or {}
            out[device.uuid] = DeviceUse(device.uuid, int(use.get("utilization", 0)),
                                         parse_bytes(str(use.get("memory_used", 0))),
                                         tuple(int(p) for p in use.get("pids") or ()))
        return out
