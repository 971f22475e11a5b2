"""Hand out GPUs and MIG instances to servers: never one device to two servers, freed on stop.

All methods are synchronous and the hub runs on one event loop, so a check and the claim that
follows it cannot interleave with another spawn's.
"""

from __future__ import annotations

from ..profiles.mig import device_matches
from ..profiles.model import Profile
from .base import Availability, Device, Inventory, InventorySource
from .process_owner import attribute


class NoCapacity(Exception):
    """The profile's accelerators cannot be given now; the message is for the user."""


def _matches(profile: Profile, device: Device) -> bool:
    if profile.gpu:  # the same rule as the Kubernetes path's product labels (mlaas.profiles.mig)
        return device.kind == "gpu" and device_matches(profile.gpu.model, device.model)
    if profile.mig:
        return device.kind == "mig" and device.mig_profile == profile.mig.profile
    return False


def _wanted(profile: Profile) -> int:
    if profile.gpu:
        return profile.gpu.count
    if profile.mig:
        return profile.mig.count
    return 0


def _what(profile: Profile) -> str:
    if profile.gpu:
        return f"{profile.gpu.model} GPU" if profile.gpu.model else "GPU"
    assert profile.mig
    return f"MIG {profile.mig.profile} instance"


class DeviceAllocator:
    def __init__(self, source: InventorySource):
        self.source = source
        self._owners: dict[str, str] = {}  # device uuid -> owner key ("user/server")

    def inventory(self) -> Inventory:
        return self.source.inventory()

    def availability(self, profile: Profile, exact: bool = False) -> Availability:
        """(Always exact: a count over this machine's devices.)"""
        if not profile.needs_accelerator:
            return Availability(1, 1, None)
        inv = self.inventory()
        if inv.unavailable_reason:
            return Availability(0, 0, inv.unavailable_reason)
        matching = [d for d in inv.devices if _matches(profile, d)]
        wanted = _wanted(profile)
        total = len(matching) // wanted
        free = len([d for d in matching if d.uuid not in self._owners]) // wanted
        if total == 0:
            have = len(matching)
            reason = (
                f"this platform has no {_what(profile)}"
                if have == 0
                else f"this platform has only {have} {_what(profile)}(s), the profile needs {wanted}"
            )
            return Availability(0, 0, reason)
        if free == 0:
            return Availability(0, total, f"all {len(matching)} {_what(profile)}s are in use")
        return Availability(free, total, None)

    def claim(self, owner: str, profile: Profile) -> list[Device]:
        """Reserve the profile's devices for `owner` or raise NoCapacity with the reason."""
        self.release(owner)
        if not profile.needs_accelerator:
            return []
        availability = self.availability(profile)
        if availability.free == 0:
            raise NoCapacity(f"Profile {profile.slug!r} cannot start now: {availability.reason}.")
        inv = self.inventory()
        chosen = [d for d in inv.devices if _matches(profile, d) and d.uuid not in self._owners][: _wanted(profile)]
        for device in chosen:
            self._owners[device.uuid] = owner
        return chosen

    def restore(self, owner: str, uuids: list[str]) -> None:
        """Re-register devices of a server that survived a hub restart."""
        for uuid in uuids:
            self._owners[uuid] = owner

    def release(self, owner: str) -> list[str]:
        freed = [uuid for uuid, who in self._owners.items() if who == owner]
        for uuid in freed:
            del self._owners[uuid]
        return freed

    def held(self) -> dict[str, str]:
        return dict(self._owners)

    def use_report(self, servers: dict[int, str] | None = None) -> tuple[dict[str, list[dict]], list[dict]]:
        """(server "user/server" -> the devices it holds with their use now and their processes'
        servers, the GPU processes outside their server's assignment). `servers`: each running
        server's process ID -> "user/server" (process_owner); without it processes are not
        attributed. NVML: blocking, call it off the event loop."""
        inventory = {d.uuid: d for d in self.inventory().devices}
        use = self.source.usage()
        holders = self.held()
        per_device, outside = attribute({u: x.pids for u, x in use.items() if x.pids}, holders, servers or {})
        out: dict[str, list[dict]] = {}
        for uuid, owner in holders.items():
            d, u = inventory.get(uuid), use.get(uuid)
            out.setdefault(owner, []).append(
                {"uuid": uuid, "model": d.model if d else "", "mig_profile": d.mig_profile if d else None,
                 "utilization": u.utilization if u else None, "memory_used": u.memory_used if u else 0,
                 "processes": per_device.get(uuid, [])})
        return out, outside if servers else []
