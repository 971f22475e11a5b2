"""Prometheus metrics of the Dask Gateway: clusters and workers per user and group, and (on
Kubernetes, with a Prometheus scraping NVIDIA's DCGM exporter) the GPU use of each cluster's
worker pods. Served by the gateway itself at `<gateway>/api/mlaas/metrics`: only the gateway
knows every user's clusters (its API lists a caller's own), so the hub cannot count them.

Who may read them: the platform's scrape service (`mlaas-metrics`, whose role adds the gateway's
access scope to `read:metrics`) and hub admins, with the gateway's usual credentials
(`Authorization: jupyterhub <token>`); anyone else gets 403, no credentials 401.

- `mlaas_dask_clusters{user}` / `mlaas_group_dask_clusters{group}`: clusters starting or running;
- `mlaas_dask_workers{user}` / `mlaas_group_dask_workers{group}`: workers asked for;
- `mlaas_dask_worker_cores{user}`, `mlaas_dask_worker_gpus{user}` / `mlaas_group_dask_worker_gpus{group}`;
- `mlaas_dask_cluster_gpu_utilization_percent{user,cluster}` and
  `mlaas_dask_cluster_gpu_memory_used_bytes{user,cluster}`: the mean use of the GPUs of a cluster's
  worker pods (`dask-worker-<cluster>-…`, as dask-gateway's controller names them).

The groups are those a cluster's limits were checked against (a project's hub user counts as its
group), as kept with the cluster when it was created.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .capacity.base import combined_use

METRICS_PATH = "/api/mlaas/metrics"
METRICS_SERVICE = "mlaas-metrics"  # the hub's scrape service (mlaas.hubconfig.METRICS_ROLE)

log = logging.getLogger("DaskGateway.mlaas.metrics")


def worker_gpu_use(by_pod: dict[str, list[dict]], clusters: Iterable[Any]) -> dict[str, list[dict]]:
    """Cluster name -> the devices of its worker pods (from DcgmUsage.by_pod: "namespace/pod" -> devices)."""
    names = sorted((c.name for c in clusters), key=len, reverse=True)  # a longer name first: no prefix clash
    out: dict[str, list[dict]] = {}
    for key, devices in by_pod.items():
        pod = key.partition("/")[2]
        for name in names:
            if pod.startswith(f"dask-worker-{name}-"):
                out.setdefault(name, []).extend(devices)
                break
    return out


class DaskCollector:
    """`uses`: the gateway's clusters now (mlaas.dask_gateway.ClusterUse); `gpu`: cluster name ->
    the devices of its workers, with utilization and memory_used (or nothing known)."""

    def __init__(self, uses: list[Any], gpu: dict[str, list[dict]] | None = None):
        self.uses, self.gpu = uses, gpu or {}

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        per_user: dict[str, dict[str, float]] = {}
        per_group: dict[str, dict[str, float]] = {}
        for c in self.uses:
            amounts = {"clusters": 1, "workers": c.workers, "cores": c.total("cores"), "gpus": c.total("gpus")}
            for bucket in [per_user.setdefault(c.user, {})] + [per_group.setdefault(g, {}) for g in c.groups]:
                for k, v in amounts.items():
                    bucket[k] = bucket.get(k, 0) + v
        families = [
            ("mlaas_dask_clusters", "Dask clusters starting or running, by user", "user", per_user, "clusters"),
            ("mlaas_dask_workers", "Dask workers asked for, by user", "user", per_user, "workers"),
            ("mlaas_dask_worker_cores", "Cores of the Dask workers asked for, by user", "user", per_user, "cores"),
            ("mlaas_dask_worker_gpus", "GPUs of the Dask workers asked for, by user", "user", per_user, "gpus"),
            ("mlaas_group_dask_clusters", "Dask clusters of each group's members", "group", per_group, "clusters"),
            ("mlaas_group_dask_workers", "Dask workers of each group's members", "group", per_group, "workers"),
            ("mlaas_group_dask_worker_gpus", "GPUs of the Dask workers of each group's members", "group", per_group,
             "gpus"),
        ]
        for name, doc, label, table, key in families:
            family = GaugeMetricFamily(name, doc, labels=[label])
            for who, amounts in sorted(table.items()):
                family.add_metric([who], amounts[key])
            yield family
        util = GaugeMetricFamily("mlaas_dask_cluster_gpu_utilization_percent",
                                 "Mean utilisation of the GPUs of a Dask cluster's workers", labels=["user", "cluster"])
        memory = GaugeMetricFamily("mlaas_dask_cluster_gpu_memory_used_bytes",
                                   "GPU memory used by a Dask cluster's workers", labels=["user", "cluster"])
        for c in sorted(self.uses, key=lambda c: c.name):
            devices = self.gpu.get(c.name)
            if not devices:
                continue
            utilization, used = combined_use(devices)
            if utilization is not None:
                util.add_metric([c.user, c.name], utilization)
            memory.add_metric([c.user, c.name], used)
        yield from (util, memory)


def render(uses: list[Any], gpu: dict[str, list[dict]] | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaskCollector(uses, gpu))
    return generate_latest(registry)


def metrics_handler(backend: Any) -> Callable:
    """The aiohttp handler the gateway's backend adds (ProfileLimitsMixin.setup): authenticated like
    the gateway's own API, readable by the scrape service and admins only."""
    from aiohttp import web
    from dask_gateway_server.routes import api_handler

    @api_handler(user_authenticated=True)
    async def metrics(request: Any) -> Any:
        user = request["user"]
        if user.name != f"service:{METRICS_SERVICE}" and not user.admin:  # upstream names a service "service:<name>"
            raise web.HTTPForbidden(reason=f"only the {METRICS_SERVICE} service and admins read the gateway's metrics")
        uses = backend._uses()
        gpu: dict[str, list[dict]] = {}
        dcgm = backend.dcgm()
        if dcgm is not None and any(u.gpus_per_worker for u in uses):
            try:
                gpu = worker_gpu_use(await asyncio.to_thread(dcgm.by_pod), uses)
            except Exception as e:  # Prometheus away: the counts still answer
                log.warning("GPU use of Dask workers from Prometheus is not available: %s", e)
        body = render(uses, gpu)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    return metrics
