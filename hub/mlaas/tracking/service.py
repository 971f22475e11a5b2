"""The tracking service (`python -m mlaas.tracking`): /services/mlflow/ with the hub's identities.

It runs the MLflow server as its child and forwards each request to it as the MLflow user of
the asking hub user, once `sync` has made that user's MLflow roles match their hub groups.
Nobody else ever reaches MLflow with a name: the users' MLflow passwords live in this service's
private state, and MLflow itself refuses a request without one (basic-auth app).

Who is asking: the hub's OAuth cookie (a browser) or a hub token in the Authorization header
(`token …` or `Bearer …`: the `mlflow` client sends `MLFLOW_TRACKING_TOKEN` so), checked by
JupyterHub's own HubOAuth. A cookie-authenticated request that changes something must come from
the same site (the browser's Sec-Fetch-Site, or an Origin of this host): another site's page
cannot act for a signed-in user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated, UserNotAllowed
from jupyterhub.utils import url_path_join
from tornado import httpclient, ioloop, web

from ..profiles import ProfileStore
from ..profiles import configmap as configmaps
from ..postgres import DatabaseError, database_name, ensure_database, write_pgpass
from ..profiles.quantities import format_bytes
from ..projects.identity import acting_groups
from ..settings import load_settings
from . import server
from .mlflow_api import MLflowAdmin, MLflowError, basic_auth
from ..projects.names import unix_group
from ..projects.storage import ensure_storage, project_dir
from .storage import ArtifactUsage, ProjectArtifacts, artifacts_root, workspace_sizes
from .sync import GroupSync, Identity, workspace_name
from .usage import USAGE_PATH, is_the_hub

log = logging.getLogger("mlaas.tracking")
MAX_BODY = 4 * 2**30  # an artifact upload (a model) may be large; MLflow stores it as it arrives
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length", "host", "authorization", "cookie"}
IDENTITY_MAX_AGE = 10  # seconds: a change of the hub's groups reaches MLflow within this
STARTUP_WAIT = 120  # seconds a request waits for a starting MLflow server
MLFLOW_ACCOUNT_COMMENT = "MLaaS Hub experiment tracking"
PROFILES_CONFIGMAP_VAR = "MLAAS_PROFILES_CONFIGMAP"  # set by the chart: profiles (quotas, projects) from the API


ARTIFACT_UPLOAD = re.compile(r"/api/2\.0/mlflow-artifacts/artifacts/workspaces/([^/]+)/")


class Tracking:
    """What every request needs: MLflow's address, the sync, the passwords, the groups of projects,
    the artifacts' sizes."""

    def __init__(self, base_url: str, keys: server.Secrets, sync: GroupSync, store: ProfileStore,
                 usage: ArtifactUsage, placement: ProjectArtifacts):
        self.base_url, self.keys, self.sync, self.store = base_url, keys, sync, store
        self.usage, self.placement = usage, placement
        self.locks: dict[str, asyncio.Lock] = {}
        self.up = asyncio.Event()  # MLflow answers (requests wait for it while it starts)

    async def identity(self, user: dict[str, Any]) -> Identity:
        name = str(user["name"])
        groups = acting_groups(name, user.get("groups") or [], (await self.store.fresh()).projects)
        return Identity(name, bool(user.get("admin")), tuple(groups))

    async def artifact_refusal(self, method: str, path: str, size: int) -> str | None:
        """Why an artifact upload would take its group past `tracking_artifacts`, or None."""
        found = ARTIFACT_UPLOAD.search(path) if method == "PUT" else None
        if found is None:
            return None
        workspace = found.group(1)
        quota = next((q for q in (await self.store.fresh()).quotas
                      if q.tracking_artifacts is not None and workspace_name(q.group) == workspace), None)
        if quota is None:
            return None
        used = await asyncio.to_thread(self.usage.size, workspace)
        if used + size > quota.tracking_artifacts:
            return (f"The artifacts of the group {quota.group} would exceed its limit of "
                    f"{format_bytes(quota.tracking_artifacts)} (in use: {format_bytes(used)}, this upload: "
                    f"{format_bytes(size)}). Ask the admins for more room, or to clear the runs your group "
                    "deleted (MLflow keeps a deleted run's files until its cleanup).")
        self.usage.add(workspace, size)
        return None

    async def ready(self, who: Identity) -> str:
        """The user's MLflow password, after their roles were made to match the hub's groups."""
        lock = self.locks.setdefault(who.name, asyncio.Lock())
        async with lock:
            password, new = self.keys.password(who.name)
            await self.sync.sync(who, password, new)
        return password

    async def place_projects(self, accounts: bool) -> bool:
        """The projects' artifacts not yet placed, to their storage; True where MLflow must start
        again to have a new one's mount."""
        todo = [p.group for p in (await self.store.fresh()).projects if not self.placement.placed(workspace_name(p.group))]
        restart = False
        for group in todo:
            restart |= await asyncio.to_thread(place_project, self.placement, group, accounts)
        return restart

    async def follow_projects(self, accounts: bool, restart: Callable[[], Awaitable[None]]) -> None:
        """Projects' artifacts to their storage as projects appear in the profile files (MLflow
        starts again, a few seconds, to have a new one's mount)."""
        while True:
            await asyncio.sleep(10)
            if await self.place_projects(accounts):
                await restart()


