"""Prometheus metrics of the platform itself, served with JupyterHub's own at `/hub/metrics`
(scope `read:metrics`: a scraper gets a token with that scope alone, see docs/operations.md).

Computed at scrape time from what the hub holds (the profile files in force, the quota ledger,
the capacity source, the GPU use of this machine's devices), so they are never stale:

- `mlaas_servers{profile,site}`: servers running;
- `mlaas_accelerators_held{user,profile,kind}` and `mlaas_group_accelerators_held{group,kind}`:
  whole GPUs (`kind="gpu"`) and MIG slices (`kind="mig-3g.20gb"`) held;
- `mlaas_quota_used{group,resource}` / `mlaas_quota_limit{group,resource}`: group quotas;
- `mlaas_profile_free{profile}` / `mlaas_profile_total{profile}`: how many more servers of a
  GPU or MIG profile fit now / on the idle platform;
- `mlaas_server_gpu_utilization_percent{user,server}` and `mlaas_server_gpu_memory_used_bytes`:
  the use of a server's devices (one machine: NVML);
- `mlaas_gpu_processes_outside_assignment{device,server}` (one machine): processes on a device
  their server was not given (server "" when they belong to none), which the GPU fence prevents
  where it is in force;
- `mlaas_spawn_refusals_total{reason}` (mlaas.spawners.refusals): spawns the platform refused
  before starting anything (`not-allowed`, `quota`, `no-capacity`, `invalid-request`), which
  JupyterHub alone counts as failed spawns.

JupyterHub's own `jupyterhub_running_servers` is counted again at each scrape: JupyterHub
decrements it when a failed or refused spawn is cleaned up although that server was never
counted, so after one refused request it read 0 while a server ran.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from .capacity.base import combined_use
from .profiles import Profile
from .quotas import _amounts, report
from .spawners.common import usage_ledger

log = logging.getLogger("JupyterHub.mlaas.metrics")


class PlatformCollector:
    """`store`: the profile store in force; `availability`: profile -> Availability (the local
    allocator, or the Kubernetes capacity caches); `devices`: () -> {"user/server": [device dicts
    with utilization and memory_used]}, or a pair of it and the GPU processes outside their
    server's assignment (one machine: DeviceAllocator.use_report), or None."""

    def __init__(self, store: Any, availability: Callable[[Profile], Any],
                 devices: Callable[[], dict[str, list[dict]]] | None = None):
        self.store, self.availability, self.devices = store, availability, devices

    def describe(self) -> Iterable:
        return []  # collected at scrape time only (no describe-time work)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            recount_running_servers()
            yield from self._collect()
        except Exception:  # a scrape never breaks the hub
            log.exception("collecting the platform's metrics failed")

    def _collect(self) -> Iterable[GaugeMetricFamily]:
        pset = self.store.current()
        holdings = list(usage_ledger().holdings())
        servers = GaugeMetricFamily("mlaas_servers", "Servers running, by profile and site", labels=["profile", "site"])
        held = GaugeMetricFamily("mlaas_accelerators_held", "Whole GPUs and MIG slices held, by user and profile",
                                 labels=["user", "profile", "kind"])
        group_held = GaugeMetricFamily("mlaas_group_accelerators_held", "Whole GPUs and MIG slices held by servers "
                                       "of each group's members", labels=["group", "kind"])
        counts: dict[tuple[str, str], int] = {}
        per_user: dict[tuple[str, str, str], float] = {}
        per_group: dict[tuple[str, str], float] = {}
        for h in holdings:
            counts[(h.profile.slug, h.site or "")] = counts.get((h.profile.slug, h.site or ""), 0) + 1
            for dim, n in _amounts(h.profile).items():
                kind = "gpu" if dim == "gpus" else f"mig-{dim.split(':', 1)[1]}" if dim.startswith("mig:") else None
                if kind is None:
                    continue
                per_user[(h.user, h.profile.slug, kind)] = per_user.get((h.user, h.profile.slug, kind), 0) + n
                for group in h.groups:
                    per_group[(group, kind)] = per_group.get((group, kind), 0) + n
        for labels, n in sorted(counts.items()):
            servers.add_metric(list(labels), n)
        for labels, n in sorted(per_user.items()):
            held.add_metric(list(labels), n)
        for labels, n in sorted(per_group.items()):
            group_held.add_metric(list(labels), n)
        yield from (servers, held, group_held)

        used = GaugeMetricFamily("mlaas_quota_used", "Group quota in use", labels=["group", "resource"])
        limit = GaugeMetricFamily("mlaas_quota_limit", "Group quota", labels=["group", "resource"])
        for q in report(pset, holdings):
            for resource, value in q["limits"].items():
                if resource == "servers_per_user":
                    continue
                limit.add_metric([q["group"], resource], float(value))
                used.add_metric([q["group"], resource], float(q["used"].get(resource, 0)))
        yield from (used, limit)

        free = GaugeMetricFamily("mlaas_profile_free", "More servers of a GPU or MIG profile that fit now", labels=["profile"])
        total = GaugeMetricFamily("mlaas_profile_total", "Servers of a GPU or MIG profile that fit on the idle platform",
                                  labels=["profile"])
        for profile in pset.profiles:
            if not profile.needs_accelerator or not profile.enabled:
                continue
            a = self.availability(profile)
            free.add_metric([profile.slug], a.free)
            total.add_metric([profile.slug], a.total)
        yield from (free, total)

        util = GaugeMetricFamily("mlaas_server_gpu_utilization_percent", "Mean utilisation of a server's GPUs "
                                 "(those whose use the driver reports)", labels=["user", "server"])
        memory = GaugeMetricFamily("mlaas_server_gpu_memory_used_bytes", "GPU memory used on a server's devices",
                                   labels=["user", "server"])
        use = self.devices() if self.devices else {}
        held, outside = use if isinstance(use, tuple) else (use, [])
        for key, devices in sorted(held.items()):
            user, _, server = key.partition("/")
            utilization, used = combined_use(devices)
            if utilization is not None:
                util.add_metric([user, server], utilization)
            memory.add_metric([user, server], used)
        yield from (util, memory)

        stray = GaugeMetricFamily("mlaas_gpu_processes_outside_assignment", "Processes on a GPU or MIG instance "
                                  "their server was not given", labels=["device", "server"])
        counted: dict[tuple[str, str], int] = {}
        for p in outside:
            key = (p["uuid"], p["server"] or "")
            counted[key] = counted.get(key, 0) + 1
        for labels, n in sorted(counted.items()):
            stray.add_metric(list(labels), n)
        yield stray


def recount_running_servers() -> None:
    """Set JupyterHub's running-servers gauge from the servers themselves (see the module's doc)."""
    from jupyterhub.app import JupyterHub
    from jupyterhub.metrics import RUNNING_SERVERS

    if JupyterHub.initialized():
        RUNNING_SERVERS.set(JupyterHub.instance().users.count_active_users()["active"])


_registered: list[PlatformCollector] = []


def register(collector: PlatformCollector) -> None:
    """Once per hub process (the config file may be loaded again by `jupyterhub --generate-config`
    etc.). JupyterHub's running-servers gauge is registered again after ours, so the scrape that
    recounts it also reports the new count."""
    from jupyterhub.metrics import RUNNING_SERVERS

    if _registered:
        REGISTRY.unregister(_registered.pop())
    REGISTRY.register(collector)
    _registered.append(collector)
    REGISTRY.unregister(RUNNING_SERVERS)
    REGISTRY.register(RUNNING_SERVERS)
