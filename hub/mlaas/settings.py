"""Platform settings: one YAML file (`MLAAS_CONFIG`, default `mlaas.yaml` if present), then
`MLAAS_<FIELD>` environment variables for top-level scalar fields.

Every path is resolved against the directory the platform is started from.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .culling import CullSettings
from .spawners.kube_sites import SiteConnection
from .xcache import DataSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


class OidcSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    issuer: str = "http://127.0.0.1:9000"
    client_id: str = "mlaas-hub"
    client_secret_file: Path | None = Field(
        None, description="File holding the client secret (default: <state>/secrets/oidc-client-secret)."
    )
    # oauthenticator does not discover endpoints; these default to the dev provider's routes.
    authorize_url: str | None = None
    token_url: str | None = None
    userdata_url: str | None = None
    scopes: list[str] = ["openid", "profile", "email", "groups", "entitlements"]
    username_claim: str = "preferred_username"
    identity_claim: str = Field(
        "sub", description="Claim that identifies a person for good; a hub name stays with the first identity using it."
    )
    groups_claim: str = "groups"
    entitlements_claim: str = "eduperson_entitlement"
    entitlement_prefixes: list[str] = ["urn:mace:egi.eu:group:"]
    entitlement_roles: list[str] = ["member"]
    allowed_groups: list[str] = ["ml-users", "atlas-ml", "cms-gpu", "mlaas-admins"]
    admin_groups: list[str] = ["mlaas-admins"]

    def endpoint(self, name: Literal["authorize", "token", "userdata"]) -> str:
        explicit = {"authorize": self.authorize_url, "token": self.token_url, "userdata": self.userdata_url}[name]
        return explicit or self.issuer.rstrip("/") + {"authorize": "/auth", "token": "/token", "userdata": "/me"}[name]


class DevIdpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    port: int = 9000
    users_file: Path = REPO_ROOT / "hub" / "dev_idp" / "users.yaml"
    allow_public: bool = Field(
        False, description="Serve a hub whose public URL is not loopback (a demonstration; warned on every page).",
    )


class DaskGatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    port: int = 8002  # the gateway's HTTP proxy; the hub's proxy forwards /services/dask-gateway to it
    api_port: int = 8003  # its private API
    tcp_port: int = 8786  # scheduler traffic from clients
    tcp_host: str = Field(
        "127.0.0.1",
        description="Where the gateway accepts scheduler traffic (TLS, each cluster's own certificate): 127.0.0.1 "
        "for servers on this machine only, 0.0.0.0 to let laptops connect too (docs/data-and-dask.md).",
    )
    backend: Literal["local", "kubernetes"] = Field(
        "local", description="local: clusters as processes here; kubernetes: as pods (with spawner: kubernetes)."
    )
    controller_port: int = 8005  # the Kubernetes backend's controller (health endpoint)
    kubeconfig: Path | None = Field(
        None, description="Kubernetes backend: the gateway's own credentials (the Dask Gateway chart's API role); "
        "default: the hub's.",
    )
    controller_kubeconfig: Path | None = Field(
        None, description="Kubernetes backend: the controller's credentials (the chart's controller role); "
        "default: the gateway's.",
    )
    account: str = Field(
        "mlaas-dask",
        description="System account of the gateway when no user processes run here (Kubernetes backend, or "
        "single-account mode as root); with per-user accounts the gateway is root and clusters run as their owners.",
    )


class TrackingSettings(BaseModel):
    """Experiment tracking (MLflow) as a platform service: mlaas.tracking."""
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the MLflow tracking server behind the hub at /services/mlflow/ "
                          "(it starts where the MLflow server is installed: `make install` does it).")
    port: int = Field(8006, description="The tracking service (the hub's proxy forwards /services/mlflow/ to it), on 127.0.0.1.")
    mlflow_port: int = Field(8007, description="The MLflow server itself, on 127.0.0.1; only the service talks to it.")
    mlflow_command: Path | None = Field(
        None, description="The `mlflow` program (default: the one in the virtual environment beside the hub's, "
        "<hub venv>-mlflow, that `make install` makes, else the PATH's).")
    account: str = Field("mlaas-mlflow", description="System account of the tracking service and MLflow when the hub is root.")
    database_url: str | None = Field(
        None, description="MLflow's databases on PostgreSQL: postgresql://user@host:port/dbname (its users and grants "
        "in <dbname>_auth). Default: where the hub's database is on PostgreSQL, the same server and user with "
        "<hub database>_mlflow and <hub database>_mlflow_auth (made if the user may, else the log says how); "
        "otherwise SQLite in the state directory.", pattern=r"^postgresql://[^:@/]+@[^/]+/[A-Za-z0-9_-]+$")
    database_password_file: Path | None = Field(
        None, description="The password of database_url's user (mode 0600); default: the hub's database_password_file.")


class ClusterSite(SiteConnection):
    """One cluster of a federation: the hub starts servers there through its API server, and
    reaches them as the site exposes them (docs/deploy.md §8)."""

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="What profiles' `sites:` name.")

    def connection(self) -> SiteConnection:
        return SiteConnection.model_validate(self.model_dump(exclude={"name"}))


class KubernetesSettings(BaseModel):
    """The hub on this machine, users' servers as pods of a Kubernetes cluster (spawner: kubernetes)."""

    model_config = ConfigDict(extra="forbid")

    kubeconfig: Path | None = Field(None, description="The cluster's kubeconfig (default: $KUBECONFIG or in-cluster).")
    namespace: str = "mlaas-users"
    image: str = "ghcr.io/mlaas-hub/user-cpu:0.1.0"
    mig_strategy: Literal["mixed", "single"] = "mixed"
    gpu_runtime_class: str = ""
    hub_connect_ip: str = Field("127.0.0.1", description="Where pods reach the hub's API.")
    gpu_metrics_url: str | None = Field(
        None, description="A Prometheus that scrapes NVIDIA's DCGM exporter: the GPU use of servers' pods (usage view, "
        "metrics, GPU-aware idle culling).")
    sites: list[ClusterSite] = Field(
        default_factory=list,
        description="Federation: several clusters behind this hub, each with its kubeconfig (then `kubeconfig` is "
        "not used). Servers go to the allowed site with the most room; a site that cannot be reached is skipped.",
    )

    @model_validator(mode="after")
    def _distinct_sites(self) -> "KubernetesSettings":
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"kubernetes.sites: a site name is used twice ({', '.join(names)})")
        return self

    @property
    def default_kubeconfig(self) -> Path | None:
        """The kubeconfig KubeSpawner's own client reads: the first site's with a federation."""
        return Path(self.sites[0].kubeconfig) if self.sites else self.kubeconfig


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state_dir: Path = REPO_ROOT / "state"
    profiles_dir: Path = REPO_ROOT / "spawner_profiles"
    public_url: str = Field("http://127.0.0.1:8000", description="The address users open (and the AAI redirects to).")
    bind_url: str | None = Field(
        None, description="Where the hub's proxy listens, if not at public_url: behind a TLS reverse proxy, e.g. "
        "http://127.0.0.1:8000 with public_url https://hub.example.org (docs/operations.md \"TLS\").",
    )
    tls_cert_file: Path | None = Field(None, description="Serve TLS with this certificate (PEM, full chain).")
    tls_key_file: Path | None = Field(None, description="The certificate's private key (PEM).")
    database_url: str | None = Field(
        None, description="The hub's database: none for SQLite in state/hub (the default), or "
        "postgresql://user@host:port/dbname (docs/operations.md \"Database\"); no password in it.",
    )
    database_password_file: Path | None = Field(None, description="The database user's password (mode 0600).")
    hub_port: int = 8081
    proxy_api_port: int = 8001
    oidc: OidcSettings = OidcSettings()
    dev_idp: DevIdpSettings = DevIdpSettings()
    data: DataSettings = DataSettings()
    dask_gateway: DaskGatewaySettings = DaskGatewaySettings()
    tracking: TrackingSettings = Field(TrackingSettings(), description="Experiment tracking (MLflow), per group.")
    isolation: Literal["auto", "accounts", "single-account"] = Field(
        "auto", description="auto: per-user system accounts when the hub runs as root, else one account."
    )
    spawner: Literal["local", "kubernetes"] = Field(
        "local", description="local: servers as processes here; kubernetes: as pods of the cluster in `kubernetes`."
    )
    kubernetes: KubernetesSettings = KubernetesSettings()
    culling: CullSettings = Field(CullSettings(), description="Idle servers are stopped (jupyterhub-idle-culler).")
    @model_validator(mode="after")
    def _tls_is_complete(self) -> "Settings":
        from urllib.parse import urlparse

        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: give both to serve TLS, or neither")
        for name in ("tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a file")
        for name in ("public_url", "bind_url"):
            url = getattr(self, name)
            if url is not None and (urlparse(url).scheme not in ("http", "https") or not urlparse(url).hostname):
                raise ValueError(f"{name}: {url!r} is not an http(s) URL")
        if urlparse(self.public_url).scheme == "https" and not self.tls_cert_file and not self.bind_url:
            raise ValueError(
                f"public_url {self.public_url} is https: give tls_cert_file and tls_key_file to serve TLS here, "
                "or bind_url (e.g. http://127.0.0.1:8000) for the TLS reverse proxy in front of the hub")
        return self

    @model_validator(mode="after")
    def _database_is_supported(self) -> "Settings":
        from urllib.parse import urlparse

        if self.database_url is not None:
            url = urlparse(self.database_url)
            if url.scheme not in ("postgresql", "postgresql+psycopg2") or not url.hostname or not url.path.strip("/"):
                raise ValueError(f"database_url: {self.database_url!r} is not postgresql://user@host:port/dbname "
                                 "(leave it out for SQLite)")
            if url.password:
                raise ValueError("database_url: put the password in database_password_file, not in the URL "
                                 "(the URL is logged)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def proxy_url(self) -> str:
        """Where the hub's proxy listens (https when it serves TLS itself)."""
        from urllib.parse import urlparse

        url = urlparse(self.bind_url or self.public_url)
        return url._replace(scheme="https" if self.tls else "http", path="").geturl()

    @property
    def internal_url(self) -> str:
        """The proxy as the platform's own programs on this machine reach it (loopback)."""
        from urllib.parse import urlparse

        url = urlparse(self.proxy_url)
        if url.hostname in ("0.0.0.0", "::"):  # every interface: loopback is one of them
            url = url._replace(netloc=f"127.0.0.1:{url.port or (443 if url.scheme == 'https' else 80)}")
        return url.geturl()

    @model_validator(mode="after")
    def _dask_on_kubernetes_needs_a_cluster(self) -> "Settings":
        if self.dask_gateway.backend == "kubernetes" and self.spawner != "kubernetes":
            raise ValueError("dask_gateway.backend: kubernetes needs spawner: kubernetes (and its cluster)")
        return self

    gpu_inventory: str = Field(
        "nvml", description="'nvml' (the real GPUs) or the path of a simulated inventory YAML (tests, demos)."
    )
    admin_service_port: int = Field(8004, description="Port of the admin service (page and REST API), on 127.0.0.1.")
    metrics_token_file: Path | None = Field(
        None, description="Registers a service `mlaas-metrics` with this token and the `read:metrics` scope alone: "
        "what a Prometheus scraping /hub/metrics uses.")
    admin_api_token_file: Path | None = Field(
        None, description="If set, a service 'mlaas-ops' with the admin role uses the token in this file."
    )
    spawn_timeout: int = 120
    named_servers: int = Field(
        3, ge=0, le=100,
        description="Named servers one user may run besides their default one, each with its own profile "
        "(JupyterHub's named servers; quotas and GPUs count every server); 0: one server per user.",
    )
    max_processes: int = Field(
        1024, ge=64, le=1_000_000,
        description="Processes and threads one local server (or Dask process) may have: pids cgroup, else RLIMIT_NPROC.",
    )
    disk_quota: str = Field(
        "20Gi", description="Per-account limit on the homes' filesystem, where it has user quotas (mlaas.diskquota).",
    )
    max_concurrent_starts: int = Field(
        0, ge=0, description="Local servers starting at once (0: one per CPU core, at least 2); others queue."
    )
    preforked_servers: bool = Field(
        True, description="Local servers fork from a pre-started server process (mlaas.zygote): ready in a "
        "fraction of a second; off: each starts by exec.",
    )

    # --- derived paths --------------------------------------------------------------------
    @property
    def hub_dir(self) -> Path:
        return self.state_dir / "hub"

    @property
    def accounts_db(self) -> Path:
        """Hub users' system accounts and AAI identities (mlaas.accounts.AccountRegistry)."""
        return self.hub_dir / "accounts.sqlite"

    @property
    def homes_dir(self) -> Path:
        return self.state_dir / "homes"

    @property
    def projects_dir(self) -> Path:
        return self.state_dir / "projects"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def dev_idp_passwords_file(self) -> Path:
        return self.secrets_dir / "dev-idp-passwords.yaml"

    @property
    def client_secret_file(self) -> Path:
        return self.oidc.client_secret_file or self.secrets_dir / "oidc-client-secret"

    @property
    def callback_url(self) -> str:
        return self.public_url.rstrip("/") + "/hub/oauth_callback"


class SettingsError(Exception):
    pass


def settings_file(environ: dict[str, str] | None = None) -> Path | None:
    """The platform file in force: $MLAAS_CONFIG, else ./mlaas.yaml if there is one (absolute)."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get("MLAAS_CONFIG"):
        return Path(environ["MLAAS_CONFIG"]).absolute()
    return Path("mlaas.yaml").absolute() if Path("mlaas.yaml").is_file() else None


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    path = path or settings_file(environ)
    data: dict = {}
    if path:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SettingsError(f"{path}: {e}") from e
    for name, field in Settings.model_fields.items():
        value = environ.get(f"MLAAS_{name.upper()}")
        nested = (OidcSettings, DevIdpSettings, DataSettings, DaskGatewaySettings, TrackingSettings, KubernetesSettings,
                  CullSettings)
        if value is not None and field.annotation not in nested:
            data[name] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        where = str(path) if path else "settings"
        lines = [f"{where} {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise SettingsError("\n".join(lines)) from e


def instance_id(homes_dir: str | Path) -> str:
    """A short, stable id of one platform on this machine (from its homes directory): names its
    cgroup subtrees and socket directory, so platforms side by side never share them."""
    return hashlib.sha256(str(Path(homes_dir).resolve()).encode()).hexdigest()[:10]


def ensure_secret(path: Path, nbytes: int = 32) -> str:
    """Read a secret file, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    value = secrets.token_hex(nbytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def prepare_state(settings: Settings) -> None:
    """Create the state tree: private hub and secrets dirs, homes traversable but not listable."""
    for directory, mode in (
        (settings.state_dir, 0o711),
        (settings.hub_dir, 0o700),
        (settings.secrets_dir, 0o700),
        (settings.homes_dir, 0o711),
        (settings.projects_dir, 0o711),
    ):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, mode)