def place_project(placement: ProjectArtifacts, group: str, accounts: bool) -> bool:
    """A project group's artifacts to its project's storage (made as the hub makes it, where it is
    not yet); True where MLflow must start again to have it."""
    try:
        if placement.account:
            ensure_storage(placement.projects, group, accounts)
        group_name = unix_group(group) if placement.account and accounts else None
        if group_name:
            placement.join(group_name)
        return placement.place(workspace_name(group), project_dir(placement.projects, group), group_name)
    except (OSError, KeyError, subprocess.CalledProcessError) as e:
        log.error("The artifacts of %s cannot go to its project's storage (%s); they stay on the tracking service's "
                  "storage", group, e)
        placement.give_up(workspace_name(group))
        return False


class ProxyHandler(HubOAuthenticated, web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, tracking: Tracking) -> None:
        self.tracking = tracking
        self._status_set = False

    def check_xsrf_cookie(self) -> None:
        """Cookie-authenticated requests that change something: same site only (Fetch Metadata,
        else Origin); token-authenticated ones carry their proof in the header."""
        headers = self.request.headers
        if self.request.method in ("GET", "HEAD", "OPTIONS"):
            return
        site = headers.get("Sec-Fetch-Site")
        if site in ("same-origin", "none"):
            return
        origin = headers.get("Origin")
        if site is None and origin and urlparse(origin).netloc == self.request.host:
            return
        raise web.HTTPError(403, "A request from another site cannot use your sign-in here.")

    def wants_json(self) -> bool:
        path = self.request.path
        return "/api/" in path or "/ajax-api/" in path or "Authorization" in self.request.headers

    def refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        code = {403: "PERMISSION_DENIED", 401: "UNAUTHENTICATED", 413: "RESOURCE_LIMIT_EXCEEDED"}.get(status, "TEMPORARILY_UNAVAILABLE")
        self.finish({"error_code": code, "message": message})

    async def prepare(self) -> None:
        # ask the hub without blocking this service's loop (JupyterHub's get_current_user would
        # wait for the hub synchronously on each cache miss)
        model = await self.hub_auth.get_user(self, sync=False)
        try:
            self._hub_auth_user_cache = self.check_hub_user(model) if model else None
        except UserNotAllowed:
            self._hub_auth_user_cache = None
        user = self.current_user
        if user is None:
            if self.wants_json():
                self.refuse(401, "Sign in to the hub, or send a hub token (MLFLOW_TRACKING_TOKEN) with the request.")
                return
            self.redirect(self.get_login_url())  # the hub's sign-in; its state brings the browser back here
            return
        if user.get("name") == server.ADMIN_USER:  # MLflow's own admin: never a hub user's name there
            self.refuse(403, f"The hub user name {server.ADMIN_USER!r} is reserved by the tracking service.")

    async def _forward(self, *_: str) -> None:
        if self._finished:
            return
        who = await self.tracking.identity(self.current_user)
        try:
            await asyncio.wait_for(self.tracking.up.wait(), STARTUP_WAIT)
        except asyncio.TimeoutError:
            self.refuse(503, f"The tracking server has not answered for {STARTUP_WAIT} s; the admins can see why "
                             "in the hub's log.")
            return
        refusal = await self.tracking.artifact_refusal(self.request.method, self.request.path, len(self.request.body or b""))
        if refusal is not None:
            self.refuse(413, refusal)
            return
        try:
            password = await self.tracking.ready(who)
        except MLflowError as e:
            log.error("Could not make MLflow's roles of %s match the hub's groups: %s", who.name, e)
            self.refuse(503, "The tracking server is not ready; try again in a minute.")
            return
        headers = {k: v for k, v in self.request.headers.get_all() if k.lower() not in HOP_BY_HOP
                   and not k.lower().startswith("x-forwarded")}
        headers["Authorization"] = basic_auth(who.name, password)
        url = self.tracking.base_url.rstrip("/") + self.request.uri[len(server.PREFIX):] \
            if self.request.uri.startswith(server.PREFIX) else self.tracking.base_url + self.request.uri
        body = self.request.body if self.request.method in ("POST", "PUT", "PATCH", "DELETE") else None
        request = httpclient.HTTPRequest(
            url, method=self.request.method, headers=headers, body=body, allow_nonstandard_methods=True,
            follow_redirects=False, request_timeout=3600, decompress_response=False,
            header_callback=self._on_header, streaming_callback=self._on_chunk)
        try:
            response = await httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
        except Exception as e:  # the connection itself failed
            self.refuse(502, f"The MLflow server did not answer: {e}")
            return
        if response.code == 599 and not self._status_set:
            self.refuse(502, f"The MLflow server did not answer: {response.error}")
            return
        if response.code == 403 and not self._wrote:
            self.finish({"error_code": "PERMISSION_DENIED", "message": self._denied(who)})
            return
        self.finish()

    def _denied(self, who: Identity) -> str:
        asked = self.request.headers.get("X-MLFLOW-WORKSPACE")
        mine = ", ".join(f"{ws} (group {g})" for ws, g in sorted(who.workspaces.items())) or "none"
        where = f" in the workspace {asked!r}" if asked else ""
        return (f"Permission denied{where}: {who.name} may see and change the runs of the workspaces of "
                f"their hub groups: {mine}. Experiments of other groups are theirs alone.")

    _wrote = False

    def _on_header(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if line.startswith("HTTP/"):
            parts = line.split(" ", 2)
            self._upstream_status = int(parts[1])
            self._headers_to_copy: list[tuple[str, str]] = []
            return
        if not line:  # the end of the headers
            if self._upstream_status == 403:  # answered by us, naming the groups
                self.set_status(403)
                self.set_header("Content-Type", "application/json")
                self._status_set = True
                return
            self.set_status(self._upstream_status)
            for name, value in self._headers_to_copy:  # (replacing tornado's defaults, e.g. its Content-Type)
                if name.lower() == "set-cookie":
                    self.add_header(name, value)
                else:
                    self.set_header(name, value)
            self._status_set = True
            return
        name, _, value = line.partition(":")
        if name.lower() not in HOP_BY_HOP and name.lower() != "server":
            self._headers_to_copy.append((name.strip(), value.strip()))

    def _on_chunk(self, chunk: bytes) -> None:
        if getattr(self, "_upstream_status", 0) == 403:
            return
        self._wrote = True
        self.write(chunk)
        self.flush()

    get = post = put = patch = delete = head = options = _forward


class HealthHandler(web.RequestHandler):
    """`health`: 200 once MLflow answers, 503 while it starts (no sign-in: it says nothing else)."""

    def initialize(self, tracking: Tracking) -> None:
        self.tracking = tracking

    def get(self) -> None:
        self.set_status(200 if self.tracking.up.is_set() else 503)
        self.finish({"mlflow": "up" if self.tracking.up.is_set() else "starting"})


class UsageHandler(web.RequestHandler):
    """`mlaas/usage`: each workspace's artifact bytes, for the hub's usage view. Only the hub asks,
    with this service's own token; nobody else learns the groups' sizes here."""

    def initialize(self, tracking: Tracking) -> None:
        self.tracking = tracking

    async def get(self) -> None:
        if not is_the_hub(self.request.headers.get("Authorization", ""), HubOAuth.instance().api_token):
            raise web.HTTPError(403, "Only the hub reads the groups' artifact sizes here.")
        sizes = await asyncio.to_thread(workspace_sizes, self.tracking.usage.root, self.tracking.usage.locate)
        self.finish({"workspaces": sizes})


def make_app(tracking: Tracking, prefix: str) -> web.Application:
    app = web.Application(
        [
            (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            (url_path_join(prefix, "health"), HealthHandler, {"tracking": tracking}),
            (url_path_join(prefix, USAGE_PATH), UsageHandler, {"tracking": tracking}),
            (prefix.rstrip("/") + r"(/.*)?", ProxyHandler, {"tracking": tracking}),
        ],
        cookie_secret=os.urandom(32),
    )
    return app


def start_mlflow(program: Path, data: Path, port: int, keys: server.Secrets, account: str,
                 db: server.Databases, binds: list[tuple[Path, Path]] = ()) -> subprocess.Popen:
    """MLflow under its own system account where the hub is root (its data directory is that
    account's alone; this service keeps the secrets in the directory above, root's), in a mount
    namespace of its own with `binds` (projects' artifacts, ProjectArtifacts) where there are any."""
    data.mkdir(exist_ok=True)
    (data / "artifacts").mkdir(exist_ok=True)
    (data / "auth.ini").write_text(server.auth_config(db))
    if db.password_file:  # MLflow's own copy of libpq's password file, in its directory
        write_pgpass(db.tracking, db.password_file, data)
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        from ..accounts import ensure_system_account

        who = ensure_system_account(account, data, MLFLOW_ACCOUNT_COMMENT)
        for path in [data, *data.rglob("*")]:
            os.lchown(path, who.uid, who.gid)
        # its own group, and the Unix groups of the projects whose artifacts it keeps (ProjectArtifacts)
        user = {"user": who.uid, "group": who.gid, "extra_groups": os.getgrouplist(account, who.gid)}
    os.chmod(data, 0o700)
    log_file = open(data / "mlflow.log", "ab")
    argv = server.command(program, data, port, db)
    if binds and user:  # root: mount, then become MLflow's account (its parent-death signal kept)
        groups = ",".join(str(g) for g in user["extra_groups"])
        mounts = " && ".join(f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(dst))}" for src, dst in binds)
        become = ["setpriv", f"--reuid={user['user']}", f"--regid={user['group']}", f"--groups={groups}",
                  "--pdeathsig=keep", "--", *argv]
        argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                f"{mounts} && exec {shlex.join(become)}"]
        user = {}
    return subprocess.Popen(argv, env=server.environment(program, data, keys, db),
                            cwd=data, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_end_with_the_service, **user)


