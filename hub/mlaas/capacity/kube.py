"""Live capacity of a Kubernetes cluster, from a watch cache of its Nodes and Pods.

Nodes give allocatable CPU, memory, `nvidia.com/gpu` and `nvidia.com/mig-<profile>` (NVIDIA GPU
operator naming; `mixed` MIG strategy) or, with the `single` strategy, `nvidia.com/gpu` on nodes
whose product label ends in `-MIG-<profile>`. Pods bound to a node use their requests. The cache
is kept current by list + watch (like KubeSpawner's reflectors): a form view reads memory only
and makes no API call.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..profiles.mig import GPU_MODELS, product_labels
from ..profiles.model import Profile
from ..profiles.quantities import parse_bytes, parse_cpu
from .base import Availability

GPU = "nvidia.com/gpu"
PRODUCT_LABEL = "nvidia.com/gpu.product"
POOL_KEY = "mlaas.io/node-pool"
MigStrategy = Literal["mixed", "single"]


def gpu_products(model: str | None) -> list[str]:
    """GFD product label values of the catalogue models a profile's `gpu.model` means ('H100' ->
    NVIDIA-H100-80GB-HBM3, NVIDIA-H100-PCIe, NVIDIA-H100-NVL); see mlaas.profiles.mig."""
    return product_labels(model)


def mig_single_products(mig_profile: str) -> list[str]:
    """Product label values of GPUs split into `mig_profile` slices under the `single` strategy."""
    return [f"{m.gfd_product}-MIG-{mig_profile}" for m in GPU_MODELS if mig_profile in m.mig_profiles]


def _quantity(resource: str, value: Any) -> float:
    if resource == "cpu":
        return parse_cpu(value)
    if resource == "memory" or resource.startswith("hugepages-") or resource == "ephemeral-storage":
        return float(parse_bytes(value))
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@dataclass
class NodeInfo:
    name: str
    labels: dict[str, str]
    allocatable: dict[str, float]
    schedulable: bool
    taints: list[dict[str, Any]]


@dataclass
class PodInfo:
    node: str | None
    requests: dict[str, float]


@dataclass(frozen=True)
class Demand:
    """What one server of a profile asks the scheduler for, and where it may land."""

    requests: dict[str, float]
    pool: str | None
    products: tuple[str, ...] | None  # allowed product label values, None: any
    tolerates_gpu_taint: bool
    what: str  # for messages: "A100 GPUs", "MIG 3g.20gb slices"; "" for CPU and memory only


def demand_of(profile: Profile, mig_strategy: MigStrategy = "mixed") -> Demand:
    requests = {
        "cpu": profile.cpu.guarantee or profile.cpu.limit,  # Kubernetes: no request means request = limit
        "memory": float(profile.memory.guarantee or profile.memory.limit),
    }
    products: tuple[str, ...] | None = None
    what = ""
    if profile.gpu:
        requests[GPU] = profile.gpu.count
        if profile.gpu.model:
            products = tuple(gpu_products(profile.gpu.model))
        what = f"{profile.gpu.model} GPUs" if profile.gpu.model else "GPUs"
    elif profile.mig:
        if mig_strategy == "mixed":
            requests[profile.mig.resource_name] = profile.mig.count
        else:
            requests[GPU] = profile.mig.count
            products = tuple(mig_single_products(profile.mig.profile))
        what = f"MIG {profile.mig.profile} slices"
    return Demand(requests, profile.node_pool, products, profile.needs_accelerator, what)


@dataclass
class _View:
    profile: Profile
    version: int
    state: tuple[str | None, str | None, bool]
    at: float  # when it was computed
    asked: float  # when it was last asked for
    availability: Availability


class KubeCapacity:
    def __init__(self, mig_strategy: MigStrategy = "mixed", log: logging.Logger | None = None):
        self.mig_strategy = mig_strategy
        self.log = log or logging.getLogger("JupyterHub.mlaas.capacity")
        self.nodes: dict[str, NodeInfo] = {}
        self.pods: dict[str, PodInfo] = {}
        self.used: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.reservations: dict[str, Profile] = {}  # spawns whose pods are not in the cache yet
        self.synced: set[str] = set()  # kinds listed at least once
        self.unreachable: str | None = None
        self.refused: dict[str, int] = {}  # kind -> HTTP status: the API server answered, RBAC refused the hub
        self._on_gone: dict[str, list[Callable[[], None]]] = {}  # pod key -> what to do once it is gone
        self.version = 0  # counts changes of what availability is computed from
        self._views: dict[int, _View] = {}  # id(profile) -> the last availability computed for it
        self._refreshing = False  # a refresher keeps the views current (then they may lag, briefly)

    # --- feeding the cache ----------------------------------------------------------------------
    def apply(self, kind: Literal["node", "pod"], event: str, obj: dict[str, Any]) -> None:
        """Apply one list item or watch event (ADDED, MODIFIED, DELETED) of a Node or Pod."""
        meta = obj.get("metadata") or {}
        if kind == "node":
            name = meta["name"]
            if event == "DELETED":
                self.version += self.nodes.pop(name, None) is not None
            else:
                info = self._node_info(obj)
                if self.nodes.get(name) != info:  # a node's status heartbeat changes nothing counted here
                    self.nodes[name] = info
                    self.version += 1
            return
        key = f"{meta.get('namespace', '')}/{meta['name']}"
        ended = event == "DELETED" or (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        info = None if ended else PodInfo((obj.get("spec") or {}).get("nodeName"), self._pod_requests(obj))
        if info is not None and self.pods.get(key) == info and meta["name"] not in self.reservations:
            return  # a status update of a pod already counted where it is
        self.version += 1
        self._unbook(key)
        self.reservations.pop(meta["name"], None)  # the spawn's pod is visible now
        if info is None:
            self._gone(key)
            return
        self.pods[key] = info
        if info.node:
            for resource, amount in info.requests.items():
                self.used[info.node][resource] += amount

    def replace(self, kind: Literal["node", "pod"], items: list[dict[str, Any]]) -> None:
        """A fresh list: forget what the cache knew of this kind."""
        if kind == "node":
            self.nodes.clear()
        else:
            self.pods.clear()
            self.used.clear()
        for item in items:
            self.apply(kind, "ADDED", item)
        self.synced.add(kind)
        if kind == "pod":
            for key in [k for k in self._on_gone if k not in self.pods]:
                self._gone(key)

    def when_gone(self, pod_key: str, callback: Callable[[], None]) -> None:
        """Call `callback` once the pod "namespace/name" is gone (now, if the cache has no such pod)."""
        if "pod" in self.synced and pod_key not in self.pods:
            callback()
            return
        self._on_gone.setdefault(pod_key, []).append(callback)

    def _gone(self, key: str) -> None:
        for callback in self._on_gone.pop(key, []):
            callback()

    def _unbook(self, key: str) -> None:
        old = self.pods.pop(key, None)
        if old and old.node:
            for resource, amount in old.requests.items():
                self.used[old.node][resource] -= amount

    @staticmethod
    def _node_info(obj: dict[str, Any]) -> NodeInfo:
        status, spec = obj.get("status") or {}, obj.get("spec") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        return NodeInfo(
            name=obj["metadata"]["name"],
            labels=dict(obj["metadata"].get("labels") or {}),
            allocatable={r: _quantity(r, v) for r, v in (status.get("allocatable") or {}).items()},
            schedulable=ready and not spec.get("unschedulable", False),
            taints=list(spec.get("taints") or []),
        )

    @staticmethod
    def _pod_requests(obj: dict[str, Any]) -> dict[str, float]:
        total: dict[str, float] = defaultdict(float)
        for container in (obj.get("spec") or {}).get("containers") or []:
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for resource in set(requests) | set(limits):
                total[resource] += _quantity(resource, requests.get(resource, limits.get(resource)))
        return dict(total)

    # --- reservations for spawns in flight ------------------------------------------------------
    def reserve(self, pod_name: str, profile: Profile) -> None:
        self.reservations[pod_name] = profile
        self.version += 1

    def release(self, pod_name: str) -> None:
        if self.reservations.pop(pod_name, None) is not None:
            self.version += 1

    # --- the question the form asks ---------------------------------------------------------------
    def _eligible(self, node: NodeInfo, demand: Demand, even_if_unschedulable: bool = False) -> bool:
        if not node.schedulable and not even_if_unschedulable:
            return False
        if demand.pool is not None and node.labels.get(POOL_KEY) != demand.pool:
            return False
        if demand.products is not None and node.labels.get(PRODUCT_LABEL) not in demand.products:
            return False
        for taint in node.taints:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            key = taint.get("key")
            if key == GPU and demand.tolerates_gpu_taint:
                continue
            if key == POOL_KEY and taint.get("value") == demand.pool:
                continue
            return False
        return True

    @staticmethod
    def _fits(free: dict[str, float], requests: dict[str, float]) -> int:
        counts = [math.floor(free.get(r, 0.0) / need + 1e-9) for r, need in requests.items() if need > 0]
        return max(0, min(counts)) if counts else 0

    @property
    def forbidden(self) -> str | None:
        if not self.refused:
            return None
        kinds = ", ".join(f"{k}s" for k in sorted(self.refused))
        status = max(self.refused.values())
        return (f"the hub may not list {kinds} (RBAC, HTTP {status}): bind its ServiceAccount to the ClusterRole "
                "mlaas-hub-capacity of charts/mlaas-hub (docs/deploy.md)")

    # --- what the form shows: a view kept off the request path ----------------------------------
    VIEW_MAX_AGE = 1.0  # seconds a view may lag the cluster while it changes (never at rest)

    def availability(self, profile: Profile, exact: bool = False) -> Availability:
        """What the form, the profiles API and the metrics show: the last computed view of this
        profile while nothing changed; where the refresher (`refresh_views`) runs, also while the
        view is younger than VIEW_MAX_AGE, so requests during a burst of spawns do not compute over
        every node. `exact`: computed now (the checks before a spawn)."""
        if exact:
            return self.exact_availability(profile)
        view = self._views.get(id(profile))
        now = time.monotonic()
        state = self._state()
        if view is not None and view.profile is profile and view.state == state[1:] and (
                view.version == state[0] or (self._refreshing and now - view.at < self.VIEW_MAX_AGE)):
            view.asked = now
            return view.availability
        return self._compute_view(profile, now)

    def _state(self) -> tuple[int, str | None, str | None, bool]:
        return self.version, self.forbidden, self.unreachable, "node" in self.synced

    def _compute_view(self, profile: Profile, now: float) -> Availability:
        state = self._state()
        availability = self.exact_availability(profile)
        self._views[id(profile)] = _View(profile, state[0], state[1:], now, now, availability)
        return availability

    async def refresh_views(self, every: float | None = None, forget_after: float = 600.0) -> None:
        """Recompute the views that were asked for, whenever the cluster changed, at most every
        `every` seconds (half of VIEW_MAX_AGE), one profile per turn of the event loop; forget
        those nobody asked for in `forget_after` seconds (profiles an edit replaced)."""
        every = every or self.VIEW_MAX_AGE / 2
        self._refreshing = True
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for key, view in list(self._views.items()):
                if now - view.asked > forget_after:
                    self._views.pop(key, None)
                elif view.version != self.version or view.state != self._state()[1:]:
                    self._compute_view(view.profile, time.monotonic())
                    self._views[key].asked = view.asked
                    await asyncio.sleep(0)

    def exact_availability(self, profile: Profile) -> Availability:
        if self.forbidden:
            return Availability(0, 0, self.forbidden)
        if self.unreachable:
            return Availability(0, 0, f"the cluster is unreachable ({self.unreachable})")
        if "node" not in self.synced:
            return Availability(0, 0, "the cluster's capacity is not known yet; try again in a moment")
        demand = demand_of(profile, self.mig_strategy)
        # spawns in flight take their place first, on the first node they fit
        booked: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for reserved in self.reservations.values():
            d = demand_of(reserved, self.mig_strategy)
            for node in self.nodes.values():
                if self._eligible(node, d) and self._fits(self._free(node, booked, d.requests), d.requests) > 0:
                    for r, amount in d.requests.items():
                        booked[node.name][r] += amount
                    break
        total = free = 0
        for node in self.nodes.values():
            if not self._eligible(node, demand):
                continue
            total += self._fits(node.allocatable, demand.requests)
            free += self._fits(self._free(node, booked, demand.requests), demand.requests)
        if total == 0:
            down = sum(1 for n in self.nodes.values() if not n.schedulable
                       and self._eligible(n, demand, even_if_unschedulable=True) and self._fits(n.allocatable, demand.requests))
            if down:  # the hardware exists, but cannot take pods now
                what = demand.what or "room for it"
                nodes = f"the only node with {what} is" if down == 1 else f"all {down} nodes with {what} are"
                return Availability(0, 0, f"{nodes} not ready or cordoned")
            missing = f"has {demand.what}" if demand.what else "has room for its CPU and memory"
            return Availability(0, 0, f"no node of this platform {missing}")
        if free == 0:
            full = f"all {demand.what} are in use" if demand.what else "every node that fits it is full"
            return Availability(0, total, f"none free: {full}")
        return Availability(free, total, None)

    def _free(self, node: NodeInfo, booked: dict[str, dict[str, float]], wanted: dict[str, float]) -> dict[str, float]:
        """What is left on a node of the resources a demand asks for."""
        used = self.used.get(node.name, {})
        extra = booked.get(node.name, {})
        return {r: node.allocatable.get(r, 0.0) - used.get(r, 0.0) - extra.get(r, 0.0) for r in wanted}

    # --- list + watch ----------------------------------------------------------------------------
    async def run(self, api_client: Any, retry_seconds: float = 5.0) -> None:
        """Keep the cache current from the API server until cancelled (one task per kind)."""
        from kubernetes_asyncio import client

        v1 = client.CoreV1Api(api_client)
        await asyncio.gather(
            self._reflect("node", v1.list_node, retry_seconds),
            self._reflect("pod", v1.list_pod_for_all_namespaces, retry_seconds),
            self.refresh_views(),
        )

    async def _reflect(self, kind: Literal["node", "pod"], list_fn: Any, retry: float) -> None:
        """List, then watch, as plain JSON: the client's model objects (built, then turned back into
        dicts) cost the hub's event loop about 2 ms per node event at 1,000 nodes, and their garbage
        long collections (measured with mlaas.loop_watch)."""
        from kubernetes_asyncio import client, watch

        raw = functools.partial(list_fn, _preload_content=False)  # no return type to build: raw events
        while True:
            try:
                response = await raw()
                if not response.ok:
                    raise client.ApiException(status=response.status, reason=response.reason)
                listed = json.loads(await response.read())
                self.replace(kind, listed.get("items") or [])
                self.unreachable = None
                self.refused.pop(kind, None)
                version = listed["metadata"]["resourceVersion"]
                stream = watch.Watch().stream(raw, resource_version=version, timeout_seconds=300)
                async for event in stream:
                    self.apply(kind, event["type"], event["raw_object"])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API server is down or the watch expired: list again
                status = getattr(e, "status", None)
                if status in (401, 403):  # reached, and refused: a permission to grant, not an outage
                    self.refused[kind] = status
                    self.unreachable = None
                    self.log.error("Capacity watch of %ss refused by RBAC (HTTP %s); retrying in %ss", kind, status, retry)
                else:
                    self.unreachable = f"{type(e).__name__}: {e}"[:200]
                    self.log.warning("Capacity watch of %ss failed, relisting in %ss: %s", kind, retry, e)
                await asyncio.sleep(retry)
