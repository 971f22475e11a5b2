"""Group quotas: count what running servers hold, and refuse a spawn that would exceed a quota.

The ledger lists every server that holds resources (pending or running), with its owner's
groups and profile. Spawners record a server when its profile is accepted and release it when
it stops; after a hub restart, `load_state` records the servers that survived. Both spawners
use the same ledger and the same check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .capacity.base import combined_use
from .profiles.loader import ProfileSet
from .profiles.model import GroupQuota, Profile
from .profiles.quantities import format_bytes


@dataclass(frozen=True)
class Holding:
    user: str
    server: str  # "" for the default server
    groups: frozenset[str]
    profile: Profile
    site: str = ""  # the cluster it runs on, with a federation of sites
    pod: str = ""  # "namespace/pod" on Kubernetes (what the GPU metrics name)

    @property
    def label(self) -> str:
        name = f"{self.user}/{self.server}" if self.server else self.user
        return f"{name} ({self.profile.slug})"


class QuotaExceeded(Exception):
    """The message names the quota, the current use and who holds it."""


class UsageLedger:
    def __init__(self) -> None:
        self._holdings: dict[str, Holding] = {}

    def hold(self, key: str, holding: Holding) -> None:
        self._holdings[key] = holding

    def release(self, key: str) -> None:
        self._holdings.pop(key, None)

    def rename(self, key: str, new_key: str) -> None:
        """Keep a holding under another key (a server whose pod is still going away)."""
        if key in self._holdings:
            self._holdings[new_key] = self._holdings.pop(key)

    def holdings(self, excluding: str | None = None) -> list[Holding]:
        return [h for key, h in self._holdings.items() if key != excluding]


# --- what one server counts for, per quota dimension -------------------------------------------
def _amounts(profile: Profile) -> dict[str, float]:
    amounts: dict[str, float] = {"cpu": profile.cpu.limit, "memory": profile.memory.limit}
    if profile.gpu:
        amounts["gpus"] = profile.gpu.count
    if profile.mig:
        amounts[f"mig:{profile.mig.profile}"] = profile.mig.count
    return amounts


def _limits(quota: GroupQuota) -> dict[str, float]:
    limits: dict[str, float] = {}
    if quota.gpus is not None:
        limits["gpus"] = quota.gpus
    if quota.cpu is not None:
        limits["cpu"] = quota.cpu
    if quota.memory is not None:
        limits["memory"] = quota.memory
    for name, count in quota.mig.items():
        limits[f"mig:{name}"] = count
    return limits


def _show(dimension: str, value: float) -> str:
    if dimension == "memory":
        return format_bytes(int(value))
    if dimension == "cpu":
        return f"{value:g} CPU cores"
    if dimension == "gpus":
        return f"{value:g} GPUs"
    return f"{value:g} MIG {dimension.split(':', 1)[1]} slices"


def _short(dimension: str, value: float) -> str:
    return format_bytes(int(value)) if dimension == "memory" else f"{value:g}"


@dataclass(frozen=True)
class GroupUse:
    group: str
    quota: GroupQuota
    used: dict[str, float]
    holders: list[Holding]


def group_use(quota: GroupQuota, holdings: Iterable[Holding]) -> GroupUse:
    members = [h for h in holdings if quota.group in h.groups]
    used: dict[str, float] = {}
    for h in members:
        for dim, amount in _amounts(h.profile).items():
            used[dim] = used.get(dim, 0) + amount
    return GroupUse(quota.group, quota, used, members)


def check(
    pset: ProfileSet, user: str, groups: Iterable[str], profile: Profile, holdings: Iterable[Holding]
) -> None:
    """Raise QuotaExceeded if starting `profile` for `user` would exceed any of their groups' quotas."""
    holdings = list(holdings)
    wanted = _amounts(profile)
    for group in sorted(groups):
        quota = pset.quota_of(group)
        if quota is None:
            continue
        use = group_use(quota, holdings)
        for dim, limit in _limits(quota).items():
            need = wanted.get(dim, 0)
            if need and use.used.get(dim, 0) + need > limit:
                holders = [h.label for h in use.holders if _amounts(h.profile).get(dim)]
                held_by = f": {', '.join(holders)}" if holders else ""
                raise QuotaExceeded(
                    f"group {group} uses {_short(dim, use.used.get(dim, 0))} of {_show(dim, limit)}{held_by}; "
                    f"profile {profile.slug!r} needs {_short(dim, need)} more."
                )
        if quota.servers_per_user is not None:
            mine = [h for h in holdings if h.user == user]
            if len(mine) + 1 > quota.servers_per_user:
                raise QuotaExceeded(
                    f"group {group} allows {quota.servers_per_user} running server(s) per member; "
                    f"you have {len(mine)}: {', '.join(h.label for h in mine)}."
                )


