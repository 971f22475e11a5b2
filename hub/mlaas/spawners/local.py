"""LocalProfileSpawner: profiles on one machine, as local processes.

On top of JupyterHub's LocalProcessSpawner it adds: a per-user system account and private home
(when the hub is root), the profile's CPU/memory limits (see `mlaas.limits`), GPUs and MIG
instances by UUID in CUDA_VISIBLE_DEVICES, progress events, and readiness reported the moment
the server listens (the hub's own polling backs off up to seconds).

Servers listen on a Unix socket, never on a TCP port: any account can bind a free loopback port,
so a server that stopped or died would leave its address to whoever binds it first, and the
proxy would hand that process the owner's requests, cookies and tokens. The socket lives in a
directory that only the server's own account (and root: the hub and its proxy) may enter, and
is created mode 0600, so no other account can take its place or connect to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jupyterhub.spawner import LocalProcessSpawner
from jupyterhub.utils import url_path_join
from tornado import web
from traitlets import Any as AnyTrait, Bool, Float, Integer, Unicode, default

from ..accounts import Account, AccountRegistry, ensure_account, own_account, registry_at, untraversable_ancestor
from ..capacity import DeviceAllocator, NoCapacity, inventory_source
from ..diskquota import QuotaSupport, apply as apply_quota, support
from ..gpu_fence import GpuFence
from ..limits import LimitBackend, Placement, detect_backend
from ..profiles.quantities import format_bytes
from ..server_entry import ServerEntry
from ..settings import instance_id
from ..projects.names import project_slug
from ..projects.storage import LINKS_DIR, ensure_storage, link_projects, set_project_groups
from ..zygote.client import ServerEntryFailed, Zygote, ZygoteUnavailable
from .common import ProfileSpawnerMixin
from .refusals import count_refusal

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVER_ENV_KEEP = ("LANG", "LC_ALL")  # the hub's variables every server keeps (Spawner.env_keep)
SOCKET_MODE_PORT = 8888  # jupyter_server's default port, which it requires alongside --sock
USER_JUPYTER_CONFIG = Path(__file__).resolve().parents[2] / "user_env" / "jupyter"


@functools.cache
def device_allocator(spec: str) -> DeviceAllocator:
    """One allocator per inventory in the hub process: a device is never given twice."""
    return DeviceAllocator(inventory_source(spec))


def running_server_pids(users: Any = None) -> dict[int, str]:
    """Each running local server's process ID -> "user/server" (mlaas.capacity.process_owner);
    `users`: JupyterHub's user dict (default: the running hub's)."""
    if users is None:
        from jupyterhub.app import JupyterHub

        if not JupyterHub.initialized():
            return {}
        users = JupyterHub.instance().users
    out: dict[int, str] = {}
    for user in list(users.values()):
        for name, spawner in list(user.spawners.items()):
            pid = getattr(spawner, "pid", 0)
            if pid:
                out[int(pid)] = f"{user.name}/{name}"
    return out


def socket_root(instance: str) -> Path:
    """Where this platform's servers' sockets live: `/run/mlaas-<id>` (root, mode 0711), else a
    private directory under /tmp. Short and lower-case: socket paths are limited to 107 bytes."""
    digest = instance_id(instance)
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        root, mode = Path(f"/run/mlaas-{digest}"), 0o711
    else:
        root, mode = Path(f"/tmp/mlaas-{os.getuid()}-{digest}"), 0o700
    root.mkdir(exist_ok=True)
    if root.is_symlink() or root.stat().st_uid != os.geteuid():
        raise RuntimeError(f"{root} is not the platform's own directory")
    os.chmod(root, mode)
    return root


def socket_url(path: Path) -> str:
    return "http+unix://" + quote(str(path), safe="")


@functools.cache
def limit_backend(instance: str, pids: int) -> LimitBackend:
    """One per platform instance (named after its homes directory)."""
    log = logging.getLogger("JupyterHub.mlaas.limits")
    backend = detect_backend(log, group=f"mlaas-{instance_id(instance)}", pids=pids)
    log.info("Resource limits for local servers: %s", backend.describe())
    return backend


@functools.cache
def gpu_fence(device_root: str) -> GpuFence:
    """One per device directory, decided once and named in the log."""
    fence = GpuFence(Path(device_root))
    logging.getLogger("JupyterHub.mlaas.limits").info("GPUs of local servers: %s", fence.describe())
    return fence


@functools.cache
def disk_quota_support(homes: str, hub_dir: str, limit: int) -> QuotaSupport:
    quota = support(Path(homes))
    logging.getLogger("JupyterHub.mlaas.limits").info(
        "Disk quotas for homes: %s", quota.describe(limit, Path(hub_dir))
    )
    return quota


@functools.cache
def zygote_for(instance: str, hub_dir: str) -> Zygote:
    """The pre-started server process of a platform (mlaas.zygote); `start()` it from the hub's
    main thread."""
    home = Path(hub_dir) / "zygote-home"
    return Zygote(socket_root(instance) / "zygote", home, USER_JUPYTER_CONFIG, server_path(home), SERVER_ENV_KEEP)


def server_path(home: Path) -> str:
    """A server's PATH: the platform's programs, the user's own (~/.local/bin), the system's."""
    return f"{Path(sys.prefix) / 'bin'}:{home / '.local' / 'bin'}:{SYSTEM_PATH}"


class StartQueue:
    """At most `limit` servers starting at once; knows how many wait (the hub runs one loop)."""

    def __init__(self, limit: int):
        self.slots = asyncio.Semaphore(limit)
        self.waiting = 0


@functools.cache
def start_queue(limit: int) -> StartQueue:
    return StartQueue(limit)


class LocalProfileSpawner(ProfileSpawnerMixin, LocalProcessSpawner):
    homes_dir = Unicode("state/homes", config=True, help="Where per-user home directories live.")
    projects_dir = Unicode("state/projects", config=True, help="Where group project storage lives.")
    gpu_inventory = Unicode("nvml", config=True, help="'nvml' or the path of a simulated inventory YAML.")
    accounts_db = Unicode(
        "state/hub/accounts.sqlite", config=True,
        help="The registry of hub users' system accounts (mlaas.accounts.AccountRegistry).",
    )
    isolation = Unicode(
        "auto",
        config=True,
        help="'accounts' (a system account per user; needs root), 'single-account' (development), or 'auto'.",
    )
    listen_poll_interval = Float(0.01, config=True, help="Seconds between checks that the new server answers.")
    max_processes = Integer(1024, config=True, help="Processes and threads a server may have (pids cgroup or RLIMIT_NPROC).")
    disk_quota = Integer(20 * 2**30, config=True, help="Bytes per account on the homes' filesystem, where quotas exist.")
    max_concurrent_starts = Integer(
        0,
        config=True,
        help="""Servers that may be starting at the same time (0: one per CPU core, at least 2).

        A server's start is CPU-bound for a few seconds. When many users arrive at once, starting
        them all together makes everyone wait for the last; a short queue lets each start at full
        speed. Queued users see their place in the progress messages.""",
    )

    preforked = Bool(
        True,
        config=True,
        help="""Fork servers from a pre-started server process (mlaas.zygote) instead of starting
        each by exec: ready in a fraction of the time, with the same account, limits, fence and
        environment. Servers it cannot serve (another command, interpreter variables) start by exec.""",
    )
    proc = AnyTrait(None, allow_none=True, help="The server's process: a Popen, or a zygote.client.ForkedServer.")

    account: Account | None = None
    placement: Placement | None = None
    socket_path: str = ""
    fence_hidden: list[bytes] = []  # the device nodes this server's mount namespace hides

    @default("cmd")
    def _cmd_default(self):
        return [str(Path(sys.prefix) / "bin" / "jupyterhub-singleuser")]

    @property
    def zygote(self) -> Zygote:
        return zygote_for(str(Path(self.homes_dir).resolve()), str(Path(self.accounts_db).resolve().parent))

    @property
    def capacity(self) -> DeviceAllocator:
        return device_allocator(self.gpu_inventory)

    @property
    def fence(self) -> GpuFence:
        return gpu_fence(self.capacity.inventory().device_root)

    @property
    def limits(self) -> LimitBackend:
        return limit_backend(str(Path(self.homes_dir).resolve()), self.max_processes)

    @property
    def disk_quota_support(self) -> QuotaSupport:
        homes = Path(self.homes_dir).resolve()
        return disk_quota_support(str(homes), str(Path(self.accounts_db).resolve().parent), self.disk_quota)

    @property
    def uses_accounts(self) -> bool:
        if self.isolation == "auto":
            return os.geteuid() == 0
        return self.isolation == "accounts"

    @property
    def registry(self) -> AccountRegistry:
        return registry_at(self.accounts_db)

    @property
    def account_name(self) -> str:
        """The hub user's system account (also the name of its home), from the registry."""
        return self.registry.account_for(self.user.name)

    @property
    def placement_key(self) -> str:
        """The server's cgroup: the account's name, and for a named server a '.'-suffix ('.' is
        never part of an account name, so two users' keys can never meet)."""
        if not self.name:
            return self.account_name
        slug = re.sub(r"[^a-z0-9_-]", "-", self.name.lower())[:20]
        return f"{self.account_name}.{slug}-{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"

    # --- where the server listens: a socket only its account can create ----------------------
    def _prepare_socket(self) -> Path:
        account = self.account
        assert account is not None
        directory = socket_root(str(Path(self.homes_dir).resolve())) / str(account.uid)
        directory.mkdir(exist_ok=True)
        if directory.is_symlink():
            raise web.HTTPError(500, f"Server setup error: {directory} is a link; ask the admins.")
        os.chown(directory, account.uid, account.gid)
        os.chmod(directory, 0o700)
        name = "server" if not self.name else f"server-{hashlib.sha256(self.name.encode()).hexdigest()[:12]}"
        path = directory / f"{name}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket of an earlier run of this server
        return path

    @property
    def server(self):
        server = LocalProcessSpawner.server.fget(self)
        if server is not None and self.socket_path:
            url = socket_url(Path(self.socket_path))
            if not server.connect_url.startswith(url):
                server.connect_url = url  # the base URL is added by JupyterHub's Server
        return server

    @server.setter
    def server(self, server) -> None:
        LocalProcessSpawner.server.fset(self, server)

    # --- environment ---------------------------------------------------------------------------
    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        account = self.account
        assert account is not None, "start() sets the account before the environment is built"
        env.update(USER=account.name, HOME=str(account.home), SHELL="/bin/bash")
        # their own packages and programs (mlaas.user_site): `pip install` goes to ~/.local
        env["PIP_PREFIX"] = str(account.home / ".local")
        env["PATH"] = server_path(account.home)
        env["JUPYTER_CONFIG_PATH"] = str(USER_JUPYTER_CONFIG)
        return env

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        profile = self.profile
        if profile is None:
            return env
        env.update(profile.env)
        cpus = len(self.placement.cpus) if self.placement and self.placement.cpus else max(1, int(profile.cpu.limit))
        env.update(
            MLAAS_PROFILE=profile.slug,
            CPU_LIMIT=f"{profile.cpu.limit:g}",
            MEM_LIMIT=str(profile.memory.limit),
            OMP_NUM_THREADS=str(cpus),
            OPENBLAS_NUM_THREADS=str(cpus),
            MKL_NUM_THREADS=str(cpus),
        )
        # A server without accelerators sees none, even on a GPU machine.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self.state_gpus)
        return env

    def get_args(self) -> list[str]:
        args = list(super().get_args())  # JupyterHub's is Spawner.args itself: never extend that
        if os.geteuid() == 0 and not self.uses_accounts:
            args.append("--ServerApp.allow_root=True")
        if self.socket_path:  # instead of the TCP port: see the module's doc
            args += [f"--ServerApp.sock={self.socket_path}", "--ServerApp.sock_mode=0600"]
        return args

    def server_entry(self, argv: list[str], env: dict[str, str]) -> ServerEntry:
        """What the server's process becomes, by exec or by fork (mlaas.server_entry)."""
        placement, account = self.placement, self.account
        assert placement is not None and account is not None
        entry = ServerEntry(argv=argv, env=env, cwd=str(account.home), placement=placement,
                            hide=[os.fsdecode(p) for p in self.fence_hidden])
        if self.uses_accounts:
            entry.uid, entry.gid = account.uid, account.gid
            entry.groups = os.getgrouplist(account.name, account.gid)
        return entry

    def make_preexec_fn(self, name: str):
        entry = self.server_entry([], {})
        return lambda: entry.enter(new_session=False)  # Popen's start_new_session made the session

    # --- state kept across hub restarts ----------------------------------------------------------
    state_gpus: list[str] = []

    def get_state(self) -> dict:
        state = super().get_state()
        if self.state_gpus:
            state["gpus"] = list(self.state_gpus)
        if self.socket_path:
            state["socket"] = self.socket_path
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.socket_path = state.get("socket", "")
        self.state_gpus = list(state.get("gpus", []))
        if self.state_gpus:
            self.capacity.restore(self.owner_key, self.state_gpus)

    def clear_state(self) -> None:
        super().clear_state()
        self.state_gpus = []
        self.socket_path = ""

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self):
        self.reset_progress()
        profile = self.profile
        if profile is None:  # apply_user_options always runs first; this guards direct calls
            await self.apply_profile(self.user_options or {})
            profile = self.profile
        assert profile is not None
        self.emit(10, f"Profile {profile.display_name}: {profile.summary()}")

        account_name = await asyncio.to_thread(lambda: self.account_name)
        home = Path(self.homes_dir) / account_name
        if self.uses_accounts:
            blocked = untraversable_ancestor(Path(self.homes_dir))
            if blocked is not None:
                raise web.HTTPError(500, f"Server setup error: user accounts cannot enter {blocked}; ask the admins.")
            self.account = await asyncio.to_thread(ensure_account, account_name, self.user.name, home)
            await asyncio.to_thread(apply_quota, self.disk_quota_support, self.account.name, self.disk_quota)
            self.emit(20, f"Using account {self.account.name} with a private home directory")
        else:
            self.account = own_account(home)
            self.emit(20, "Single-account development mode: servers share the hub's account")

        await asyncio.to_thread(self._prepare_projects)

        try:
            devices = self.capacity.claim(self.owner_key, profile)
        except NoCapacity as e:
            refused = web.HTTPError(409, str(e))
            count_refusal(refused)
            raise refused from None
        self.state_gpus = [d.uuid for d in devices]
        if devices:
            names = ", ".join(f"{d.mig_profile or d.model} ({d.uuid})" for d in devices)
            self.emit(30, f"Assigned {names}")
        self.fence_hidden = self.fence.plan(devices)

        backend = self.limits
        self.placement = backend.place(self.placement_key, profile.cpu.limit, profile.memory.limit)
        self.emit(
            40,
            f"Limits: {len(self.placement.cpus)} CPU core(s), {format_bytes(profile.memory.limit)} memory ({backend.name})",
        )

        started = time.perf_counter()
        try:
            self.socket_path = str(await asyncio.to_thread(self._prepare_socket))
            # nothing listens on TCP: jupyter_server takes --sock only with its default port (which
            # jupyterhub-singleuser copies from JUPYTERHUB_SERVICE_URL), and then binds no port
            self.port = SOCKET_MODE_PORT
            async with self._start_slot():
                self.emit(50, "Starting JupyterLab")
                await self._start_process()
                await self._wait_until_answering(self.socket_path)
        except BaseException:
            self.release_resources()
            raise
        self.log.info("%s answers after %.2fs", self.owner_key, time.perf_counter() - started)
        self.emit(90, "JupyterLab is up; connecting you")
        url = socket_url(Path(self.socket_path))
        if self.server is not None:
            self.server.connect_url = url
        return url

    async def _start_process(self) -> None:
        """Fork the server from the zygote where it can serve it, else exec it (JupyterHub's own
        LocalProcessSpawner.start)."""
        argv = [*self.cmd, *self.get_args()]
        env = self.get_env()
        why_exec = "preforked servers are off" if not self.preforked else self.zygote.cannot_serve(argv, env)
        if why_exec is None and not self.shell_cmd:
            try:
                self.proc = await self.zygote.spawn(self.server_entry(argv, env), timeout=self.start_timeout)
            except ZygoteUnavailable as e:
                why_exec = str(e)
            except ServerEntryFailed as e:
                raise web.HTTPError(500, f"Server setup error: {e}; ask the admins.") from None
            else:
                self.pid = self.proc.pid
                self.log.info("Forked %s's server from the pre-started server process: pid %d", self.owner_key, self.pid)
                return
        self.log.info("Starting %s's server by exec: %s", self.owner_key, why_exec or "a shell command is set")
        await super().start()

    def _prepare_projects(self) -> None:
        """Project storage: a project server works in it; a member's server links to each."""
        account = self.account
        assert account is not None
        root = Path(self.projects_dir).resolve()
        groups = self.project_groups()
        directories = {project_slug(g): ensure_storage(root, g, self.uses_accounts) for g in groups}
        if self.uses_accounts:
            set_project_groups(account.name, groups)
        if self.project is not None:
            self.notebook_dir = str(directories[project_slug(self.project.group)])
            self.emit(25, f"Project {self.project.title}: shared storage of the group {self.project.group}")
        else:
            link_projects(account.home, root, directories, account.uid, account.gid)
            if directories:
                self.emit(25, "Project storage: " + ", ".join(f"~/{LINKS_DIR}/{name}" for name in directories))

    @contextlib.asynccontextmanager
    async def _start_slot(self):
        """Wait for one of the `max_concurrent_starts` slots, telling the user their place."""
        queue = start_queue(self.max_concurrent_starts or max(2, os.cpu_count() or 2))
        if queue.slots.locked():
            self.emit(45, f"Queued: {queue.waiting + 1} server start(s) ahead of yours on this machine")
        queue.waiting += 1
        try:
            await queue.slots.acquire()
        finally:
            queue.waiting -= 1
        try:
            yield
        finally:
            queue.slots.release()

    async def _wait_until_answering(self, socket_path: str) -> None:
        """Return as soon as the server answers HTTP, so the hub's first check succeeds at once.

        The hub's own check backs off (0.2 … 3.2 s between tries); polling here every 10 ms
        makes a spawn as fast as the server itself.
        """
        path = url_path_join(self.server.base_url if self.server else "/", "api")
        request = f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            status = self.proc.poll() if self.proc else None
            if status is not None:
                raise web.HTTPError(
                    500, f"The server exited with status {status} before it answered; the hub log has its output."
                )
            if not os.path.exists(socket_path):  # not bound yet: a stat, not a connection (cheap in a burst)
                await asyncio.sleep(self.listen_poll_interval)
                continue
            try:
                reader, writer = await asyncio.open_unix_connection(socket_path)
                try:
                    writer.write(request)
                    line = await asyncio.wait_for(reader.readline(), timeout=self.start_timeout)
                finally:
                    writer.close()
                code = int(line.split()[1]) if line.startswith(b"HTTP/") else 599
                if code < 500:
                    return
            except (OSError, ValueError, IndexError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(self.listen_poll_interval)
        raise asyncio.TimeoutError(f"Server on {socket_path} did not answer within {self.start_timeout}s")

    async def delete_forever(self) -> None:
        """The user is deleted (JupyterHub calls this for each of their servers once they are
        stopped): with the default server go their system account and home (mlaas.removal)."""
        if self.name or not self.uses_accounts:
            return
        from ..removal import remove_user_account

        await asyncio.to_thread(remove_user_account, self.registry, self.user.name, Path(self.homes_dir).resolve())

    def release_resources(self) -> None:
        super().release_resources()
        freed = self.capacity.release(self.owner_key)
        if freed:
            self.log.info("%s released %s", self.owner_key, ", ".join(freed))
        self.limits.release(self.placement_key)
