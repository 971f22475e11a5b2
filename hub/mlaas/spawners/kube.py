"""KubeProfileSpawner: the same profiles, form, access and quota checks, as Kubernetes pods.

`pod_settings()` maps a profile to what KubeSpawner puts into the pod: requests and limits,
`nvidia.com/gpu` or `nvidia.com/mig-<profile>` extended resources, node selection by GPU product
and node pool, tolerations for GPU and reserved-pool taints, the runtime class, and a
restricted security context (non-root, no privilege escalation, RuntimeDefault seccomp, no
capabilities). Capacity comes from a watch cache of the cluster's nodes and pods.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from kubespawner import KubeSpawner
from tornado import web
from traitlets import Bool, Dict, Enum, TraitError, Unicode, validate

from ..capacity.federation import Federation
from ..capacity.kube import GPU, POOL_KEY, PRODUCT_LABEL, KubeCapacity, MigStrategy, gpu_products, mig_single_products
from ..profiles import Profile
from ..projects.names import project_claim, project_slug
from ..tracking.hub_config import tracking_url
from .common import ProfileSpawnerMixin, usage_ledger
from .kube_sites import SiteConnection, bound_reflector, site_api_client, site_connections, site_core_api
from .site_ingress import create_ingress, server_ingress

RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}


@dataclass
class PodSettings:
    extra_resource_limits: dict[str, str] = field(default_factory=dict)
    extra_resource_guarantees: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    node_affinity_required: list[dict[str, Any]] = field(default_factory=list)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    runtime_class: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def _product_affinity(products: list[str]) -> dict[str, Any]:
    return {"matchExpressions": [{"key": PRODUCT_LABEL, "operator": "In", "values": products}]}


def pod_settings(profile: Profile, mig_strategy: MigStrategy = "mixed", gpu_runtime_class: str = "") -> PodSettings:
    s = PodSettings(environment=dict(profile.env), labels={"mlaas.io/profile": profile.slug})
    s.environment["MLAAS_PROFILE"] = profile.slug
    if profile.gpu:
        s.extra_resource_limits[GPU] = s.extra_resource_guarantees[GPU] = str(profile.gpu.count)
        if profile.gpu.model:
            s.node_affinity_required.append(_product_affinity(gpu_products(profile.gpu.model)))
    elif profile.mig:
        if mig_strategy == "mixed":
            name, count = profile.mig.resource_name, str(profile.mig.count)
            s.extra_resource_limits[name] = s.extra_resource_guarantees[name] = count
        else:  # single: MIG devices look like whole GPUs on nodes labelled with the MIG product
            s.extra_resource_limits[GPU] = s.extra_resource_guarantees[GPU] = str(profile.mig.count)
            s.node_affinity_required.append(_product_affinity(mig_single_products(profile.mig.profile)))
    if profile.needs_accelerator:
        s.tolerations.append(dict(GPU_TOLERATION))
        s.runtime_class = gpu_runtime_class or None
    else:
        s.environment["NVIDIA_VISIBLE_DEVICES"] = "void"  # no GPU through a default nvidia runtime either
    if profile.node_pool:
        s.node_selector[POOL_KEY] = profile.node_pool
        s.tolerations.append({"key": POOL_KEY, "operator": "Equal", "value": profile.node_pool, "effect": "NoSchedule"})
    return s


def project_storage(groups: list[str], mount_root: str) -> tuple[list[dict], list[dict]]:
    """Volumes and mounts: each project of the server's groups at `<mount_root>/<group>`."""
    volumes, mounts = [], []
    for group in groups:
        name = project_claim(group)
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": name}})
        mounts.append({"name": name, "mountPath": f"{mount_root.rstrip('/')}/{project_slug(group)}"})
    return volumes, mounts


def _as_list(items: list | dict) -> list:
    """KubeSpawner takes volumes and mounts as a list or as a dict whose values it sorts by key
    (Zero to JupyterHub's config uses dicts): the same entries as a list, in KubeSpawner's order."""
    return [items[k] for k in sorted(items)] if isinstance(items, dict) else list(items)


