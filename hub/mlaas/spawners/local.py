"""LocalProfileSpawner: profiles on one machine, as local processes.

On top of JupyterHub's LocalProcessSpawner it adds: a per-user system account and private home
(when the hub is root), the profile's CPU/memory limits (see `mlaas.limits`), GPUs and MIG
instances by UUID in CUDA_VISIBLE_DEVICES, progress events, and readiness reported the moment
the server listens (the hub's own polling backs off up to seconds).
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

from jupyterhub.spawner import LocalProcessSpawner, set_user_setuid
from jupyterhub.utils import url_path_join
from tornado import web
from traitlets import Float, Integer, Unicode, default

from ..accounts import Account, account_name, ensure_account, own_account, untraversable_ancestor
from ..capacity import DeviceAllocator, NoCapacity, inventory_source
from ..limits import LimitBackend, Placement, detect_backend
from ..profiles.quantities import format_bytes
from ..projects.names import project_slug
from ..projects.storage import LINKS_DIR, ensure_storage, link_projects, set_project_groups
from .common import ProfileSpawnerMixin

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_JUPYTER_CONFIG = Path(__file__).resolve().parents[2] / "user_env" / "jupyter"


@functools.cache
def device_allocator(spec: str) -> DeviceAllocator:
    """One allocator per inventory in the hub process: a device is never given twice."""
    return DeviceAllocator(inventory_source(spec))


@functools.cache
def limit_backend(instance: str) -> LimitBackend:
    """One per platform instance (named after its homes directory)."""
    log = logging.getLogger("JupyterHub.mlaas.limits")
    digest = hashlib.sha256(instance.encode()).hexdigest()[:10]
    backend = detect_backend(log, group=f"mlaas-{digest}")
    log.info("Resource limits for local servers: %s", backend.describe())
    return backend


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
    isolation = Unicode(
        "auto",
        config=True,
        help="'accounts' (a system account per user; needs root), 'single-account' (development), or 'auto'.",
    )
    listen_poll_interval = Float(0.01, config=True, help="Seconds between checks that the new server answers.")
    max_concurrent_starts = Integer(
        0,
        config=True,
        help="""Servers that may be starting at the same time (0: one per CPU core, at least 2).

        A server's start is CPU-bound for a few seconds. When many users arrive at once, starting
        them all together makes everyone wait for the last; a short queue lets each start at full
        speed. Queued users see their place in the progress messages.""",
    )

    account: Account | None = None
    placement: Placement | None = None

    @default("cmd")
    def _cmd_default(self):
        return [str(Path(sys.prefix) / "bin" / "jupyterhub-singleuser")]

    @property
    def capacity(self) -> DeviceAllocator:
        return device_allocator(self.gpu_inventory)

    @property
    def limits(self) -> LimitBackend:
        return limit_backend(str(Path(self.homes_dir).resolve()))

    @property
    def uses_accounts(self) -> bool:
        if self.isolation == "auto":
            return os.geteuid() == 0
        return self.isolation == "accounts"

    @property
    def placement_key(self) -> str:
        suffix = f"-{re.sub(r'[^a-z0-9_-]', '-', self.name.lower())}" if self.name else ""
        return account_name(self.user.name) + suffix

    # --- environment ---------------------------------------------------------------------------
    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        account = self.account
        assert account is not None, "start() sets the account before the environment is built"
        env.update(USER=account.name, HOME=str(account.home), SHELL="/bin/bash")
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{SYSTEM_PATH}"
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
        args = super().get_args()
        if os.geteuid() == 0 and not self.uses_accounts:
            args.append("--ServerApp.allow_root=True")
        return args

    def make_preexec_fn(self, name: str):
        placement, account = self.placement, self.account
        assert placement is not None and account is not None
        switch_user = set_user_setuid(account.name, chdir=False) if self.uses_accounts else None
        home = str(account.home)

        def preexec() -> None:
            placement.preexec()
            # user-private groups: 007 keeps homes private (0700) and makes files in a project
            # directory (setgid, the project's group) writable by the other members
            os.umask(0o007)
            if switch_user:
                switch_user()
            os.chdir(home)  # ours, not whatever /etc/passwd says; fails loudly if it cannot

        return preexec

    # --- state kept across hub restarts ----------------------------------------------------------
    state_gpus: list[str] = []

    def get_state(self) -> dict:
        state = super().get_state()
        if self.state_gpus:
            state["gpus"] = list(self.state_gpus)
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.state_gpus = list(state.get("gpus", []))
        if self.state_gpus:
            self.capacity.restore(self.owner_key, self.state_gpus)

    def clear_state(self) -> None:
        super().clear_state()
        self.state_gpus = []

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self):
        self.reset_progress()
        profile = self.profile
        if profile is None:  # apply_user_options always runs first; this guards direct calls
            await self.apply_profile(self.user_options or {})
            profile = self.profile
        assert profile is not None
        self.emit(10, f"Profile {profile.display_name}: {profile.summary()}")

        home = Path(self.homes_dir) / account_name(self.user.name)
        if self.uses_accounts:
            blocked = untraversable_ancestor(Path(self.homes_dir))
            if blocked is not None:
                raise web.HTTPError(500, f"Server setup error: user accounts cannot enter {blocked}; ask the admins.")
            self.account = await asyncio.to_thread(ensure_account, self.user.name, home)
            self.emit(20, f"Using account {self.account.name} with a private home directory")
        else:
            self.account = own_account(home)
            self.emit(20, "Single-account development mode: servers share the hub's account")

        await asyncio.to_thread(self._prepare_projects)

        try:
            devices = self.capacity.claim(self.owner_key, profile)
        except NoCapacity as e:
            raise web.HTTPError(409, str(e)) from None
        self.state_gpus = [d.uuid for d in devices]
        if devices:
            names = ", ".join(f"{d.mig_profile or d.model} ({d.uuid})" for d in devices)
            self.emit(30, f"Assigned {names}")

        backend = self.limits
        self.placement = backend.place(self.placement_key, profile.cpu.limit, profile.memory.limit)
        self.emit(
            40,
            f"Limits: {len(self.placement.cpus)} CPU core(s), {format_bytes(profile.memory.limit)} memory ({backend.name})",
        )

        started = time.perf_counter()
        try:
            async with self._start_slot():
                self.emit(50, "Starting JupyterLab")
                ip, port = await super().start()
                await self._wait_until_answering(ip, port)
        except BaseException:
            self.release_resources()
            raise
        self.log.info("%s answers after %.2fs", self.owner_key, time.perf_counter() - started)
        self.emit(90, "JupyterLab is up; connecting you")
        return ip, port

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

    async def _wait_until_answering(self, ip: str, port: int) -> None:
        """Return as soon as the server answers HTTP, so the hub's first check succeeds at once.

        The hub's own check backs off (0.2 … 3.2 s between tries); polling here every 10 ms
        makes a spawn as fast as the server itself.
        """
        path = url_path_join(self.server.base_url if self.server else "/", "api")
        request = f"GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\n\r\n".encode()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            status = self.proc.poll() if self.proc else None
            if status is not None:
                raise web.HTTPError(
                    500, f"The server exited with status {status} before it answered; the hub log has its output."
                )
            try:
                reader, writer = await asyncio.open_connection(ip, port)
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
        raise asyncio.TimeoutError(f"Server on {ip}:{port} did not answer within {self.start_timeout}s")

    def release_resources(self) -> None:
        super().release_resources()
        freed = self.capacity.release(self.owner_key)
        if freed:
            self.log.info("%s released %s", self.owner_key, ", ".join(freed))
        self.limits.release(self.placement_key)