def _end_with_the_service() -> None:
    """In the child before exec: it gets SIGTERM when this service ends, however it ends."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MLflowChild:
    """The MLflow server, kept running: started again (after 5 s, then up to a minute) when it
    ends or could not start (e.g. its PostgreSQL database is missing and may not be made). The
    service itself never ends with it (the hub would take a managed service's end at start-up for
    its own failure); meanwhile requests get 503 with the reason."""

    def __init__(self, program: Path, data: Path, port: int, keys: server.Secrets, account: str,
                 db: server.Databases, up: asyncio.Event, binds: Callable[[], list[tuple[Path, Path]]]):
        self.args = (program, data, port, keys, account, db)
        self.db = db
        self.up = up
        self.binds = binds  # (source, target) bind mounts in MLflow's mount namespace, at each start
        self.proc: subprocess.Popen | None = None
        self.delay = 5.0
        self.restarting = False
        self.said_refused = False  # (MLflow refusing the service's admin is said once)

    def start(self) -> None:
        self.started = time.monotonic()
        self.proc = None
        if self.db.postgresql:
            try:
                for url in (self.db.tracking, self.db.auth):
                    if ensure_database(url, self.db.password_file):
                        log.info("Made MLflow's database %s", database_name(url))
            except DatabaseError as e:
                log.error("The MLflow server cannot start: %s", e)
                return
        self.proc = start_mlflow(*self.args, binds=self.binds())

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def supervise(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self.restarting or self.running():
                continue
            self.up.clear()
            if self.proc is not None:
                log.error("The MLflow server ended with status %s (its log: %s)", self.proc.returncode,
                          self.args[1] / "mlflow.log")
            log.error("Starting the MLflow server again in %.0f s", self.delay)
            await asyncio.sleep(self.delay)
            if self.restarting or self.running():  # (started meanwhile by restart)
                continue
            self.delay = 5.0 if time.monotonic() - self.started > 300 else min(self.delay * 2, 60.0)
            self.start()

    async def watch_ready(self, admin: MLflowAdmin) -> None:
        """Set `up` whenever a started server answers."""
        while True:
            if self.up.is_set():
                await asyncio.sleep(1)
                continue
            try:
                await admin.workspaces()
            except MLflowError as e:
                if e.status == 401 and not self.said_refused:  # answers, but not to us
                    log.error("MLflow refuses the service's admin (%s): its auth database was made with another "
                              "state's secrets.json (restore them together, or give the service new databases)", e.code)
                    self.said_refused = True
                await asyncio.sleep(0.25)
                continue
            self.said_refused = False
            log.info("MLflow (%s) answers, %.1f s after its start", self.args[0], time.monotonic() - self.started)
            self.up.set()

    async def restart(self) -> None:
        """Stop and start MLflow now (not after the crash delay); requests wait for it meanwhile."""
        self.restarting = True
        try:
            self.up.clear()
            await asyncio.to_thread(self.stop)
            self.start()
            self.delay = 5.0
        finally:
            self.restarting = False

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    from ..logscrub import install

    install()
    logging.basicConfig(level=logging.INFO, format="[%(levelname).1s %(asctime)s mlaas-tracking] %(message)s")
    settings = load_settings()
    program = server.mlflow_program(settings)
    if program is None:
        log.error("No MLflow server is installed (`make install` installs it beside the hub's environment; "
                  "or set tracking.mlflow_command)")
        sys.exit(2)
    state = server.state_dir(settings)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o711)  # MLflow's account passes through to its own directory, and sees nothing else
    keys = server.Secrets(state / "secrets.json")
    port = settings.tracking.mlflow_port
    base_url = f"http://127.0.0.1:{port}{server.PREFIX}"
    HubOAuth.instance(cache_max_age=IDENTITY_MAX_AGE)  # the hub's answer (groups, admin) is at most this old
    admin = MLflowAdmin(base_url, server.ADMIN_USER, keys.data["admin_password"])
    profiles_dir = settings.profiles_dir
    configmap = os.environ.get(PROFILES_CONFIGMAP_VAR)
    if configmap:  # the chart's component: the deployed files and the admins' live edits, through the API
        profiles_dir = state / "profiles"
        configmaps.seed(profiles_dir, settings.profiles_dir)
    artifacts = artifacts_root(state / "mlflow")
    placement = ProjectArtifacts(artifacts, settings.projects_dir, settings.tracking.account if os.geteuid() == 0 else None)
    tracking = Tracking(base_url, keys, GroupSync(admin), ProfileStore(profiles_dir),
                        ArtifactUsage(artifacts, placement.location), placement)
    child = MLflowChild(program, state / "mlflow", port, keys, settings.tracking.account, server.databases(settings),
                        tracking.up, placement.binds)
    if placement.account:  # MLflow's account first: it owns the projects' artifact directories
        from ..accounts import ensure_system_account

        (state / "mlflow").mkdir(exist_ok=True)
        ensure_system_account(placement.account, state / "mlflow", MLFLOW_ACCOUNT_COMMENT)
    accounts = os.geteuid() == 0 and settings.isolation != "single-account"  # (as the hub decides it)

    async def run_mlflow() -> None:
        """MLflow starts once the known projects' artifacts are placed (mounted from its first
        start), then is kept running, and follows new projects."""
        await tracking.place_projects(accounts)
        child.start()
        loop.add_callback(child.supervise)
        loop.add_callback(child.watch_ready, admin)
        loop.add_callback(tracking.follow_projects, accounts, child.restart)

    def stop(*_: Any) -> None:
        child.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", server.PREFIX + "/")
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", f"http://127.0.0.1:{settings.tracking.port}"))
    app = make_app(tracking, prefix)
    app.listen(url.port or 80, url.hostname or "127.0.0.1", max_body_size=MAX_BODY)
    log.info("Tracking at %s: MLflow on 127.0.0.1:%d, state in %s; a hub group's runs are in its workspace "
             "(e.g. atlas-ml -> %s)", prefix, port, state, workspace_name("atlas-ml"))
    loop = ioloop.IOLoop.current()
    loop.add_callback(run_mlflow)
    if configmap:
        loop.add_callback(configmaps.follow, configmap, profiles_dir, log)
    try:
        loop.start()
    finally:
        child.stop()