@functools.cache
def kube_capacity(mig_strategy: str, site: str = "") -> KubeCapacity:
    return KubeCapacity(mig_strategy)  # type: ignore[arg-type]


_watches: dict[int, asyncio.Task] = {}


def _ensure_watch(cache: KubeCapacity, api_client: Any) -> None:
    """Start the cache's list + watch once per hub process (like KubeSpawner's reflectors)."""
    task = _watches.get(id(cache))
    if task is None or task.done():
        _watches[id(cache)] = asyncio.ensure_future(cache.run(api_client))


def site_caches(mig_strategy: MigStrategy, sites: list[str] | None = None) -> dict[str, KubeCapacity]:
    """The capacity cache of each site, or of the one unnamed cluster ("") without a federation."""
    return {n: kube_capacity(mig_strategy, n) for n in sites} if sites else {"": kube_capacity(mig_strategy)}


def federation_availability(mig_strategy: MigStrategy, sites: list[str] | None = None):
    """profile -> Availability over the same capacity caches the spawners use (for metrics)."""
    return lambda profile: Federation(site_caches(mig_strategy, sites)).availability(profile)


def _ensure_site_watch(cache: KubeCapacity, kubeconfig: str) -> None:
    if id(cache) in _watches and not _watches[id(cache)].done():
        return
    try:
        client = site_api_client(kubeconfig)
    except Exception as e:  # a missing or broken kubeconfig: the site is unreachable, the hub goes on
        cache.unreachable = f"kubeconfig {kubeconfig}: {type(e).__name__}: {e}"[:200]
        cache.log.error("Site kubeconfig %s cannot be used: %s", kubeconfig, e)
        return
    _ensure_watch(cache, client)


