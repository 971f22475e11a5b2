"""Dask Gateway from the same profile and group model: cluster options and limits.

dask-gateway itself only limits single clusters. Here the `dask:` section of the profile files
gives the worker sizes users may choose and the per-cluster limits, `dask.per_user` limits all
clusters of one user together, and a group quota's `dask:` limits all clusters of the group's
members together (clusters, worker cores, memory, GPUs). They are checked when a cluster is
created, when it is scaled (a clear error naming the limit and the current use), and on every
scheduler heartbeat (adaptive scaling is capped, never refused).

One machine, hub as root: `MLaaSLocalBackend` (mlaas.dask_gateway_local) runs every
scheduler and worker under the cluster owner's own system account (the same one as their
server, from the account registry), in its own cgroup with the worker's cores and memory, with
umask 077; the gateway itself runs as root, so no user's task can read its environment, its
memory or another user's cluster files. Without root (development), `MLaaSUnsafeLocalBackend`
runs everything as the hub's account. The Kubernetes backend runs each cluster in its own pods;
its module needs no more than the gateway's own image has (the local backends need SQLAlchemy).
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dask_gateway_server.backends.kubernetes.backend import KubeBackend
from dask_gateway_server.models import ClusterStatus
from dask_gateway_server.options import Options, Select
from dask_gateway_server.auth import JupyterHubAuthenticator, unauthorized
from dask_gateway_server.backends.base import PublicException
from traitlets import Unicode
from traitlets.config import LoggingConfigurable

from .profiles import ProfileSet, ProfileStore, allowed_profiles
from .profiles.model import DaskLimits
from .profiles.quantities import format_bytes, parse_bytes, to_quantity
from .projects.identity import acting_groups

SERVICE_NAME = "dask-gateway"
PREFIX = f"/services/{SERVICE_NAME}"


def gpu_entitled(pset: ProfileSet, groups: Iterable[str]) -> bool:
    """GPU workers are for users who may start some GPU or MIG profile."""
    return any(p.needs_accelerator for p in allowed_profiles(pset, groups))


def _gpu_worker_config(gpus: int, container: dict[str, Any], pod: dict[str, Any]) -> dict[str, Any]:
    """Whole GPUs per worker on the Kubernetes backend, added to the configured worker container and
    pod settings (their security context stays: Pod Security 'restricted' requires it)."""
    container = copy.deepcopy(container)
    resources = container.setdefault("resources", {})
    resources.setdefault("limits", {})["nvidia.com/gpu"] = str(gpus)
    pod = copy.deepcopy(pod)
    pod["tolerations"] = [*pod.get("tolerations", []), {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"worker_extra_container_config": container, "worker_extra_pod_config": pod}


def cluster_options_for(
    pset: ProfileSet, groups: Iterable[str], environment: dict[str, str], kubernetes: bool = False,
    worker_container: dict[str, Any] | None = None, worker_pod: dict[str, Any] | None = None,
) -> Options:
    policy = pset.dask
    fields = [
        Select("worker_cores", [str(c) for c in policy.worker_cores], default=str(policy.worker_cores[0]),
               label="Worker cores"),
        Select("worker_memory", [to_quantity(m) for m in policy.worker_memory],
               default=to_quantity(policy.worker_memory[0]), label="Worker memory"),
    ]
    gpu_choices = sorted(set(policy.worker_gpus) | {0})
    if gpu_entitled(pset, groups) and len(gpu_choices) > 1:
        fields.append(Select("worker_gpus", [str(g) for g in gpu_choices], default="0", label="GPUs per worker"))

    def handler(options: Any, user: Any) -> dict[str, Any]:
        gpus = int(getattr(options, "worker_gpus", 0) or 0)
        if gpus and not kubernetes:
            raise PublicException(
                "GPU workers need the Kubernetes backend; this one-machine gateway runs CPU workers only."
            )
        gpu_config = _gpu_worker_config(gpus, worker_container or {}, worker_pod or {}) if gpus else {}
        return gpu_config | {
            "worker_cores": int(options.worker_cores),
            "worker_threads": int(options.worker_cores),
            "worker_memory": parse_bytes(options.worker_memory),
            "cluster_max_workers": policy.cluster_max_workers,
            "cluster_max_cores": policy.cluster_max_cores,
            "cluster_max_memory": policy.cluster_max_memory,
            "idle_timeout": float(policy.idle_timeout),
            "environment": dict(environment),
        }

    return Options(*fields, handler=handler)


# --- accounting over all clusters ----------------------------------------------------------------
@dataclass(frozen=True)
class ClusterUse:
    name: str
    user: str
    groups: frozenset[str]
    workers: int
    cores_per_worker: float
    memory_per_worker: int
    gpus_per_worker: int

    def total(self, dim: str, workers: int | None = None) -> float:
        n = self.workers if workers is None else workers
        per = {"cores": self.cores_per_worker, "memory": self.memory_per_worker, "gpus": self.gpus_per_worker}[dim]
        return n * per


def _show(dim: str, value: float) -> str:
    return format_bytes(int(value)) if dim == "memory" else f"{value:g} {'worker cores' if dim == 'cores' else 'GPUs'}"


def scale_refusal(
    pset: ProfileSet, clusters: list[ClusterUse], cluster: ClusterUse, new_workers: int
) -> tuple[str | None, int]:
    """(why scaling `cluster` to `new_workers` breaks a user or group limit, the most that fits)."""
    scopes: list[tuple[str, DaskLimits, list[ClusterUse]]] = [
        (f"user {cluster.user}", pset.dask.per_user, [c for c in clusters if c.user == cluster.user])
    ]
    for group in sorted(cluster.groups):
        quota = pset.quota_of(group)
        if quota is not None:
            scopes.append((f"group {group}", quota.dask, [c for c in clusters if group in c.groups]))
    fits, reason = new_workers, None
    for who, limits, members in scopes:
        others = [c for c in members if c.name != cluster.name]
        for dim in ("cores", "memory", "gpus"):
            limit = getattr(limits, dim)
            per_worker = cluster.total(dim, 1)
            if limit is None or per_worker == 0:
                continue
            used = sum(c.total(dim) for c in others)
            room = int((limit - used) // per_worker) if limit >= used else 0
            if new_workers > room and room < fits:
                fits = max(room, 0)
                held = ", ".join(f"{c.name}: {_show(dim, c.total(dim))}" for c in others if c.total(dim)) or "none"
                reason = (
                    f"{who} may use {_show(dim, limit)} in Dask clusters; other clusters use {_show(dim, used)} "
                    f"({held}), so cluster {cluster.name} can have at most {max(room, 0)} workers of "
                    f"{_show(dim, per_worker)} each, not {new_workers}"
                )
    return reason, fits


def new_cluster_refusal(pset: ProfileSet, clusters: list[ClusterUse], user: str, groups: Iterable[str]) -> str | None:
    mine = [c for c in clusters if c.user == user]
    limit = pset.dask.per_user.clusters
    if limit is not None and len(mine) >= limit:
        return f"user {user} may have {limit} Dask cluster(s) and has {len(mine)}: {', '.join(c.name for c in mine)}"
    for group in sorted(groups):
        quota = pset.quota_of(group)
        if quota is None or quota.dask.clusters is None:
            continue
        members = [c for c in clusters if group in c.groups]
        if len(members) >= quota.dask.clusters:
            owners = ", ".join(f"{c.name} ({c.user})" for c in members)
            return f"group {group} may have {quota.dask.clusters} Dask cluster(s) and has {len(members)}: {owners}"
    return None


@dataclass(frozen=True)
class _Active:
    name: str
    user: str
    options: dict
    config: dict
    workers: int


class ProfileLimitsMixin(LoggingConfigurable):
    """Options and limits from the profile files, for any dask-gateway backend (see module doc)."""

    profiles_dir = Unicode("spawner_profiles", config=True, help="Directory of profile YAML files.")
    gpu_metrics_url = Unicode(
        "", config=True,
        help="A Prometheus scraping NVIDIA's DCGM exporter: the GPU use of clusters' worker pods in the "
        "gateway's metrics (mlaas.dask_metrics); empty: not reported.",
    )
    kubernetes = False  # GPU workers only where pods can ask for GPUs
    api_prefixes: tuple[str, ...] = ("",)  # where the gateway's API answers (the Kubernetes backend adds one)

    async def setup(self, app: Any) -> None:
        """The gateway's metrics next to its API (mlaas.dask_metrics)."""
        from .dask_metrics import METRICS_PATH, metrics_handler

        handler = metrics_handler(self)
        for prefix in self.api_prefixes:
            app.router.add_get(prefix + METRICS_PATH, handler)
        await super().setup(app)  # type: ignore[misc]

    def dcgm(self) -> Any:
        if not self.gpu_metrics_url:
            return None
        if not hasattr(self, "_dcgm"):
            from .capacity.dcgm import DcgmUsage

            self._dcgm = DcgmUsage(self.gpu_metrics_url)
        return self._dcgm

    @property
    def store(self) -> ProfileStore:
        if not hasattr(self, "_store"):
            self._store = ProfileStore(self.profiles_dir, log=self.log)
        return self._store

    def _active(self) -> list[_Active]:
        """The clusters that are starting or running, with their worker counts."""
        raise NotImplementedError

    def groups_of(self, user: Any, pset: ProfileSet) -> list[str]:
        """The groups a gateway user acts in: a project's hub user counts as its group."""
        return acting_groups(user.name, user.groups, pset.projects)

    async def get_cluster_options(self, user: Any) -> Options:
        config = self.cluster_config_class(parent=self)
        pset = await self.store.fresh()
        return cluster_options_for(
            pset, self.groups_of(user, pset), dict(config.environment), kubernetes=self.kubernetes,
            worker_container=getattr(config, "worker_extra_container_config", None),
            worker_pod=getattr(config, "worker_extra_pod_config", None),
        )

    async def process_cluster_options(self, user: Any, request: dict) -> tuple[dict, Any]:
        options, config = await super().process_cluster_options(user, request)  # type: ignore[misc]
        options = dict(options)
        options["mlaas_groups"] = self.groups_of(user, self.store.current())  # kept with the cluster, for group limits
        return options, config

    def _uses(self) -> list[ClusterUse]:
        return [
            ClusterUse(
                name=c.name,
                user=c.user,
                groups=frozenset(c.options.get("mlaas_groups", [])),
                workers=c.workers,
                cores_per_worker=float(c.config.get("worker_cores", 1)),
                memory_per_worker=int(c.config.get("worker_memory", 0)),
                gpus_per_worker=int(c.options.get("worker_gpus", 0) or 0),
            )
            for c in self._active()
        ]

    async def start_cluster(self, user: Any, cluster_options: dict) -> str:
        pset = await self.store.fresh()
        refusal = new_cluster_refusal(pset, self._uses(), user.name, self.groups_of(user, pset))
        if refusal:
            raise PublicException(f"New Dask cluster refused: {refusal}.")
        return await super().start_cluster(user, cluster_options)  # type: ignore[misc]

    async def forward_message_to_scheduler(self, cluster: Any, msg: dict) -> None:
        if msg.get("op") == "scale":
            uses = self._uses()
            this = next((u for u in uses if u.name == cluster.name), None)
            if this is not None:
                reason, _ = scale_refusal(self.store.current(), uses, this, int(msg["count"]))
                if reason:
                    raise PublicException(f"Scale refused: {reason}.")
        await super().forward_message_to_scheduler(cluster, msg)  # type: ignore[misc]

    async def on_cluster_heartbeat(self, cluster_name: str, msg: dict) -> None:
        """Adaptive scaling asks through heartbeats: cap it at what the limits allow."""
        uses = self._uses()
        this = next((u for u in uses if u.name == cluster_name), None)
        if this is not None and msg.get("count", 0) > this.workers:
            reason, fits = scale_refusal(self.store.current(), uses, this, int(msg["count"]))
            if reason:
                self.log.info("Capping cluster %s at %d workers: %s", cluster_name, fits, reason)
                msg = {**msg, "count": fits}
        await super().on_cluster_heartbeat(cluster_name, msg)  # type: ignore[misc]