def report(pset: ProfileSet, holdings: Iterable[Holding]) -> list[dict]:
    """Per-group use against quota, for admins."""
    holdings = list(holdings)
    out = []
    for quota in pset.quotas:
        use = group_use(quota, holdings)
        out.append(
            {
                "group": quota.group,
                "limits": _limits(quota) | ({"servers_per_user": quota.servers_per_user} if quota.servers_per_user is not None else {}),
                "used": use.used,
                "servers": [
                    {"user": h.user, "server": h.server, "profile": h.profile.slug} for h in use.holders
                ],
            }
        )
    return out


def usage(holdings: Iterable[Holding], devices: dict[str, list[dict]] | None = None) -> dict:
    """What runs now, per server and per group (every group, with or without a quota), for admins.

    `devices` maps a server ("user/name") to the GPUs and MIG instances it holds, with their use
    (utilisation in %, None where not known; memory used): summed up per server, user and group.
    """
    devices = devices or {}
    servers, groups, users = [], {}, {}
    for h in sorted(holdings, key=lambda h: (h.user, h.server)):
        key = f"{h.user}/{h.server}"
        amounts = _amounts(h.profile)
        servers.append(
            {
                "user": h.user,
                "server": h.server,
                "groups": sorted(h.groups),
                "profile": h.profile.slug,
                "site": h.site,
                "profile_name": h.profile.display_name,
                "summary": h.profile.summary(),
                "cpu": amounts["cpu"],
                "memory": amounts["memory"],
                "gpus": amounts.get("gpus", 0),
                "mig": {dim.split(":", 1)[1]: n for dim, n in amounts.items() if dim.startswith("mig:")},
                "devices": devices.get(key, []),
                "gpu_use": _gpu_use(devices.get(key, [])),
                "gpu_idle_timeout": h.profile.gpu_idle_timeout,
            }
        )
        u = users.setdefault(h.user, {"servers": 0, "gpus": 0, "mig": 0, "devices": []})
        u["servers"] += 1
        u["gpus"] += amounts.get("gpus", 0)
        u["mig"] += sum(n for dim, n in amounts.items() if dim.startswith("mig:"))
        u["devices"] += devices.get(key, [])
        for group in h.groups:
            g = groups.setdefault(group, {"servers": 0, "users": set(), "cpu": 0.0, "memory": 0, "gpus": 0, "mig": {}})
            g["servers"] += 1
            g["users"].add(h.user)
            g["cpu"] += amounts["cpu"]
            g["memory"] += amounts["memory"]
            g["gpus"] += amounts.get("gpus", 0)
            g.setdefault("devices", []).extend(devices.get(key, []))
            for dim, n in amounts.items():
                if dim.startswith("mig:"):
                    name = dim.split(":", 1)[1]
                    g["mig"][name] = g["mig"].get(name, 0) + n
    return {
        "servers": servers,
        "users": {name: {**{k: v for k, v in x.items() if k != "devices"}, "gpu_use": _gpu_use(x["devices"])}
                  for name, x in sorted(users.items())},
        "groups": {name: {**{k: v for k, v in g.items() if k != "devices"}, "users": sorted(g["users"]),
                          "gpu_use": _gpu_use(g.get("devices", []))} for name, g in sorted(groups.items())},
    }


def _gpu_use(devices: list[dict]) -> dict:
    """The use of these devices together: mean utilisation of those whose use is known (None if
    none is), memory used in bytes."""
    utilization, memory = combined_use(devices)
    return {"devices": len(devices), "utilization": round(utilization) if utilization is not None else None,
            "memory_used": memory}
