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

from .netaddr import is_loopback_host, is_loopback_url
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
    direct_access: bool = Field(
        True,
        description="Let readers on this machine read a file the cache holds completely straight from the "
        "cache's disk (XRootD's direct cache access, `pss.dca`). Only where the caches serve this machine "
        "alone (cache_host on loopback): XRootD hands every client a local path, which another host cannot open.",
    )
    ram: str = "1g"  # pfc.ram; below 1g the cache failed to start (measured)
    demo_origin: DemoOriginSettings = DemoOriginSettings()
    origins: list[OriginSettings] = [
        OriginSettings(name="demo", url="root://127.0.0.1:1094", namespace="/store/demo", cache_port=1095)
    ]

    @property
    def direct(self) -> bool:
        """Whether the caches hand complete files to readers for direct reading."""
        return self.direct_access and is_loopback_host(self.cache_host)


CACHE_TEMPLATE = Path(__file__).parent / "templates" / "xcache.cfg"  # also used by the chart and Ansible


# XRootD 5.5 has no directive to bind one address: it listens on every interface. `xrd.allow`
# refuses every connection from a host that is not listed, before any request is read.
LOOPBACK_ONLY = "xrd.allow host localhost\n"

# An origin on this machine: blocks never cross a network, so XRootD's per-page network checksums
# (CRC32C over every 4 KiB, computed by the origin and checked by the cache) only cost CPU. Measured
# on 2 cores, 1 GiB cold: 0.45 -> 0.8 x the origin's direct read rate (docs/operations.md).
LOOPBACK_ORIGIN = "pfc.cschk off\n"

# XRootD's direct cache access: the cache answers an open of a file it holds completely with a
# redirect to its local copy, which XRootD clients then read themselves. `world` makes the copy
# readable by every account on this machine, like the cache itself (which serves this machine's
# clients with no further check); only the cache can write it. Files not complete are streamed.
DIRECT_ACCESS = "pss.dca world\n"


def render_cache_config(origin: OriginSettings, cache_dir: Path, admin_dir: Path, ram: str,
                        loopback_only: bool = False, direct_access: bool = False) -> str:
    """The shared template (read-only export), plus what only a cache serving this machine alone
    does: refuse other hosts, skip network checksums for an origin on this machine, and hand
    complete files to readers directly."""
    if direct_access and not loopback_only:
        raise ValueError("direct cache access needs a cache that serves this machine only")
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
    if is_loopback_url(origin.url):
        text += "# the origin is on this machine: no network to guard with checksums\n" + LOOPBACK_ORIGIN
    if direct_access:
        text += "# complete files are read from the cache's disk by this machine's readers (data.direct_access)\n"
        text += DIRECT_ACCESS
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


def cache_url(settings: DataSettings, origin: OriginSettings) -> str:
    return f"root://{settings.cache_host}:{origin.cache_port}"


def cache_base(state_dir: Path, origin: OriginSettings) -> Path:
    return state_dir / "xcache" / origin.name


def cache_data_dir(state_dir: Path, origin: OriginSettings) -> Path:
    """Where the cache keeps its copies (`oss.localroot`)."""
    return cache_base(state_dir, origin) / "data"


def client_map(settings: DataSettings, state_dir: Path | None = None) -> dict:
    """What the notebook side (`mlaas.data`) needs: origin -> cache, namespace -> origin, and,
    with direct access, where each cache keeps its files on this machine."""
    doc: dict = {
        "origins": {o.url: cache_url(settings, o) for o in settings.origins},
        "namespaces": {o.namespace: o.url for o in settings.origins if o.namespace},
    }
    if settings.direct and state_dir is not None:
        doc["direct"] = {cache_url(settings, o): str(cache_data_dir(state_dir, o)) for o in settings.origins}
    return doc


def client_env(settings: DataSettings, state_dir: Path | None = None) -> dict[str, str]:
    return {"MLAAS_XCACHE": json.dumps(client_map(settings, state_dir)), **CACHE_CLIENT_ENV}


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
    readers_traverse: bool = False  # other accounts read files below base_dir (direct cache access)
    proc: subprocess.Popen | None = None

    @property
    def log_file(self) -> Path:
        return self.base_dir / "logs" / self.name / "xrootd.log"

    def start(self, timeout: float = 20) -> None:
        binary = xrootd_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        (self.base_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.base_dir / "logs").chmod(0o700)  # who read what: the platform's business, not its readers'
        cfg = self.base_dir / f"{self.name}.cfg"
        cfg.write_text(self.config)
        args = [binary, "-c", str(cfg), "-l", str(self.base_dir / "logs" / "xrootd.log"), "-n", self.name]
        user = _service_user()
        if user:
            args += ["-R", user.pw_name]  # xrootd refuses to run as root
            if self.readers_traverse:
                # xrootd sets every directory it owns on the way to its admin path to 0700; a
                # base it does not own stays open to readers of its data directory
                os.chown(self.base_dir, 0, 0)
                self.base_dir.chmod(0o755)
            for path in [*([] if self.readers_traverse else [self.base_dir]), *self.base_dir.rglob("*")]:
                try:
                    if not path.is_symlink() and path.stat().st_uid != user.pw_uid:
                        os.chown(path, user.pw_uid, user.pw_gid)
                except FileNotFoundError:  # xrootd's admin sockets come and go
                    pass
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.proc = subprocess.Popen(
            args, cwd=self.base_dir, env={**os.environ, **self.extra_env}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            umask=0o022 if self.readers_traverse else -1,  # directories it makes stay traversable
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
    base, data = cache_base(state_dir, origin), cache_data_dir(state_dir, origin)
    data.mkdir(parents=True, exist_ok=True)
    (base / "admin").mkdir(parents=True, exist_ok=True)
    (base / "admin").chmod(0o700)
    config = render_cache_config(origin, data, base / "admin", settings.ram,
                                 loopback_only=is_loopback_host(settings.cache_host), direct_access=settings.direct)
    if settings.direct:  # readers open the cache's copies themselves
        data.chmod(0o755)
    return XRootDProcess(f"xcache-{origin.name}", config, base, dict(CACHE_CLIENT_ENV),
                         readers_traverse=settings.direct)


def origin_process(name: str, port: int, data_dir: Path, state_dir: Path) -> XRootDProcess:
    base = state_dir / "origins" / name
    (base / "admin").mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    return XRootDProcess(f"origin-{name}", render_origin_config(port, data_dir, base / "admin"), base)