class MLaaSHubAuthenticator(JupyterHubAuthenticator):
    """dask-gateway's JupyterHub authenticator, with every bad credential a 401, never a 500.

    Upstream answers 500 when the hub says 403 (JupyterHub's answer for a token it does not know)
    and crashes on a malformed Authorization header; a bogus token is the caller's mistake."""

    def get_token(self, request: Any) -> str | None:
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "jupyterhub" or not token or any(c.isspace() or not c.isprintable() for c in token):
            return None
        return token

    async def authenticate(self, request: Any) -> Any:
        from aiohttp import ClientError, web

        if self.get_token(request) is None:
            raise unauthorized("jupyterhub")
        try:
            return await super().authenticate(request)
        except web.HTTPInternalServerError:  # upstream's answer to the hub's 403 for an unknown token
            raise unauthorized("jupyterhub") from None
        except (ClientError, ValueError, KeyError) as e:
            self.log.warning("Could not verify a token with the hub: %s", type(e).__name__)
            raise web.HTTPBadGateway(reason="The hub could not verify the token; try again") from None


class MLaaSKubeBackend(ProfileLimitsMixin, KubeBackend):
    """Kubernetes: each cluster's scheduler and workers as pods (dask-gateway's KubeBackend and its
    controller); GPU workers ask for `nvidia.com/gpu`."""

    kubernetes = True
    api_prefix = Unicode(
        "", config=True,
        help="Also answer the API under this path prefix: with no Traefik in front (the hub on one machine), "
        "JupyterHub's proxy forwards /services/dask-gateway/api/... unchanged.",
    )

    profiles_configmap = Unicode(
        "", config=True,
        help="Read the profile files from this ConfigMap of the gateway's namespace through the API (the chart "
        "cannot mount it into the gateway's pod); empty: from profiles_dir.",
    )

    @property
    def api_prefixes(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("", self.api_prefix.rstrip("/")) if self.api_prefix else ("",)

    async def setup(self, app: Any) -> None:
        if self.api_prefix:
            from dask_gateway_server.routes import default_routes

            for route in default_routes:
                app.router.add_route(route.method, self.api_prefix.rstrip("/") + route.path, route.handler)
        await super().setup(app)
        if self.profiles_configmap:
            from .kube_api import own_namespace
            from .profiles.configmap import ConfigMapMirror, live_configmap

            names = [self.profiles_configmap, live_configmap(self.profiles_configmap)]  # deployed, then live edits
            mirror = ConfigMapMirror(self.core_client, own_namespace(), names, log=self.log)
            self.profiles_dir = str(mirror.directory)
            await mirror.sync()
            self._mirror_task = asyncio.ensure_future(mirror.run())

    def _active(self) -> list[_Active]:
        active = []
        for name, c in self.clusters.items():
            if c.status > ClusterStatus.RUNNING:
                continue
            spec = (self.informer.get(name) or {}).get("spec") or {}
            active.append(_Active(name, c.username, c.options, c.config, int(spec.get("replicas", 0))))
        return active


def configure_gateway_options(c: Any, profiles_configmap: str = "mlaas-profiles", profiles_dir: str = "",
                              gpu_metrics_url: str | None = None) -> None:
    """Dask Gateway on Kubernetes (its Helm chart's extraConfig): worker choices and per-cluster
    limits from the same profile files as the hub: read from the profiles ConfigMap through the
    API (charts/mlaas-hub lets the gateway's ServiceAccount read it), or from `profiles_dir`."""
    c.DaskGateway.backend_class = MLaaSKubeBackend  # the chart's KubeBackend settings apply to it
    c.DaskGateway.authenticator_class = MLaaSHubAuthenticator  # the chart's JupyterHub auth settings apply too
    if profiles_dir:
        c.MLaaSKubeBackend.profiles_dir = profiles_dir
    else:
        c.MLaaSKubeBackend.profiles_configmap = profiles_configmap
    if gpu_metrics_url:  # the GPU use of GPU workers in the gateway's metrics
        c.MLaaSKubeBackend.gpu_metrics_url = gpu_metrics_url
    kube_cluster_commands(c)


def kube_cluster_commands(c: Any) -> None:
    """Scheduler and worker commands of clusters in pods: distributed 2026 has no `dask-scheduler`
    or `dask-worker` (dask-gateway's defaults), only `dask scheduler` and `dask worker`."""
    c.KubeClusterConfig.scheduler_cmd = ["dask", "scheduler"]
    c.KubeClusterConfig.worker_cmd = ["dask", "worker"]


def configure(c: Any, settings: Any) -> None:
    """dask-gateway-server's configuration, as a JupyterHub-managed service of the platform."""
    from .logscrub import install

    install()
    gw = settings.dask_gateway
    state = settings.state_dir / "dask-gateway"
    venv_bin = Path(sys.prefix) / "bin"
    c.DaskGateway.authenticator_class = MLaaSHubAuthenticator
    c.JupyterHubAuthenticator.jupyterhub_service_name = SERVICE_NAME  # only tokens with its access scope
    c.DaskGateway.address = f"127.0.0.1:{gw.api_port}"
    c.Proxy.address = f"127.0.0.1:{gw.port}"
    c.Proxy.tcp_address = f"{gw.tcp_host}:{gw.tcp_port}"  # laptops too where tcp_host is public
    c.Proxy.prefix = PREFIX
    if gw.backend == "kubernetes":
        configure_kube_backend(c, settings)
    else:
        from .dask_gateway_local import MLaaSLocalBackend, MLaaSUnsafeLocalBackend
        from .settings import instance_id

        if os.geteuid() == 0 and settings.isolation != "single-account":
            c.DaskGateway.backend_class = MLaaSLocalBackend
            c.MLaaSLocalBackend.accounts_db = str(settings.accounts_db)
            c.MLaaSLocalBackend.homes_dir = str(settings.homes_dir)
            c.MLaaSLocalBackend.limits_group = f"mlaas-{instance_id(settings.homes_dir)}-dask"
            c.MLaaSLocalBackend.max_processes = settings.max_processes
        else:
            c.DaskGateway.backend_class = MLaaSUnsafeLocalBackend
        c.ProfileLimitsMixin.profiles_dir = str(settings.profiles_dir)
        c.LocalBackend.stop_clusters_on_shutdown = True  # the servers that made them stop after it at shutdown
        c.LocalBackend.clusters_directory = str(state / "clusters")
        c.ClusterConfig.scheduler_cmd = [str(venv_bin / "dask"), "scheduler"]
        c.ClusterConfig.worker_cmd = [str(venv_bin / "dask"), "worker"]
    from .xcache import client_env

    if settings.data.enabled:  # workers read through the site cache like the notebook does
        c.ClusterConfig.environment = client_env(settings.data, settings.state_dir)


GATEWAY_INSTANCE = "mlaas"


def configure_kube_backend(c: Any, settings: Any) -> None:
    """The hub on this machine, Dask clusters as pods of the cluster in `kubernetes` (with
    `dask_gateway.backend: kubernetes`): the gateway's KubeBackend creates DaskCluster objects, its
    controller (a second hub-managed service) turns them into pods. The DaskCluster CRD (and the
    Traefik route CRDs the controller writes) come with the Dask Gateway chart.

    Here the hub's proxy forwards the gateway's API; clients reach schedulers through the
    cluster (Traefik, from the Dask Gateway chart), so this mode is for running the hub outside a
    cluster that has the chart installed, and for testing the backend against a cluster."""
    from .spawners.kube import RESTRICTED_CONTAINER, RESTRICTED_POD

    gw, k = settings.dask_gateway, settings.kubernetes
    c.DaskGateway.backend_class = MLaaSKubeBackend
    c.DaskGateway.address = f"{k.hub_connect_ip}:{gw.api_port}"  # schedulers in pods report here
    c.MLaaSKubeBackend.profiles_dir = str(settings.profiles_dir)
    c.MLaaSKubeBackend.api_prefix = PREFIX
    if k.gpu_metrics_url:
        c.MLaaSKubeBackend.gpu_metrics_url = k.gpu_metrics_url
    c.KubeBackend.gateway_instance = c.KubeController.gateway_instance = GATEWAY_INSTANCE
    c.KubeController.address = f"127.0.0.1:{gw.controller_port}"
    c.KubeController.api_url = f"http://{k.hub_connect_ip}:{gw.api_port}/api"
    c.KubeController.proxy_prefix = PREFIX
    c.KubeClusterConfig.namespace = k.namespace
    c.KubeClusterConfig.image = k.image
    kube_cluster_commands(c)
    container = {"securityContext": {**RESTRICTED_CONTAINER, "runAsUser": 1000}}
    pod = {"securityContext": RESTRICTED_POD}
    c.KubeClusterConfig.scheduler_extra_container_config = c.KubeClusterConfig.worker_extra_container_config = container
    c.KubeClusterConfig.scheduler_extra_pod_config = c.KubeClusterConfig.worker_extra_pod_config = pod
