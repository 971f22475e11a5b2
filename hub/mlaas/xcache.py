"""XCache: XRootD proxy file caches in front of the site's data origins, from one template.

Each configured origin gets its own cache in *fixed-origin* mode (`pss.origin host:port`). The
forwarding mode of Debian's XRootD 5.5.3 keys cache entries by path only, so two origins with the
same path would share bytes, and it can be talked into proxying any origin; a fixed-origin cache
can only ever reach its one origin. The same template renders the configs for the one-machine
platform and, later, for the Helm chart.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .netaddr import is_loopback_host
from .subprocesses import end_process

# The cache's own client: fail fast when the origin is down, recover soon after it returns
# (measured: defaults hang > 60 s and stay broken for 30 min; ../shared/README.md).
CACHE_CLIENT_ENV = {"XRD_CONNECTIONWINDOW": "2", "XRD_CONNECTIONRETRY": "1", "XRD_STREAMERRORWINDOW": "2",
                    "XRD_REQUESTTIMEOUT": "15"}


class OriginSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short name, used for the cache's directories and logs.")
    url: str = Field(description="root://host:port of the origin.")
    namespace: str | None = Field(None, description="Logical path prefix served by this origin, e.g. /store/demo.")
    cache_port: int = Field(ge=1, le=65535)

    @field_validator("url")
    @classmethod
    def _root_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme != "root" or not parsed.hostname or not parsed.port or parsed.path not in ("", "/"):
            raise ValueError(f"{value!r} is not an origin address like root://host:1094")
        return f"root://{parsed.hostname}:{parsed.port}"

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or ".." in value.split("/")):
            raise ValueError(f"{value!r} is not an absolute path prefix")
        return value.rstrip("/") if value else value

    @property
    def host_port(self) -> str:
        parsed = urlparse(self.url)
        return f"{parsed.hostname}:{parsed.port}"


class DemoOriginSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    port: int = 1094


class DataSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Start the caches with the platform when xrootd is installed.")
    cache_host: str = "127.0.0.1"
    ram: str = "1g"  # pfc.ram; below 1g the cache failed to start (measured)
    demo_origin: DemoOriginSettings = DemoOriginSettings()
    origins: list[OriginSettings] = [
        OriginSettings(name="demo", url="root://127.0.0.1:1094", namespace="/store/demo", cache_port=1095)
    ]


CACHE_TEMPLATE = Path(__file__).parent / "templates" / "xcache.cfg"  # also used by the chart and Ansible


# XRootD 5.5 has no directive to bind one address: it listens on every interface. `xrd.allow`
# refuses every connection from a host that is not listed, before any request is read.
LOOPBACK_ONLY = "xrd.allow host localhost\n"


def render_cache_config(origin: OriginSettings, cache_dir: Path, admin_dir: Path, ram: str,
                        loopback_only: bool = False) -> str:
    """The shared template (read-only export), plus the one-machine platform's host restriction."""
    text = string.Template(CACHE_TEMPLATE.read_text()).substitute(
        origin_name=origin.name,
        origin_url=origin.url,
        port=origin.cache_port,
        admin_dir=admin_dir,
        origin=origin.host_port,
        cache_dir=cache_dir,
        ram=ram,
    )
    if loopback_only:
        text += "# this platform's users reach the cache on this machine only (data.cache_host)\n" + LOOPBACK_ONLY
    return text


def render_origin_config(port: int, data_dir: Path, admin_dir: Path) -> str:
    return "\n".join(
        [
            "# Demo data origin - rendered by mlaas.xcache; development and tests only.",
            "# Read-only, and only for clients on this machine (the caches).",
            f"xrd.port {port}",
            LOOPBACK_ONLY.strip(),
            "all.export / r/o",
            f"oss.localroot {data_dir}",
            f"all.adminpath {admin_dir}",
            f"all.pidpath {admin_dir}",
            "xrootd.chksum adler32",  # answers checksum queries (the caches forward them here)
            "",
        ]
    )


def client_map(settings: DataSettings) -> dict:
    """What the notebook side (`mlaas.data`) needs: origin -> cache, namespace -> origin."""
    return {
        "origins": {o.url: f"root://{settings.cache_host}:{o.cache_port}" for o in settings.origins},
        "namespaces": {o.namespace: o.url for o in settings.origins if o.namespace},
    }


def client_env(settings: DataSettings) -> dict[str, str]:
    return {"MLAAS_XCACHE": json.dumps(client_map(settings)), **CACHE_CLIENT_ENV}


def xrootd_binary() -> str | None:
    return shutil.which("xrootd")


INSTALL_HINT = "install XRootD to read data through a local XCache (Debian: apt-get install xrootd-server xrootd-server-plugins)"


@dataclass
class XRootDProcess:
    """One xrootd server (a cache or the demo origin) run in the foreground under its own account."""

    name: str
    config: str
    base_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def log_file(self) -> Path:
        return self.base_dir / "logs" / self.name / "xrootd.log"

    def start(self, timeout: float = 20) -> None:
        binary = xrootd_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        (self.base_dir / "logs").mkdir(parents=True, exist_ok=True)
        cfg = self.base_dir / f"{self.name}.cfg"
        cfg.write_text(self.config)
        args = [binary, "-c", str(cfg), "-l", str(self.base_dir / "logs" / "xrootd.log"), "-n", self.name]
        user = _service_user()
        if user:
            args += ["-R", user.pw_name]  # xrootd refuses to run as root
            for path in [self.base_dir, *self.base_dir.rglob("*")]:
                try:
                    if not path.is_symlink() and path.stat().st_uid != user.pw_uid:
                        os.chown(path, user.pw_uid, user.pw_gid)
                except FileNotFoundError:  # xrootd's admin sockets come and go
                    pass
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.proc = subprocess.Popen(
            args, cwd=self.base_dir, env={**os.environ, **self.extra_env}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self._log_since(offset)
            if "initialization completed" in log:
                return
            if "initialization failed" in log or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"xrootd {self.name} failed to start:\n{log[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"xrootd {self.name} did not start in {timeout}s; see {self.log_file}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        end_process(self.proc)


def _service_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("xrootd", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def cache_process(origin: OriginSettings, settings: DataSettings, state_dir: Path) -> XRootDProcess:
    base = state_dir / "xcache" / origin.name
    (base / "data").mkdir(parents=True, exist_ok=True)
    (base / "admin").mkdir(parents=True, exist_ok=True)
    config = render_cache_config(origin, base / "data", base / "admin", settings.ram,
                                 loopback_only=is_loopback_host(settings.cache_host))
    return XRootDProcess(f"xcache-{origin.name}", config, base, dict(CACHE_CLIENT_ENV))


def origin_process(name: str, port: int, data_dir: Path, state_dir: Path) -> XRootDProcess:
    base = state_dir / "origins" / name
    (base / "admin").mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    return XRootDProcess(f"origin-{name}", render_origin_config(port, data_dir, base / "admin"), base)
