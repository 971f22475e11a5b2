"""What every MLaaS spawner shares: the profile form, the server-side access and capacity checks,
and progress events. The local and the Kubernetes spawner add only how a server is started."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from tornado import web
from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable

from .. import quotas
from ..capacity import CapacitySource
from ..profiles import Profile, ProfileStore, allowed_profiles, may_use, preselected, refusal
from ..profiles.model import Project
from ..projects import is_project_user, project_user
from ..projects.identity import acting_groups
from .form import FormEntry, render_form
from .refusals import count_refusal

# Options a spawn request may carry; anything else is refused so typos and probes are visible.
KNOWN_OPTIONS = frozenset({"profile"})


@functools.cache
def profile_store(directory: str, snapshot: str) -> ProfileStore:
    return ProfileStore(directory, snapshot or None)


@functools.cache
def usage_ledger() -> quotas.UsageLedger:
    """Servers holding resources in this hub, for quotas (one per hub process)."""
    return quotas.UsageLedger()


def group_sizes(db: Any, groups: list[str]) -> dict[str, int]:
    """Members of each of these hub groups: counted by the database (one query), not loaded."""
    from jupyterhub import orm
    from sqlalchemy import func

    members = orm.user_group_map.c
    rows = (db.query(orm.Group.name, func.count(members.user_id))
            .join(orm.user_group_map, orm.Group.id == members.group_id)
            .filter(orm.Group.name.in_(groups)).group_by(orm.Group.name))
    return {name: count for name, count in rows}


def tracking_env(url: str, token: str, groups: list[str], sizes: dict[str, int]) -> dict[str, str]:
    """`import mlflow` works in every server with nothing to set: the platform's tracking service,
    the server's own hub token (the mlflow client sends it as a bearer token), and the workspace
    of the server's group: a project's; else the user's smallest group (their team rather than a
    group everyone is in), by name among equals. MLFLOW_WORKSPACE or mlflow.set_workspace()
    picks another of the user's groups. A run started with no experiment chosen goes to the
    workspace's own "Default" experiment (made on first use; MLflow's experiment 0 belongs to its
    default workspace, which no group uses)."""
    from ..tracking.sync import DEFAULT_EXPERIMENT, workspace_name

    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_TOKEN": token, "MLFLOW_EXPERIMENT_NAME": DEFAULT_EXPERIMENT}
    if groups:
        env["MLFLOW_WORKSPACE"] = workspace_name(min(groups, key=lambda g: (sizes.get(g, 0), g)))
    return env


class ProfileSpawnerMixin(LoggingConfigurable):
    """Mixed into a JupyterHub Spawner subclass (a configurable, so its traits take config)."""

    profiles_dir = Unicode("spawner_profiles", config=True, help="Directory of profile YAML files.")
    profiles_snapshot = Unicode(
        "", config=True, help="File keeping the last good profiles, so a broken edit survives hub restarts."
    )

    profile: Profile | None = None
    tracking_url = Unicode("", config=True, help="The tracking service's address for servers (mlaas.tracking); empty: none.")

    def tracking_address(self) -> str:
        """Where this server reaches the tracking service (a spawner whose servers may be elsewhere,
        e.g. at another site, says so)."""
        return self.tracking_url

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        if self.tracking_url:
            groups = self.user_groups()
            sizes = group_sizes(self.db, groups) if len(groups) > 1 else {}
            env.update(tracking_env(self.tracking_address(), self.api_token, groups, sizes))
        return env

    @default("options_form")
    def _options_form_default(self):
        async def form(spawner: "ProfileSpawnerMixin") -> str:
            await spawner.store.fresh()  # a changed file is parsed off the event loop
            return spawner.render_options_form()

        return form

    @default("apply_user_options")
    def _apply_user_options_default(self):
        async def apply(spawner: "ProfileSpawnerMixin", options: dict[str, Any]) -> None:
            try:
                await spawner.apply_profile(options)
            except web.HTTPError as e:
                count_refusal(e)  # mlaas_spawn_refusals_total{reason}
                spawner.forget_refused_options()
                raise
            spawner.__dict__["_mlaas_good_options"] = dict(options or {})

        return apply

    def forget_refused_options(self) -> None:
        """JupyterHub keeps a request's options as the defaults of the next request without any
        (an empty spawn body): a refused request's must not become them, or the next plain start
        asks for the refused profile again. The last accepted ones (or none: the default
        profile) stay the defaults."""
        orm = getattr(self, "orm_spawner", None)
        if orm is None:
            return
        orm.user_options = dict(self.__dict__.get("_mlaas_good_options", {}))
        from sqlalchemy.orm import object_session

        session = object_session(orm)
        if session is not None:
            session.commit()

    # --- shared services -------------------------------------------------------------------
    @property
    def store(self) -> ProfileStore:
        return profile_store(self.profiles_dir, self.profiles_snapshot)

    @property
    def capacity(self) -> CapacitySource:
        """Where availability comes from: the local allocator or the cluster's watch cache."""
        raise NotImplementedError

    @property
    def owner_key(self) -> str:
        return f"{self.user.name}/{self.name}"

    @property
    def project(self) -> Project | None:
        """The group project whose server this is, for a project's hub user; else None."""
        if not is_project_user(self.user.name):
            return None
        return next((p for p in self.store.current().projects if project_user(p.group) == self.user.name), None)

    def user_groups(self) -> list[str]:
        """Whose profile rules and quota apply: the user's groups, or the project's group."""
        return acting_groups(self.user.name, (g.name for g in self.user.groups), self.store.current().projects)

    def project_groups(self) -> list[str]:
        """The groups whose project storage this server sees."""
        pset = self.store.current()
        return [g for g in self.user_groups() if pset.project_of(g) is not None]

    def quota_refusal(self, profile: Profile) -> str | None:
        """Why a group quota does not allow this profile now, or None."""
        others = usage_ledger().holdings(excluding=self.owner_key)
        try:
            quotas.check(self.store.current(), self.user.name, self.user_groups(), profile, others)
        except quotas.QuotaExceeded as e:
            return str(e)
        return None

    def hold(self, profile: Profile) -> None:
        usage_ledger().hold(
            self.owner_key,
            quotas.Holding(self.user.name, self.name, frozenset(self.user_groups()), profile, getattr(self, "site", ""),
                           self.pod_key),
        )

    @property
    def pod_key(self) -> str:
        """"namespace/pod" where the server is a pod ("" for a local process)."""
        return ""

    def release_holding(self) -> None:
        usage_ledger().release(self.owner_key)

    # --- the form --------------------------------------------------------------------------
    def form_entries(self) -> list[FormEntry]:
        entries = []
        for profile in allowed_profiles(self.store.current(), self.user_groups()):
            availability = self.capacity.availability(profile)
            capacity = f"{availability.free} of {availability.total} free" if profile.needs_accelerator else None
            reason = availability.reason if availability.free == 0 else None
            if reason is None and (quota := self.quota_refusal(profile)):
                reason = f"your group's quota is used ({quota})"
            entries.append(FormEntry(profile, reason, capacity, availability.where))
        return entries

    def form_notices(self) -> list[str]:
        """Platform conditions every user of the form should know about (e.g. a site that is down)."""
        return []

    def render_options_form(self) -> str:
        entries = self.form_entries()
        available = [e.profile for e in entries if not e.unavailable]
        default = preselected(available)
        warning = None
        if self.user.admin and self.store.errors:
            warning = (
                f"Admin notice: the profile files have {len(self.store.errors)} error(s); the last good "
                f"profiles stay in force. First: {self.store.errors[0]}"
            )
        return render_form(entries, default.slug if default else None, warning, self.form_notices())

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        return {"profile": (formdata.get("profile") or [""])[0]}

    def options_from_query(self, query_data: dict[str, list[str]]) -> dict[str, Any]:
        """A link (`GET /hub/spawn/<user>?profile=…`) never starts a server: a page on any site
        could make a signed-in user's browser follow it (no XSRF check on GET) and spend the
        group's GPUs. JupyterHub then shows the form, where a POST with its XSRF token starts it."""
        raise web.HTTPError(
            400, "A link cannot start a server: choose a profile in this form and press Start."
        )

    # --- the server-side check: every request, from the form or the API --------------------
    def resolve_profile(self, options: dict[str, Any]) -> Profile:
        unknown = sorted(set(options) - KNOWN_OPTIONS)
        if any(k == "profile_options" or k.startswith("profile-option-") for k in unknown):
            names = ", ".join(p.slug for p in allowed_profiles(self.store.current(), self.user_groups())) or "none"
            raise web.HTTPError(400, (
                f"Profile options ({', '.join(map(repr, unknown))}) are not offered here: each profile is one fixed "
                f"choice of CPU, memory and accelerator. Send {{\"profile\": <slug>}} with one of: {names}."))
        if unknown:
            raise web.HTTPError(400, f"Unknown spawn option(s): {', '.join(map(repr, unknown))}; only 'profile' is accepted.")
        slug = options.get("profile") or ""
        if not isinstance(slug, str):
            raise web.HTTPError(400, f"'profile' must be a profile's slug, not {slug!r}.")
        if is_project_user(self.user.name) and self.project is None:
            raise web.HTTPError(403, f"{self.user.name} is no longer a project in the profile files; ask the admins.")
        groups = self.user_groups()
        pset = self.store.current()
        allowed = allowed_profiles(pset, groups)
        if not slug:
            usable = [p for p in allowed if self.capacity.availability(p).free > 0]
            choice = preselected(usable)
            if choice is None:
                raise web.HTTPError(403, "No resource profile is open to your groups; ask the platform admins.")
            return choice
        profile = pset.get(slug)
        if profile is None:
            names = ", ".join(p.slug for p in allowed) or "none"
            raise web.HTTPError(400, f"There is no profile {slug!r}. Profiles open to you: {names}.")
        if not may_use(profile, groups):
            self.log.warning("Refused profile %s for %s (groups: %s)", slug, self.user.name, groups)
            raise web.HTTPError(403, refusal(profile, groups))
        availability = self.capacity.availability(profile, exact=True)
        if availability.free == 0:
            raise web.HTTPError(409, f"Profile {slug!r} cannot start now: {availability.reason}.")
        return profile

    async def apply_profile(self, options: dict[str, Any]) -> None:
        await self.store.fresh()
        profile = self.resolve_profile(options)
        # The quota check and the holding happen without an await between them: no other spawn
        # on the hub's event loop can slip in.
        if quota := self.quota_refusal(profile):
            self.log.warning("Quota refused %s for %s: %s", profile.slug, self.owner_key, quota)
            raise web.HTTPError(403, f"Quota exceeded: {quota}")
        self.hold(profile)
        self.profile = profile
        self.cpu_limit = self.profile.cpu.limit
        self.cpu_guarantee = self.profile.cpu.guarantee or None
        self.mem_limit = self.profile.memory.limit
        self.mem_guarantee = self.profile.memory.guarantee or None
        self.log.info("%s starts profile %s (%s)", self.owner_key, self.profile.slug, self.profile.summary())

    # --- the end of a server: the same steps in every spawner -------------------------------------
    def release_resources(self) -> None:
        """What a stopped server gives back: its quota holding; spawners add their own."""
        self.release_holding()

    async def poll(self):
        status = await super().poll()
        if status is not None:  # it ended on its own
            self.release_resources()
        return status

    async def stop(self, now: bool = False):
        await self.stop_dask_clusters()
        try:
            await super().stop(now=now)
        except BaseException:
            self.stop_failed()
            raise
        self.release_resources()

    def stop_failed(self) -> None:
        """The server may still hold its resources; spawners that can tell when it is gone keep
        them counted until then (Kubernetes). By default they are given back."""
        self.release_resources()

    # --- Dask clusters live no longer than the server that made them ------------------------------
    async def stop_dask_clusters(self) -> None:
        """Stop this user's Dask Gateway clusters (with the server's own token, still valid here)
        once none of their servers runs: the gateway knows a cluster's user, not the server it was
        made from, so while another (named) server of theirs runs, the clusters stay."""
        address = (self.environment or {}).get("DASK_GATEWAY__ADDRESS")
        if not address or not self.api_token:
            return
        others = [name or "(default)" for name, sp in list(getattr(self.user, "spawners", {}).items())
                  if sp is not self and (sp.active or getattr(sp, "pending", None))]
        if others:
            self.log.info("Dask clusters of %s stay: their server(s) %s still run", self.user.name, ", ".join(others))
            return
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        client = AsyncHTTPClient()
        headers = {"Authorization": f"jupyterhub {self.api_token}"}  # the gateway's auth scheme
        try:
            response = await client.fetch(f"{address}/api/v1/clusters/", headers=headers, request_timeout=10)
            for name in json.loads(response.body):
                await client.fetch(f"{address}/api/v1/clusters/{name}", method="DELETE", headers=headers,
                                   request_timeout=10)
                self.log.info("Stopped Dask cluster %s of %s with its server", name, self.owner_key)
        except (HTTPClientError, OSError, ValueError) as e:
            if _managed_gateway_exited():
                # at the hub's shutdown JupyterHub stops its services before the servers; the
                # gateway stopped every cluster itself (stop_clusters_on_shutdown)
                self.log.info("The clusters of %s stopped with the Dask Gateway", self.owner_key)
                return
            self.log.warning("Could not stop the Dask clusters of %s: %s", self.owner_key, e)

    # --- state kept across hub restarts -----------------------------------------------------------
    def get_state(self) -> dict:
        state = super().get_state()
        if self.profile is not None:
            state["profile"] = self.profile.model_dump(mode="json")
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.profile = None

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if "profile" in state:
            self.profile = Profile.model_validate(state["profile"])
            self.hold(self.profile)

    # --- progress ----------------------------------------------------------------------------
    def emit(self, progress: int, message: str) -> None:
        events = self.__dict__.setdefault("_mlaas_events", [])
        events.append({"progress": progress, "message": message})
        signal = self.__dict__.get("_mlaas_signal")
        if signal is not None:
            signal.set()

    def reset_progress(self) -> None:
        self.__dict__["_mlaas_events"] = []

    async def progress(self):
        sent = 0
        signal = self.__dict__.setdefault("_mlaas_signal", asyncio.Event())
        while True:
            events = self.__dict__.get("_mlaas_events", [])
            while sent < len(events):
                yield events[sent]
                sent += 1
            signal.clear()
            try:
                await asyncio.wait_for(signal.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass


def _managed_gateway_exited() -> bool:
    """Whether the hub runs the Dask Gateway as a managed service (one machine) whose process has
    ended (JupyterHub's service map: no public API tells it)."""
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return False
    service = getattr(JupyterHub.instance(), "_service_map", {}).get("dask-gateway")
    proc = getattr(service, "proc", None)
    return bool(service is not None and service.managed and proc is not None and proc.poll() is not None)
