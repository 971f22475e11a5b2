"""The platform's small REST API under the hub.

- `GET /hub/api/mlaas/profiles`: the profiles the calling user may start, with availability
  (what the spawn form shows), for scripts and clients.
- `GET /hub/api/mlaas/quotas`: per-group use against quota, with who holds what (admins).
- `GET /hub/api/mlaas/capacity`: this machine's GPUs and MIG instances and which server holds
  each (admins).
- `GET /hub/api/mlaas/usage`: which servers run which profile, per user and per group, with the
  GPUs and MIG slices they hold, and each group's experiment-tracking artifacts against its limit
  (scope `read:servers`: admins and the admin service).
"""

from __future__ import annotations

import asyncio
import json
import logging

from jupyterhub import orm
from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.scopes import needs_scope
from tornado import web

from . import quotas
from .spawners.common import profile_store, usage_ledger

log = logging.getLogger("JupyterHub.mlaas.api")


class ProfilesAPIHandler(APIHandler):
    async def get(self) -> None:
        user = self.current_user
        if user is None or getattr(user, "kind", "user") != "user":
            raise web.HTTPError(403, "Only users have profiles; sign in or use a user's token.")
        spawner = user.get_spawner("", replace_failed=True)
        await spawner.store.fresh()
        entries = spawner.form_entries()
        self.set_header("Content-Type", "application/json")
        self.write(
            json.dumps(
                {
                    "user": user.name,
                    "groups": spawner.user_groups(),
                    "profiles": [
                        {
                            "slug": e.profile.slug,
                            "display_name": e.profile.display_name,
                            "summary": e.profile.summary(),
                            "default": e.profile.default,
                            "available": e.unavailable is None,
                            "unavailable_reason": e.unavailable,
                            "capacity": e.capacity,
                            "sites": e.where,
                        }
                        for e in entries
                    ],
                    "notices": spawner.form_notices(),
                }
            )
        )


class QuotasAPIHandler(APIHandler):
    def initialize(self, profiles_dir: str, snapshot: str) -> None:
        # config values are deep-copied, so the handler gets the store's key, not the store
        self.store = profile_store(profiles_dir, snapshot)

    @needs_scope("admin:users")
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"groups": quotas.report(await self.store.fresh(), usage_ledger().holdings())}))


class CapacityAPIHandler(APIHandler):
    def initialize(self, gpu_inventory: str) -> None:
        from .spawners.local import device_allocator

        self.allocator = device_allocator(gpu_inventory)

    @needs_scope("admin:users")
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.allocator.inventory().as_dict(held=self.allocator.held())))


def pod_devices(dcgm, holdings) -> dict[str, list[dict]]:
    """Server ("user/server") -> the GPUs its pod uses, from the DCGM exporter's series; none if
    Prometheus cannot be asked now (the view still shows what each server holds)."""
    try:
        by_pod = dcgm.by_pod()
    except Exception as e:
        log.warning("GPU use from Prometheus is not available: %s", e)
        return {}
    return {f"{h.user}/{h.server}": by_pod[h.pod] for h in holdings if h.pod in by_pod}


class UsageAPIHandler(APIHandler):
    """On both hubs. With local servers (`gpu_inventory` given) it names the devices each server
    holds; on Kubernetes the device plugin hands them out, so servers show their profile's GPUs and
    MIG slices, and the site they run at."""

    def initialize(self, profiles_dir: str, snapshot: str, gpu_inventory: str | None = None,
                   gpu_metrics_url: str | None = None, tracking_service: str | None = None) -> None:
        self.store = profile_store(profiles_dir, snapshot)
        self.tracking_service = tracking_service
        self.allocator = None
        self.dcgm = None
        if gpu_inventory is not None:
            from .spawners.local import device_allocator

            self.allocator = device_allocator(gpu_inventory)
        elif gpu_metrics_url:
            from .capacity.dcgm import DcgmUsage

            self.dcgm = DcgmUsage(gpu_metrics_url)

    @needs_scope("read:servers")
    async def get(self) -> None:
        devices: dict[str, list[dict]] = {}
        inventory_view = None
        outside: list[dict] = []
        pset = await self.store.fresh()
        holdings = usage_ledger().holdings()
        if self.allocator is not None:
            from .spawners.local import running_server_pids

            # NVML: who uses their devices how much, and which server each GPU process belongs to
            devices, outside = await asyncio.to_thread(self.allocator.use_report, running_server_pids(self.users))
            inventory_view = self.allocator.inventory().as_dict(held=self.allocator.held())
        elif self.dcgm is not None:
            devices = await asyncio.to_thread(pod_devices, self.dcgm, holdings)
        tracking, tracking_error = await self.tracking_use(pset)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(
            quotas.usage(holdings, devices) | {"quotas": quotas.report(pset, holdings), "devices": inventory_view,
                                               "gpu_processes_outside_assignment": outside, "tracking": tracking,
                                               "tracking_error": tracking_error}
        ))

    async def tracking_use(self, pset) -> tuple[list[dict] | None, str | None]:
        """Each group's experiment-tracking artifacts, against its limit (mlaas.tracking), as the
        tracking service measures them; None where tracking is off; an error where it did not answer."""
        from .tracking.sync import workspace_name
        from .tracking.usage import workspace_usage

        service = self.services.get(self.tracking_service or "")
        if service is None:
            return None, None
        try:
            sizes = await workspace_usage(service)
        except Exception as e:  # the service is down, starting, or unreachable
            self.log.warning("The tracking service's usage could not be read: %s", e)
            return [], f"The tracking service did not answer ({e})."
        limits = {q.group: q.tracking_artifacts for q in pset.quotas if q.tracking_artifacts is not None}
        groups = {workspace_name(g.name): g.name for g in self.db.query(orm.Group)} | \
            {workspace_name(g): g for g in limits}
        return [{"group": groups.get(ws), "workspace": ws, "artifact_bytes": size,
                 "limit_bytes": limits.get(groups.get(ws, ""))} for ws, size in sizes.items()], None