class KubeProfileSpawner(ProfileSpawnerMixin, KubeSpawner):
    mig_strategy = Enum(["mixed", "single"], "mixed", config=True, help="The GPU operator's MIG strategy.")
    gpu_runtime_class = Unicode("", config=True, help="runtimeClassName for GPU pods (e.g. 'nvidia'), if any.")
    watch_capacity = Bool(
        True, config=True, help="Keep the capacity cache current by watching nodes and pods (off only in tests)."
    )
    projects_mount_root = Unicode(
        "/home/jovyan/projects", config=True, help="Where project volumes are mounted in servers (one per group)."
    )
    sites = Dict(
        {}, config=True,
        help="Federation: site name -> each cluster servers may run on (in order of preference when they have "
        "equal room): its kubeconfig path (`in-cluster`: the hub's own cluster), or a dict with `kubeconfig` and "
        "how the site is reached (`serversUrl`, `ingressClassName`, `hubUrl`; see mlaas.spawners.kube_sites). "
        "Empty: the one cluster of KubeSpawner's own configuration.",
    )

    @validate("sites")
    def _valid_sites(self, proposal: Any) -> dict[str, SiteConnection]:
        try:
            return site_connections(proposal["value"])
        except ValueError as e:
            raise TraitError(f"KubeProfileSpawner.sites: {e}") from None

    site: str = ""  # where this server runs ("" without a federation); kept in the server's state

    @property
    def federation(self) -> Federation:
        caches = site_caches(self.mig_strategy, list(self.sites))
        if self.watch_capacity:
            if not self.sites:
                _ensure_watch(caches[""], self._default_api.api_client)
            for name, connection in self.sites.items():
                _ensure_site_watch(caches[name], connection.kubeconfig)
        return Federation(caches)

    @property
    def capacity(self) -> Federation:
        return self.federation

    @property
    def _default_api(self) -> Any:
        default = self.__dict__.get("_mlaas_default_api")
        if default is None:
            default = self.__dict__["_mlaas_default_api"] = self.api
        return default

    def _use_site(self, site: str) -> None:
        """Talk to `site`'s API server from now on (pods, events, claims of this server). Another
        cluster than the hub's own has neither Zero to JupyterHub's user scheduler nor its priority
        classes: pods there go to that cluster's default scheduler, at default priority. Its pods
        reach the hub at the site's `hub_url` (default: the hub's public URL, else the hub's own
        connect URL, as on one machine), and, where the site has an ingress (`servers_url`), the
        hub reaches the server through it (site_ingress)."""
        self._default_api  # noqa: B018  (remember KubeSpawner's own client first)
        if site and site not in self.sites:
            self.log.error("%s runs at site %s, which is no longer in the hub's sites; it cannot be reached",
                           self.owner_key, site)
        self.site = site
        connection = self.sites.get(site) if site else None
        remote = connection is not None and connection.remote
        self.api = site_core_api(connection.kubeconfig) if connection else self._default_api
        own = self.__dict__.setdefault("_mlaas_own_cluster", {
            name: getattr(self, name) for name in ("scheduler_name", "priority_class_name", "hub_connect_url",
                                                   "services_enabled", "get_pod_url", "after_pod_created_hook")})
        for name, value in own.items():
            setattr(self, name, value)
        if not remote:
            return
        self.scheduler_name, self.priority_class_name = None, ""
        self.hub_connect_url = self._remote_hub_url(connection) or own["hub_connect_url"]
        if connection.servers_url:
            self.services_enabled = True
            self.get_pod_url = lambda spawner, pod: connection.servers_origin
            self.after_pod_created_hook = functools.partial(self._expose_at_site, connection, own["after_pod_created_hook"])

    def _remote_hub_url(self, connection: SiteConnection) -> str | None:
        if connection.hub_url:
            return str(connection.hub_url).rstrip("/")
        public = urlparse(self.public_hub_url or "")
        return f"{public.scheme}://{public.netloc}" if public.scheme and public.netloc else None

    def tracking_address(self) -> str:
        """At another site of a federation, the tracking service through the hub's public address
        (the in-cluster Service is the hub's cluster's)."""
        connection = self.sites.get(self.site) if getattr(self, "site", None) else None
        hub = self._remote_hub_url(connection) if connection is not None and connection.remote else None
        return tracking_url(hub) if hub and self.tracking_url else self.tracking_url

    async def _expose_at_site(self, connection: SiteConnection, then: Any, spawner: Any, pod: dict) -> None:
        """After KubeSpawner made the pod and its Service: the Ingress that leads the site's ingress
        controller to it."""
        manifest = server_ingress(
            self.pod_name, self.namespace, self.server.base_url, self.port, pod["metadata"]["uid"],
            self._build_common_labels(self._expand_all(self.extra_labels)),
            connection.servers_origin or "", connection.ingress_class_name)
        await create_ingress(site_api_client(connection.kubeconfig), manifest)
        self.emit(40, f"Reached through site {self.site}'s ingress at {connection.servers_origin}")
        if then is not None:
            result = then(spawner, pod)
            if asyncio.iscoroutine(result):
                await result

    @property
    def pod_key(self) -> str:
        return f"{self.namespace}/{self.pod_name}"

    def _get_reflector_key(self, kind: str):
        return (*super()._get_reflector_key(kind), self.site)

    async def _start_reflector(self, kind: str, reflector_class: type, replace: bool = False, **kwargs: Any):
        previous = self.__class__.reflectors.get(self._get_reflector_key(kind))
        task = getattr(previous, "watch_task", None)
        if task is not None and task.done():  # it gave up while the API server was away: a fresh one
            replace = True
        if self.site and self.site in self.sites:
            reflector_class = bound_reflector(reflector_class, self.sites[self.site].kubeconfig)
        return await super()._start_reflector(kind, reflector_class, replace=replace, **kwargs)

    def form_notices(self) -> list[str]:
        """Sites that cannot be reached or that refuse the hub (RBAC); the error (addresses of API
        servers, the permission to grant) only for admins."""
        admin = self.user.admin
        down = [f"Site {name} cannot be reached{f' ({why})' if admin else ''}; servers start at the other sites."
                for name, why in self.federation.unreachable().items()]
        refused = [f"Site {name} cannot be used now{f' ({why})' if admin else ''}; servers start at the other sites."
                   for name, why in self.federation.forbidden().items()]
        return down + refused

    async def load_user_options(self) -> None:
        """The profile was applied by `apply_profile` (server-side checks included); KubeSpawner's
        own profile_list handling stays off."""

    _configured: dict[str, Any] | None = None

    async def _capacity_known(self, timeout: float = 10.0) -> None:
        """The first spawns after the hub starts wait for the capacity watch's first list (a moment)
        instead of being refused as "not known yet"; an unreachable or refusing site does not wait."""
        if not self.watch_capacity:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline and any(
            not {"node", "pod"} <= cache.synced and not cache.unreachable and not cache.refused
            for cache in self.federation.sites.values()
        ):
            await asyncio.sleep(0.1)

    def _from_config(self) -> dict[str, Any]:
        """The pod settings as configured, before any profile: each spawn starts from these
        (the spawner object lives on between a user's spawns)."""
        if self._configured is None:
            names = ["image", "node_selector", "node_affinity_required", "tolerations", "environment", "extra_labels",
                     "extra_pod_config", "volumes", "volume_mounts", "notebook_dir"]
            self._configured = {n: copy.deepcopy(getattr(self, n)) for n in names}
        return copy.deepcopy(self._configured)

    async def apply_profile(self, options: dict[str, Any]) -> None:
        await self._capacity_known()
        await super().apply_profile(options)
        profile = self.profile
        assert profile is not None
        s = pod_settings(profile, self.mig_strategy, self.gpu_runtime_class)
        base = self._from_config()
        self.image = profile.image or base["image"]
        self.extra_resource_limits = s.extra_resource_limits
        self.extra_resource_guarantees = s.extra_resource_guarantees
        self.node_selector = {**base["node_selector"], **s.node_selector}
        self.node_affinity_required = [*base["node_affinity_required"], *s.node_affinity_required]
        self.tolerations = [*base["tolerations"], *s.tolerations]
        self.environment = {**base["environment"], **s.environment}
        self.extra_labels = {**base["extra_labels"], **s.labels}
        self.extra_pod_config = {**base["extra_pod_config"], **({"runtimeClassName": s.runtime_class} if s.runtime_class else {})}
        self.volumes, self.volume_mounts, self.notebook_dir = base["volumes"], base["volume_mounts"], base["notebook_dir"]
        self.container_security_context = {**RESTRICTED_CONTAINER, "runAsUser": self.uid or 1000}
        self.pod_security_context = {**RESTRICTED_POD, **({"fsGroup": self.fs_gid} if self.fs_gid else {})}
        volumes, mounts = project_storage(self.project_groups(), self.projects_mount_root)
        self.volumes = [*_as_list(self.volumes), *volumes]
        self.volume_mounts = [*_as_list(self.volume_mounts), *mounts]
        if self.project is not None:  # a project server works in its project's volume
            self.notebook_dir = f"{self.projects_mount_root.rstrip('/')}/{project_slug(self.project.group)}"
        federation = self.federation
        site = federation.place(profile) if federation.federated else ""
        if site is None:  # resolve_profile saw room a moment ago; a watch event took it since
            self.release_holding()
            raise web.HTTPError(409, f"Profile {profile.slug!r} cannot start now: {federation.availability(profile, exact=True).reason}.")
        self._use_site(site)
        self.hold(profile)  # again, now with its site (for the admins' usage view)
        federation.sites[site].reserve(self.pod_name, profile)  # until the pod shows up in the watch cache

    async def start(self):
        self.reset_progress()
        if self.profile is not None:
            self.emit(10, f"Profile {self.profile.display_name}: {self.profile.summary()}")
        if self.site:
            self.emit(12, f"Starting at site {self.site}")
        await self._drop_missing_project_volumes()
        url = await super().start()
        connection = self.sites.get(self.site) if self.site else None
        if connection is not None and connection.remote and connection.servers_url:
            await self._routed_at_site(url)
        return url

    async def _routed_at_site(self, url: str) -> None:
        """The server answers through the site's ingress. JupyterHub takes any HTTP answer for a
        server that is up, and the ingress controller answers 404 until it has seen the Ingress and
        the Service's endpoints: wait for the server's own answer (its API's version) instead."""
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        probe = f"{url.rstrip('/')}{self.server.base_url}api"
        self.emit(45, f"Waiting for site {self.site}'s ingress to route to the server")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        last = ""
        while loop.time() < deadline:
            try:
                r = await AsyncHTTPClient().fetch(probe, request_timeout=5, follow_redirects=False)
                if "version" in json.loads(r.body or b"{}"):
                    return
                last = "an answer that is not the server's"
            except HTTPClientError as e:
                last = f"HTTP {e.code}"
            except (OSError, ValueError) as e:
                last = type(e).__name__
            await asyncio.sleep(0.5)
        raise TimeoutError(f"site {self.site}'s ingress at {url} did not route to the server ({last})")

    async def _drop_missing_project_volumes(self) -> None:
        """A project volume whose claim does not exist would keep the pod unschedulable for ever.
        A member's server starts without it (and says so); a project server cannot start."""
        from kubernetes_asyncio.client.rest import ApiException

        missing = []
        for volume in [v for v in self.volumes if "persistentVolumeClaim" in v and v["name"].startswith("mlaas-project-")]:
            claim = volume["persistentVolumeClaim"]["claimName"]
            try:
                await self.api.read_namespaced_persistent_volume_claim(claim, self.namespace)
            except ApiException as e:
                if e.status != 404:
                    raise
                missing.append(claim)
        if not missing:
            return
        self.log.warning("Project volume claim(s) %s missing in namespace %s (the chart creates them)",
                         ", ".join(missing), self.namespace)
        if self.project is not None:
            raise web.HTTPError(
                503, f"The storage of project {self.project.title} ({missing[0]}) does not exist on the cluster; ask the admins."
            )
        self.volumes = [v for v in self.volumes if v["name"] not in missing]
        self.volume_mounts = [m for m in self.volume_mounts if m["name"] not in missing]
        self.emit(15, f"Project storage not available ({', '.join(missing)}); starting without it")

    def release_resources(self) -> None:
        super().release_resources()
        cache = self.federation.sites.get(self.site)
        if cache is not None:
            cache.release(self.pod_name)

    def stop_failed(self) -> None:
        """The pod could not be seen to go away (an API server slow or away): it keeps counting for
        quotas, under a key of its own, until the site's watch reports it gone."""
        cache = self.federation.sites.get(self.site)
        if cache is None:
            super().stop_failed()
            return
        pod = f"{self.namespace}/{self.pod_name}"
        lingering = f"{self.owner_key} (pod {pod} at {self.site or 'the cluster'} going away)"
        ledger = usage_ledger()
        ledger.rename(self.owner_key, lingering)
        cache.release(self.pod_name)
        self.log.warning("%s: pod %s is not gone yet; it counts for quotas until it is", self.owner_key, pod)
        cache.when_gone(pod, lambda: ledger.release(lingering))

    def get_state(self) -> dict:
        state = super().get_state()
        if self.site:
            state["site"] = self.site
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if state.get("site"):
            self._use_site(state["site"])
            if self.profile is not None:
                self.hold(self.profile)

    async def progress(self):
        """Our events first, then KubeSpawner's (pod scheduling, image pulls)."""
        async for event in _merge(ProfileSpawnerMixin.progress(self), KubeSpawner.progress(self)):
            yield event


async def _merge(*generators):
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen):
        async for item in gen:
            await queue.put(item)

    tasks = [asyncio.ensure_future(pump(g)) for g in generators]
    try:
        while True:
            yield await queue.get()
    finally:
        for t in tasks:
            t.cancel()
