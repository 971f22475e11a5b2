"""Start and stop the one-machine platform: the development IdP, then JupyterHub (which runs its proxy).

Used by `mlaas up` and by the test suite, so what the tests run is what a newcomer runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .capacity.process_owner import stat_fields
from .settings import REPO_ROOT, Settings, ensure_secret, prepare_state
from .tls import client_context, forwarded_header_notice
from .user_site import install_hook
from .xcache import INSTALL_HINT, XRootDProcess, cache_process, origin_process, xrootd_binary

NODE_MODULES = REPO_ROOT / "node_modules"
HUB_CONFIG = REPO_ROOT / "hub" / "jupyterhub_config.py"


class LaunchError(Exception):
    pass


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "", interval: float = 0.1,
    context: Any = None,
) -> None:
    """Wait for an HTTP 200 at url; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{what or url} exited with status {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(interval)
    raise LaunchError(f"{what or url} not ready after {timeout:.0f}s ({last})")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


LAUNCH_VAR = "MLAAS_LAUNCH"  # set for the platform's own processes only, one value per start


def launch_file(settings: Settings) -> Path:
    """Where the running platform's launch marker is kept (for `mlaas down` and the next start)."""
    return settings.hub_dir / "launch-id"


def _processes_of(launch_id: str) -> list[int]:
    """Processes started by one launch of the platform (they carry MLAAS_LAUNCH=<id>, which only
    the launcher sets, for its children): the hub, its proxy and managed services, which outlive a
    hub that crashed. Never the shell or the `mlaas` command that started or stops it: a value
    they carry themselves (MLAAS_CONFIG) marks nothing."""
    if not launch_id:
        return []
    marker = f"{LAUNCH_VAR}={launch_id}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if environ.startswith(marker) or b"\0" + marker in environ:
            found.append(int(entry.name))
    return found


def reap_launch(settings: Settings) -> int:
    """Stop what a platform launch left running (a crashed hub's proxy and services, or a launcher
    killed with SIGKILL); returns how many processes were stopped."""
    path = launch_file(settings)
    try:
        launch_id, launcher = (path.read_text().split() + ["", ""])[:2]
    except OSError:
        return 0
    pid = launcher.split("@")[0]
    if pid.isdigit() and launcher != _process_tag(os.getpid()) and launcher == _process_tag(int(pid)):
        raise LaunchError(f"this platform is already running (launcher process {pid}, state {settings.state_dir}); "
                          "stop it first with `mlaas down`")
    leftovers = _processes_of(launch_id)
    if leftovers:
        _reap(leftovers)
    path.unlink(missing_ok=True)
    return len(leftovers)


def _reap(pids: list[int], grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _running(p) for p in pids):
            time.sleep(0.1)


def _process_tag(pid: int) -> str:
    """"<pid>@<start time>": names one process, never a later one given the same PID."""
    fields = stat_fields(pid)
    return f"{pid}@{fields[19]}" if fields and len(fields) > 19 else ""


def _running(pid: int) -> bool:
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


@dataclass
class Platform:
    settings: Settings
    config_file: Path | None = None  # the settings file the hub process should read
    log_dir: Path | None = None  # None: children write to this terminal
    extra_env: dict[str, str] = field(default_factory=dict)
    idp: subprocess.Popen | None = None
    hub: subprocess.Popen | None = None
    data_servers: list[XRootDProcess] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    launch_id: str = field(default_factory=lambda: secrets.token_hex(12))
    _logs: list[IO] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.settings.public_url.rstrip("/")

    def _output(self, name: str) -> IO | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(f)
        return f

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, **self.extra_env)
        if self.config_file:
            env["MLAAS_CONFIG"] = str(self.config_file)
        env[LAUNCH_VAR] = self.launch_id
        env["PYTHONUNBUFFERED"] = "1"
        if self.settings.spawner == "kubernetes" and self.settings.kubernetes.default_kubeconfig:
            # the Kubernetes client reads $KUBECONFIG when it is imported, before the hub's config
            env["KUBECONFIG"] = str(self.settings.kubernetes.default_kubeconfig)
        return env

    def start(self, timeout: float = 90) -> None:
        if not (NODE_MODULES / ".bin" / "configurable-http-proxy").exists():
            raise LaunchError("node packages are missing: run `make install` (npm ci) first")
        s = self.settings
        prepare_state(s)
        ensure_secret(s.client_secret_file)
        install_hook()  # users' own packages in their kernels (mlaas.user_site)
        left = reap_launch(s)  # a previous run that crashed without cleaning up
        if left:
            self.notices.append(f"Stopped {left} process(es) an earlier run of this platform left behind")
        launch_file(s).write_text(f"{self.launch_id} {_process_tag(os.getpid())}")
        try:
            if s.data.enabled:
                self._start_data()
            if s.dev_idp.enabled:
                self._start_idp(timeout)
            self._start_hub(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_data(self) -> None:
        """The demo origin (sample data made here) and one XCache per configured origin."""
        data = self.settings.data
        if xrootd_binary() is None:
            self.notices.append(f"No XCache: {INSTALL_HINT}.")
            return
        if data.demo_origin.enabled:
            from .demo_data import write_demo_data

            origin = origin_process("demo", data.demo_origin.port, self.settings.state_dir / "origins" / "demo" / "data",
                                    self.settings.state_dir)
            write_demo_data(origin.base_dir / "data")
            origin.extra_env[LAUNCH_VAR] = self.launch_id
            self.data_servers.append(origin)
            origin.start()
        for configured in data.origins:
            cache = cache_process(configured, data, self.settings.state_dir)
            cache.extra_env[LAUNCH_VAR] = self.launch_id
            self.data_servers.append(cache)
            cache.start()
            self.notices.append(f"XCache for {configured.url} on root://{data.cache_host}:{configured.cache_port}")

    def _start_idp(self, timeout: float) -> None:
        from .dev_idp import ensure_passwords, is_loopback_url, public_refusal, public_warning

        s = self.settings
        if not is_loopback_url(s.public_url):
            if not s.dev_idp.allow_public:
                raise LaunchError(public_refusal(s.public_url))
            self.notices.append(public_warning(s.public_url))
        ensure_passwords(s.dev_idp.users_file, s.dev_idp_passwords_file)
        node = shutil.which("node") or "node"
        env = self._env()
        if not is_loopback_url(s.public_url):
            env["MLAAS_IDP_PUBLIC_WARNING"] = public_warning(s.public_url)
        env.update(
            MLAAS_IDP_PASSWORDS=str(s.dev_idp_passwords_file),
            MLAAS_IDP_PORT=str(s.dev_idp.port),
            MLAAS_IDP_USERS=str(s.dev_idp.users_file),
            MLAAS_IDP_CLIENT_ID=s.oidc.client_id,
            MLAAS_IDP_CLIENT_SECRET_FILE=str(s.client_secret_file),
            MLAAS_IDP_REDIRECT_URIS=s.callback_url,
        )
        out = self._output("dev-idp")
        self.idp = subprocess.Popen(
            [node, str(REPO_ROOT / "hub" / "dev_idp" / "server.mjs")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        wait_http(f"http://127.0.0.1:{s.dev_idp.port}/health", timeout, self.idp, "the development IdP")

    def _start_hub(self, timeout: float) -> None:
        out = self._output("hub")
        self.hub = subprocess.Popen(
            [str(Path(sys.prefix) / "bin" / "jupyterhub"), "-f", str(HUB_CONFIG)],
            cwd=self.settings.hub_dir,
            env=self._env(),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            # JupyterHub stops its services with SIGINT first: a hub started from a background job
            # (SIGINT ignored, inherited by every child) waited out each service's timeout
            preexec_fn=_default_sigint,
        )
        # the hub itself first (quietly), then through the proxy once its route is there
        wait_http(f"http://127.0.0.1:{self.settings.hub_port}/hub/health", timeout, self.hub, "JupyterHub")
        s = self.settings
        context = client_context(s.tls_cert_file) if s.internal_url.startswith("https:") else None
        wait_http(f"{s.internal_url}/hub/health", timeout, self.hub, "JupyterHub (through its proxy)", interval=0.5,
                  context=context)
        notice = forwarded_header_notice(s.public_url, s.bind_url)
        if notice:
            self.notices.append(notice)

    def stop(self) -> None:
        _stop(self.hub, 40)  # the hub stops the users' servers and its proxy first
        _stop(self.idp, 10)
        for server in reversed(self.data_servers):
            server.stop()
        self.data_servers.clear()
        leftovers = _processes_of(self.launch_id)  # what a hub that crashed left behind
        if leftovers:
            self.notices.append(f"Stopped {len(leftovers)} process(es) the hub left behind")
            _reap(leftovers)
        with contextlib.suppress(OSError):
            if launch_file(self.settings).read_text().split()[0] == self.launch_id:
                launch_file(self.settings).unlink()
        for f in self._logs:
            f.close()
        self._logs.clear()
