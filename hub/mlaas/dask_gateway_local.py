"""Dask Gateway's one-machine backends (dask-gateway's `LocalBackend`, which keeps its clusters in
SQLite): with the hub as root, each cluster's scheduler and workers run under the owner's own
account; without root (development), as the hub's account. Limits come from mlaas.dask_gateway."""

from __future__ import annotations

import os
from typing import Any

from dask_gateway_server.backends.local import LocalBackend, UnsafeLocalBackend
from traitlets import Integer, Unicode

from .dask_gateway import ProfileLimitsMixin, _Active

class _LocalActive:
    def _active(self) -> list[_Active]:
        return [_Active(c.name, c.username, c.options, c.config, c.count) for c in self.db.active_clusters()]  # type: ignore[attr-defined]


class MLaaSLocalBackend(_LocalActive, ProfileLimitsMixin, LocalBackend):
    """One machine, as root: each cluster's processes under its owner's account (see module doc)."""

    accounts_db = Unicode("", config=True, help="The platform's account registry (mlaas.accounts).")
    homes_dir = Unicode("", config=True, help="Where the accounts' homes are (as for servers).")
    limits_group = Unicode("mlaas-dask", config=True, help="The cgroup subtree of Dask processes.")
    max_processes = Integer(1024, config=True, help="Processes and threads one scheduler or worker may have.")

    @property
    def _limits(self):
        if not hasattr(self, "_limits_obj"):
            from .limits import detect_backend

            from .gpu_fence import GpuFence

            self._limits_obj = detect_backend(self.log, group=self.limits_group, pids=self.max_processes)
            self._pid_keys: dict[int, str] = {}
            self._fence = GpuFence()  # Dask processes on one machine are given no GPU: none to open
            self.log.info("Dask processes run as their owners' accounts; limits: %s; %s", self._limits_obj.describe(),
                          self._fence.describe())
        return self._limits_obj

    def account_of(self, username: str):
        """The hub user's system account (created like a server's, if this is their first use),
        looked up once per user by this gateway process."""
        accounts = self.__dict__.setdefault("_accounts", {})
        if username not in accounts:
            from pathlib import Path

            from .accounts import ensure_account, registry_at

            name = registry_at(self.accounts_db).account_for(username)
            accounts[username] = ensure_account(name, username, Path(self.homes_dir) / name)
        return accounts[username]

    def setup_working_directory(self, cluster: Any) -> str:
        """The cluster's directory, its TLS files and logs, owned by the cluster's owner (0700/0600).

        Written here rather than by LocalBackend, whose version (dask-gateway-server 2026.3.0)
        adds the TLS paths to its list character by character (`paths.extend(path)`) and so
        changes the owner of "/" to the cluster's user before failing."""
        if not self.clusters_directory:
            raise ValueError("MLaaSLocalBackend needs clusters_directory")
        account = self.account_of(cluster.username)
        workdir = os.path.join(self.clusters_directory, cluster.name)
        certs, logs = self.get_certs_directory(workdir), self.get_logs_directory(workdir)
        for path in (workdir, certs, logs):
            os.mkdir(path, 0o700)  # fresh: a cluster name is new, and nothing may be there already
            os.lchown(path, account.uid, account.gid)
        cert_path, key_path = self._get_tls_paths(workdir)
        for path, data in ((cert_path, cluster.tls_cert), (key_path, cluster.tls_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchown(f.fileno(), account.uid, account.gid)
                f.write(data)
        return workdir

    def get_env(self, cluster: Any) -> dict[str, str]:
        env = super().get_env(cluster)
        account = self.account_of(cluster.username)
        env.update(USER=account.name, HOME=str(account.home))
        return env

    def make_preexec_fn(self, cluster: Any):  # pragma: no cover - runs in the child
        raise NotImplementedError("start_process builds the child's set-up itself")

    async def start_process(self, cluster: Any, cmd: list[str], env: dict[str, str], name: str) -> int:
        import asyncio

        account = self.account_of(cluster.username)
        workdir = cluster.state["workdir"]
        cores = cluster.config.worker_cores if name != "scheduler" else cluster.config.scheduler_cores
        memory = cluster.config.worker_memory if name != "scheduler" else cluster.config.scheduler_memory
        key = f"{account.name}.dask-{cluster.name[:12]}-{name[:24]}"
        placement = self._limits.place(key, float(cores), int(memory))
        groups = os.getgrouplist(account.name, account.gid)
        fence, hidden = self._fence, self._fence.plan([])

        def preexec() -> None:
            placement.preexec()
            fence.apply(hidden)
            os.setgid(account.gid)
            os.setgroups(groups)
            os.setuid(account.uid)
            os.umask(0o077)
            os.chdir(workdir)

        log_path = os.path.join(self.get_logs_directory(workdir), name + ".log")
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchown(fd, account.uid, account.gid)
            proc = await asyncio.create_subprocess_exec(
                *cmd, preexec_fn=preexec, start_new_session=True, env=env, stdout=fd, stderr=asyncio.subprocess.STDOUT,
            )
        except BaseException:
            self._limits.release(key)
            raise
        finally:
            os.close(fd)
        self._pid_keys[proc.pid] = key
        return proc.pid

    async def stop_process(self, pid: int) -> None:
        await super().stop_process(pid)
        key = self._pid_keys.pop(pid, None)
        if key:
            self._limits.release(key)


class MLaaSUnsafeLocalBackend(_LocalActive, ProfileLimitsMixin, UnsafeLocalBackend):
    """One machine without root (development): every cluster runs as the hub's own account."""
