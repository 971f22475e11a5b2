"""Build the JupyterHub configuration from platform settings (one machine).

`hub/jupyterhub_config.py` is three lines calling `configure(c, load_settings())`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from . import dask_gateway as gateway
from . import gpu_culler, logscrub, postgres
from .accounts import ensure_system_account
from .api import CapacityAPIHandler, ProfilesAPIHandler, QuotasAPIHandler, UsageAPIHandler
from .tracking.hub_config import SERVICE_NAME as TRACKING_SERVICE
from .tracking.hub_config import chart_tracking_service, tracking_service, tracking_url, why_off
from .auth import MLaaSAuthenticator
from .culling import configure_culling
from .kube_api import in_cluster
from .settings import REPO_ROOT, OidcSettings, Settings, ensure_secret, prepare_state
from .profiles import ProfileStore
from .profiles.configmap import live_configmap
from .profiles.quantities import parse_bytes
from .projects import project_role_specs
from .projects.home import template_var as project_servers_var
from .projects.sync import keep_in_sync
from .spawners.common import profile_store
from .spawners.local import SERVER_ENV_KEEP, LocalProfileSpawner
from .xcache import client_env

log = logging.getLogger("JupyterHub.mlaas")  # under the hub's logger: same handlers and format

OPS_SCOPES = ["admin:users", "admin:groups", "admin:servers", "access:servers", "read:hub", "tokens", "list:users"]
METRICS_SERVICE = "mlaas-metrics"  # a scraper's token: read:metrics, and the gateway's metrics (mlaas.dask_metrics)
METRICS_ROLE = {"name": METRICS_SERVICE, "services": [METRICS_SERVICE],
                "scopes": ["read:metrics", f"access:services!service={gateway.SERVICE_NAME}"]}


def warn_if_gpu_idle_unenforced(store: ProfileStore, enforced: bool) -> None:
    """Profiles with a gpu_idle_timeout on a hub that cannot see GPU use: say so at start."""
    if enforced:
        return
    slugs = [p.slug for p in store.current().profiles if p.gpu_idle_timeout]
    if slugs:
        log.warning("gpu_idle_timeout of %s is not enforced: this hub has no GPU use to read (on Kubernetes, set "
                    "custom.mlaas.gpuMetricsUrl or kubernetes.gpu_metrics_url to a Prometheus scraping DCGM)",
                    ", ".join(slugs))


def pod_gpu_use(gpu_metrics_url: str | None):
    """() -> {"user/server": devices with their use} from the DCGM exporter's series (None without)."""
    if not gpu_metrics_url:
        return None
    from .api import pod_devices
    from .capacity.dcgm import DcgmUsage
    from .spawners.common import usage_ledger

    dcgm = DcgmUsage(gpu_metrics_url)
    return lambda: pod_devices(dcgm, usage_ledger().holdings())


def instrument_hub(store: ProfileStore, availability, devices=None) -> None:
    """The platform's own metrics next to JupyterHub's at /hub/metrics (mlaas.metrics), the watch
    on the hub's event loop (mlaas.loop_watch: stalls logged with their place, and counted), and
    what keeps it from stalling: the batched activity update (mlaas.activity), the frozen startup
    heap (mlaas.heap) and SQLite commits that do not wait for the disk (mlaas.sqlite_wal)."""
    from . import activity, heap, sqlite_wal
    from .loop_watch import watch_running_loop
    from .metrics import PlatformCollector, register

    register(PlatformCollector(store, availability, devices))
    watch_running_loop()
    activity.install()
    heap.freeze_when_started()
    sqlite_wal.install()


def start_profile_watcher(store: ProfileStore, interval: float = 2.0) -> None:
    """Reload profiles in the background too, so a broken edit is logged when it is saved."""
    store.refresh()

    def watch() -> None:
        event = threading.Event()
        while not event.wait(interval):
            try:
                store.refresh()
            except Exception:  # the watcher must outlive any surprise
                log.exception("Profile watcher error")

    threading.Thread(target=watch, name="mlaas-profile-watcher", daemon=True).start()


def profile_api_handlers(profiles_dir: str, snapshot: str, gpu_inventory: str | None = None,
                         gpu_metrics_url: str | None = None, tracking_service: str | None = None) -> list[tuple]:
    """The REST endpoints every hub of the platform has (one machine or Kubernetes); with local
    servers (`gpu_inventory`), also this machine's GPU inventory and which server holds what; on
    Kubernetes with `gpu_metrics_url` (a Prometheus scraping NVIDIA's DCGM exporter), the GPU use
    of the servers' pods; with `tracking_service` (the tracking service's name), each group's
    artifact storage as that service measures it."""
    handlers: list[tuple] = [
        (r"/api/mlaas/profiles", ProfilesAPIHandler),
        (r"/api/mlaas/quotas", QuotasAPIHandler, {"profiles_dir": profiles_dir, "snapshot": snapshot}),
        (r"/api/mlaas/usage", UsageAPIHandler,
         {"profiles_dir": profiles_dir, "snapshot": snapshot, "gpu_inventory": gpu_inventory,
          "gpu_metrics_url": gpu_metrics_url, "tracking_service": tracking_service}),
    ]
    if gpu_inventory is not None:
        handlers.append((r"/api/mlaas/capacity", CapacityAPIHandler, {"gpu_inventory": gpu_inventory}))
    return handlers


# --- adding to JupyterHub's lists, never replacing them ---------------------------------------------
# Zero to JupyterHub sets its idle culler's service and role, and a site's hub.loadRoles and
# hub.services, before our code runs: ours go next to them.
def add_roles(c, roles: list[dict]) -> None:
    """Add roles to `load_roles`; a role of the same name (e.g. `user`) gets the union of scopes."""
    current = c.JupyterHub.load_roles
    if not isinstance(current, list):  # unset so far: traitlets' lazy value extends the default
        current.extend(_merged_roles([], roles))
        return
    c.JupyterHub.load_roles = _merged_roles(current, roles)


def _merged_roles(existing: list[dict], new: list[dict]) -> list[dict]:
    merged = [dict(r) for r in existing]
    for role in new:
        same = next((r for r in merged if r.get("name") == role["name"]), None)
        if same is None:
            merged.append(dict(role))
            continue
        for key in ("scopes", "users", "groups", "services"):
            if key in role:
                same[key] = list(dict.fromkeys([*same.get(key, []), *role[key]]))
    return merged


STRONG_TOKEN_LENGTH = 32


def trust_provided_tokens(c, provided: dict[str, str]) -> None:
    """JupyterHub treats a token given in its configuration as a password: it stores it stretched
    by 16,384 rounds of SHA-512 and repeats them for every request that carries it (1.5 ms of the
    hub's event loop each; the operators' automation and the metrics scraper call every few
    seconds). A token of 32 or more characters from a random source needs no stretching, like the
    hub's own; so where every token file holds one, they are stored as the hub's own are. A
    shorter one keeps the stretching (a stolen database must not make it guessable), and the log
    names its file."""
    weak = sorted(name for name, token in provided.items() if len(token) < STRONG_TOKEN_LENGTH)
    if weak:
        log.warning("%s: shorter than %d characters; such tokens are checked slowly (16,384 hash rounds per "
                    "request). Use e.g. `openssl rand -hex 32`.", ", ".join(weak), STRONG_TOKEN_LENGTH)
        return
    c.JupyterHub.trust_user_provided_tokens = True


def add_services(c, services: list[dict]) -> None:
    """Add ours to JupyterHub's services. Those the hub runs carry the launch's marker (only
    variables given to them reach them), so the launcher stops them after a hub crash too."""
    from .launcher import LAUNCH_VAR

    for service in services:
        if service.get("command") and os.environ.get(LAUNCH_VAR):
            service["environment"] = {**service.get("environment", {}), LAUNCH_VAR: os.environ[LAUNCH_VAR]}
    c.JupyterHub.services.extend(services)


def add_template_vars(c, variables: dict) -> None:
    c.JupyterHub.template_vars.update(variables)


def add_server_environment(c, environment: dict[str, str], spawner_section: str = "Spawner") -> None:
    """What every user's server gets: on both the generic Spawner and the concrete spawner's section,
    so a dict set there (z2jh's singleuser.extraEnv) keeps its entries and gains ours.

    KubeSpawner expands `{username}`-style templates in every environment value, so braces of
    ours (the cache map is JSON) are escaped for it: the pod gets the value unchanged."""
    if "Kube" in spawner_section:
        environment = {k: v.replace("{", "{{").replace("}", "}}") for k, v in environment.items()}
    c.Spawner.environment.update(environment)
    if spawner_section != "Spawner":
        c[spawner_section].environment.update(environment)


def configure_projects(c, store: ProfileStore) -> list[dict]:
    """Group projects: the home page section; returns the roles that give members their servers."""
    template_dir = str(Path(__file__).parent / "templates")
    paths = c.JupyterHub.template_paths
    if isinstance(paths, list):
        c.JupyterHub.template_paths = [template_dir, *[p for p in paths if p != template_dir]]
    else:
        paths.prepend([template_dir])
    add_template_vars(c, {"mlaas_projects": project_servers_var(store)})
    return project_role_specs(store.current().projects)


SERVER_TOKEN_SCOPES = ["access:servers!server", "users:activity!user"]  # JupyterHub's own default


def add_server_token_scopes(c, scopes: list[str]) -> None:
    """Add to what servers' tokens may do (JupyterHub's default scopes stay)."""
    current = c.Spawner.server_token_scopes if "server_token_scopes" in c.Spawner else SERVER_TOKEN_SCOPES
    c.Spawner.server_token_scopes = list(dict.fromkeys([*current, *scopes]))


def service_for_users(c, service: str) -> list[dict]:
    """Users may use a service, and so may their servers' tokens (nothing else may)."""
    add_server_token_scopes(c, [f"access:services!service={service}"])
    return [{"name": "user", "scopes": ["self", f"access:services!service={service}"]}]


def gateway_roles_and_scopes(c) -> list[dict]:
    return service_for_users(c, gateway.SERVICE_NAME)


def follow_profile_configmaps(seed: str, directory: Path, configmap: str) -> str:
    """Mirror the deployed and live profile ConfigMaps into `directory` while the hub runs
    (every 5 s); seeded from the mounted deployed files so the hub starts with profiles."""
    from .profiles import configmap as configmaps

    configmaps.seed(directory, seed)
    try:
        loop = asyncio.get_running_loop()  # the hub loads its config inside its event loop
    except RuntimeError:
        return str(directory)
    task = loop.create_task(configmaps.follow(configmap, directory, log))
    _background.add(task)
    task.add_done_callback(_background.discard)
    return str(directory)


def follow_profile_files(store: ProfileStore) -> None:
    """Reload profiles in the background, and keep the project roles in step with them."""
    start_profile_watcher(store)
    start_project_sync(store)


_background: set[asyncio.Task] = set()


def start_project_sync(store: ProfileStore) -> None:
    """Follow project changes in the profile files while the hub runs (see mlaas.projects.sync)."""
    try:
        loop = asyncio.get_running_loop()  # the hub loads its config inside its event loop
    except RuntimeError:
        return  # config loaded outside a running hub (e.g. --generate-config)
    from jupyterhub.app import JupyterHub

    def running_app():
        return JupyterHub.instance() if JupyterHub.initialized() else None

    task = loop.create_task(keep_in_sync(running_app, lambda: store.current().projects))
    _background.add(task)
    task.add_done_callback(_background.discard)


ADMIN_SERVICE = "mlaas-admin"


def admin_service(url: str, environment: dict[str, str]) -> dict:
    """The admin page and API (mlaas.admin), as a hub-managed service only hub admins may open."""
    return {
        "name": ADMIN_SERVICE,
        "url": url,
        "command": [sys.executable, "-m", "mlaas.admin"],
        "environment": environment,
        "oauth_no_confirm": True,
        "display": True,
    }


ADMIN_SERVICE_ROLE = {"name": "mlaas-admin-service", "scopes": ["read:servers", "list:users"], "services": [ADMIN_SERVICE]}
K8S_ADMIN_PORT = 8090  # on the hub's pod; charts/values/jupyterhub.yaml exposes it on the hub Service


# JupyterLab's Dask sidebar (dask-labextension) makes its clusters through the gateway, and the
# dashboards of clusters started in a kernel (LocalCluster) open through the server's own
# authenticated proxy (jupyter-server-proxy), as on Pangeo's hubs
DASK_LAB_ENV = {
    "DASK_LABEXTENSION__FACTORY__MODULE": "dask_gateway",
    "DASK_LABEXTENSION__FACTORY__CLASS": "GatewayCluster",
    "DASK_DISTRIBUTED__DASHBOARD__LINK": "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status",
}


def gateway_client_env(s: Settings) -> dict[str, str]:
    """What `Gateway()` in a user's server needs to work with no arguments."""
    return {
        # the gateway's own proxy on this machine (the hub's proxy forwards its public path there)
        "DASK_GATEWAY__ADDRESS": f"http://127.0.0.1:{s.dask_gateway.port}{gateway.PREFIX}",
        "DASK_GATEWAY__PROXY_ADDRESS": f"gateway://127.0.0.1:{s.dask_gateway.tcp_port}",
        "DASK_GATEWAY__PUBLIC_ADDRESS": gateway.PREFIX,
        "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",
        **DASK_LAB_ENV,
    }


def gateway_service(s: Settings, kubeconfig: Path | None = None, credentials_copy: str = "kubeconfig") -> dict:
    """dask-gateway-server as a hub-managed service (as root with per-user accounts, see below).

    With the Kubernetes backend it uses its own cluster credentials (`dask_gateway.kubeconfig`, a
    ServiceAccount with the Dask Gateway chart's API role; the hub's if unset)."""
    state = s.state_dir / "dask-gateway"
    on_kubernetes = s.dask_gateway.backend == "kubernetes"  # no built-in proxy: the API answers directly
    service: dict = {
        "name": gateway.SERVICE_NAME,
        "url": f"http://{s.kubernetes.hub_connect_ip}:{s.dask_gateway.api_port}" if on_kubernetes
        else f"http://127.0.0.1:{s.dask_gateway.port}",
        "command": [str(Path(sys.prefix) / "bin" / "dask-gateway-server"), "-f", str(REPO_ROOT / "hub" / "dask_gateway_config.py")],
        "cwd": str(state),
        "environment": {
            "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "MLAAS_CONFIG": os.environ.get("MLAAS_CONFIG", ""),
            "HOME": str(state),
        },
        "display": False,
    }
    state.mkdir(parents=True, exist_ok=True)
    account = None
    if os.geteuid() == 0 and (on_kubernetes or s.isolation == "single-account"):
        # no processes of users here: the gateway runs under its own unprivileged account
        account = ensure_system_account(s.dask_gateway.account, state, "MLaaS Hub Dask Gateway")
        (state / "clusters").mkdir(exist_ok=True)
        os.chown(state / "clusters", account.uid, account.gid)
        service["user"] = account.name
    elif os.geteuid() == 0:
        # users' clusters run under their own accounts (mlaas.dask_gateway_local.MLaaSLocalBackend), which
        # only root can start: the gateway stays root, out of reach of every user's tasks; each
        # cluster's directory belongs to its owner (0700) under a directory others cannot list
        os.chmod(state, 0o711)
        (state / "clusters").mkdir(exist_ok=True)
        os.chown(state / "clusters", 0, 0)
        os.chmod(state / "clusters", 0o711)
    else:
        (state / "clusters").mkdir(parents=True, exist_ok=True)
    source = kubeconfig or s.dask_gateway.kubeconfig or s.kubernetes.default_kubeconfig
    if on_kubernetes and source:
        # the gateway's account gets its own private copy of its cluster credentials (the
        # original stays readable by root only); created 0600, never readable by others
        private = state / credentials_copy
        private.unlink(missing_ok=True)
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Path(source).read_bytes())
        if account is not None:
            os.chown(private, account.uid, account.gid)
        service["environment"]["KUBECONFIG"] = str(private)
    return service


def gateway_controller_service(s: Settings) -> dict:
    """The Kubernetes backend's controller: turns DaskCluster objects into pods (no web endpoint),
    with the credentials of `dask_gateway.controller_kubeconfig` (the chart's controller role)."""
    service = gateway_service(s, s.dask_gateway.controller_kubeconfig, "controller-kubeconfig")
    service["name"] = f"{gateway.SERVICE_NAME}-controller"
    service.pop("url")
    service["command"] = [service["command"][0], "kube-controller", *service["command"][1:]]
    return service


def claim_settings(oidc: OidcSettings) -> dict:
    """How the AAI's answer is read (scopes asked for, which claims name the user, their groups and
    identity), the same on both hubs: the one-machine hub takes them from its settings file; the
    Kubernetes hub from the site's `hub.config.MLaaSAuthenticator`, with these defaults for what
    the site leaves out."""
    return {
        "scope": list(oidc.scopes), "username_claim": oidc.username_claim, "groups_claim": oidc.groups_claim,
        "entitlements_claim": oidc.entitlements_claim, "entitlement_prefixes": list(oidc.entitlement_prefixes),
        "entitlement_roles": list(oidc.entitlement_roles), "identity_claim": oidc.identity_claim,
        "basic_auth": True, "manage_groups": True, "login_service": "institute account (OpenID Connect)",
    }


def configure(c, settings: Settings) -> None:
    logscrub.install()  # OAuth codes, states and tokens never reach a log line
    prepare_state(settings)
    s, oidc = settings, settings.oidc
    hub_dir = s.hub_dir

    # --- hub, proxy, database ---------------------------------------------------------------
    c.JupyterHub.public_url = s.public_url  # what users open: cookies are Secure when it is https
    c.JupyterHub.bind_url = s.proxy_url  # where the proxy listens (docs/operations.md "TLS")
    if s.tls:
        c.JupyterHub.ssl_cert = str(s.tls_cert_file)
        c.JupyterHub.ssl_key = str(s.tls_key_file)
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = s.hub_port
    if s.database_url:  # PostgreSQL (docs/operations.md "Database"); the password never in the URL
        # the driver the platform installs (SQLAlchemy's default for postgresql:// changed to psycopg 3)
        c.JupyterHub.db_url = s.database_url.replace("postgresql://", "postgresql+psycopg2://", 1)
        if s.database_password_file:  # for every connection, JupyterHub's migrations too: libpq's password file
            os.environ["PGPASSFILE"] = str(postgres.write_pgpass(s.database_url, s.database_password_file, s.secrets_dir))
    else:
        c.JupyterHub.db_url = f"sqlite:///{hub_dir / 'jupyterhub.sqlite'}"
    c.JupyterHub.upgrade_db = True  # a new JupyterHub migrates the database at start, after a timestamped copy
    c.JupyterHub.cookie_secret_file = str(s.secrets_dir / "jupyterhub-cookie-secret")
    c.JupyterHub.pid_file = str(hub_dir / "jupyterhub.pid")
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{s.proxy_api_port}"
    c.ConfigurableHTTPProxy.command = [str(REPO_ROOT / "node_modules" / ".bin" / "configurable-http-proxy")]
    c.ConfigurableHTTPProxy.pid_file = str(hub_dir / "proxy.pid")
    snapshot = str(hub_dir / "profiles.last-good.json")
    store = profile_store(str(s.profiles_dir), snapshot)
    tracking_off = why_off(s)
    c.JupyterHub.extra_handlers.extend(
        profile_api_handlers(str(s.profiles_dir), snapshot, s.gpu_inventory if s.spawner == "local" else None,
                             s.kubernetes.gpu_metrics_url if s.spawner == "kubernetes" else None,
                             tracking_service=None if tracking_off else TRACKING_SERVICE)
    )

    # --- login through the AAI ----------------------------------------------------------------
    c.JupyterHub.authenticator_class = MLaaSAuthenticator
    a = c.MLaaSAuthenticator
    a.update(claim_settings(oidc))
    a.client_id = oidc.client_id
    a.client_secret = ensure_secret(s.client_secret_file)
    a.oauth_callback_url = s.callback_url
    a.authorize_url = oidc.endpoint("authorize")
    a.token_url = oidc.endpoint("token")
    a.userdata_url = oidc.endpoint("userdata")
    a.allowed_groups = set(oidc.allowed_groups)
    a.admin_groups = set(oidc.admin_groups)
    a.identity_issuer = oidc.issuer
    a.accounts_db = str(s.accounts_db)

    # --- spawning -------------------------------------------------------------------------------
    # several servers per user, each with its own profile (z2jh: hub.allowNamedServers)
    c.JupyterHub.allow_named_servers = s.named_servers > 0
    c.JupyterHub.named_server_limit_per_user = s.named_servers
    c.JupyterHub.spawner_class = LocalProfileSpawner
    c.ProfileSpawnerMixin.profiles_dir = str(s.profiles_dir)  # both spawners: one place
    c.ProfileSpawnerMixin.profiles_snapshot = snapshot
    sp = c.LocalProfileSpawner
    sp.gpu_inventory = s.gpu_inventory
    sp.homes_dir = str(s.homes_dir)
    sp.accounts_db = str(s.accounts_db)
    sp.max_processes = s.max_processes
    sp.disk_quota = parse_bytes(s.disk_quota)
    sp.isolation = s.isolation
    sp.max_concurrent_starts = s.max_concurrent_starts
    sp.preforked = s.preforked_servers
    c.Spawner.default_url = "/lab"
    c.Spawner.start_timeout = s.spawn_timeout
    c.Spawner.http_timeout = 30
    c.Spawner.env_keep = list(SERVER_ENV_KEEP)
    sp.projects_dir = str(s.projects_dir)
    if s.spawner == "kubernetes":
        configure_kube_spawner(c, s)

    environment: dict[str, str] = {}
    if s.data.enabled:
        environment.update(client_env(s.data, s.state_dir))  # where the site's caches are, for mlaas.data
    # the admin service: admins reach it (their role has access:services); it reads usage
    settings_env = {k: v for k, v in os.environ.items() if k.startswith("MLAAS_")}  # the same settings
    services: list[dict] = [admin_service(f"http://127.0.0.1:{s.admin_service_port}", settings_env)]
    roles: list[dict] = configure_projects(c, store)  # a role per project, granted to its group
    roles.append(ADMIN_SERVICE_ROLE)
    if s.dask_gateway.enabled:
        environment.update(gateway_client_env(s))
        services.append(gateway_service(s))
        if s.dask_gateway.backend == "kubernetes":
            services.append(gateway_controller_service(s))
        roles.extend(gateway_roles_and_scopes(c))
    if tracking_off is None:
        tracking = tracking_service(s, settings_env)
        services.append(tracking)
        roles.extend(service_for_users(c, tracking["name"]))
        c.ProfileSpawnerMixin.tracking_url = tracking_url(tracking["url"])
    elif s.tracking.enabled:
        log.warning("Experiment tracking is off: %s", tracking_off)
    cull_services, cull_roles, cull_env = configure_culling(c, s.culling)
    services += cull_services
    roles += cull_roles
    environment.update(cull_env)
    gpu_use_known = s.spawner == "local" or bool(s.kubernetes.gpu_metrics_url)
    if s.culling.enabled and gpu_use_known:
        # GPU use per server: this machine's NVML, or the DCGM exporter's series in Prometheus
        services.append(gpu_culler.culler_service(s.culling.gpu_every, s.internal_url, s.tls_cert_file))
        roles.append(dict(gpu_culler.ROLE))
    warn_if_gpu_idle_unenforced(store, s.culling.enabled and gpu_use_known)
    add_server_environment(c, environment, "KubeProfileSpawner" if s.spawner == "kubernetes" else "LocalProfileSpawner")

    # --- an admin-scoped service token for automation, if asked for ----------------------------
    provided: dict[str, str] = {}
    if s.admin_api_token_file:
        provided["admin_api_token_file"] = token = Path(s.admin_api_token_file).read_text().strip()
        services.append({"name": "mlaas-ops", "api_token": token})
        roles.append({"name": "mlaas-ops", "scopes": OPS_SCOPES, "services": ["mlaas-ops"]})
    if s.metrics_token_file:  # Prometheus scrapes /hub/metrics with this token
        provided["metrics_token_file"] = token = Path(s.metrics_token_file).read_text().strip()
        services.append({"name": METRICS_SERVICE, "api_token": token})
        roles.append({**METRICS_ROLE, "scopes": [
            scope for scope in METRICS_ROLE["scopes"] if s.dask_gateway.enabled or not scope.startswith("access:")]})
    if s.spawner == "local":
        from .spawners.local import device_allocator, running_server_pids

        allocator = device_allocator(s.gpu_inventory)
        instrument_hub(store, allocator.availability, lambda: allocator.use_report(running_server_pids()))
    else:
        from .spawners.kube import federation_availability

        instrument_hub(store, federation_availability(s.kubernetes.mig_strategy,
                                                                 [site.name for site in s.kubernetes.sites]),
                                  pod_gpu_use(s.kubernetes.gpu_metrics_url))
    trust_provided_tokens(c, provided)
    add_services(c, services)
    add_roles(c, roles)

    if s.spawner == "local":  # name the limits, process bounds and disk quotas in force at start-up
        from .spawners.local import disk_quota_support, limit_backend

        limit_backend(str(s.homes_dir.resolve()), s.max_processes)
        if s.preforked_servers:  # from the hub's main thread, so it warms up while the hub starts
            from .spawners.local import zygote_for

            zygote_for(str(s.homes_dir.resolve()), str(s.hub_dir.resolve())).start()
        disk_quota_support(str(s.homes_dir.resolve()), str(s.hub_dir.resolve()), parse_bytes(s.disk_quota))

    running_as_root = os.geteuid() == 0
    if s.isolation == "single-account" or (s.isolation == "auto" and not running_as_root):
        log.warning(
            "SINGLE-ACCOUNT DEVELOPMENT MODE: the hub is not root, so every user's server runs as %s "
            "and users are not isolated from each other. Run the hub as root for per-user accounts.",
            os.environ.get("USER", "this account"),
        )
    follow_profile_files(store)


def configure_kube_spawner(c, s: Settings) -> None:
    """Users' servers as pods of a cluster, the rest of the platform on this machine."""
    from .spawners.kube import KubeProfileSpawner

    k = s.kubernetes
    if k.default_kubeconfig:
        os.environ["KUBECONFIG"] = str(k.default_kubeconfig)  # read by KubeSpawner's client in this process
    c.JupyterHub.spawner_class = KubeProfileSpawner
    c.JupyterHub.hub_connect_ip = k.hub_connect_ip
    kp = c.KubeProfileSpawner
    kp.namespace = k.namespace
    kp.image = k.image
    kp.mig_strategy = k.mig_strategy
    kp.gpu_runtime_class = k.gpu_runtime_class
    kp.cmd = ["jupyterhub-singleuser"]
    kp.port = 8888
    kp.start_timeout = s.spawn_timeout
    # KubeSpawner gives each API call 3 s and retries for 30 s: too little for a busy or distant
    # API server (measured: spawns and stops failed at 1,000 nodes on 2 cores)
    kp.k8s_api_request_timeout = 10
    kp.k8s_api_request_retry_timeout = 60
    if k.sites:
        kp.sites = {site.name: site.connection() for site in k.sites}
        log.info("Users' servers run as pods in namespace %s at %d sites: %s", k.namespace, len(k.sites),
                 ", ".join(site.name for site in k.sites))
    else:
        log.info("Users' servers run as pods in namespace %s of the cluster in %s", k.namespace,
                 k.kubeconfig or os.environ.get("KUBECONFIG", "the in-cluster config"))


K8S_PROXY_URL = "http://proxy-public"  # z2jh's proxy Service, in-cluster
K8S_GATEWAY_ADDRESS = f"{K8S_PROXY_URL}/services/dask-gateway"
K8S_GATEWAY_PROXY = "gateway://traefik-dask-gateway:80"  # the Dask Gateway chart's Traefik (release dask-gateway)
K8S_DATA_CONFIG = "/etc/mlaas/data/xcache.json"  # the mlaas-data ConfigMap of charts/mlaas-hub


def k8s_gateway_client_env(address: str = K8S_GATEWAY_ADDRESS, proxy: str = K8S_GATEWAY_PROXY) -> dict[str, str]:
    """What `Gateway()` in a user's pod needs to work with no arguments (the Dask Gateway chart)."""
    return {
        "DASK_GATEWAY__ADDRESS": address,
        "DASK_GATEWAY__PROXY_ADDRESS": proxy,
        "DASK_GATEWAY__PUBLIC_ADDRESS": gateway.PREFIX + "/",
        "DASK_GATEWAY__AUTH__TYPE": "jupyterhub",
        **DASK_LAB_ENV,
    }


def k8s_data_env(data_config: str | Path) -> dict[str, str]:
    """`MLAAS_XCACHE` for users' pods from the chart's mlaas-data ConfigMap (the site's caches)."""
    from .xcache import CACHE_CLIENT_ENV

    path = Path(data_config)
    if not path.is_file():
        log.warning("No cache map at %s (charts/mlaas-hub ConfigMap mlaas-data): mlaas.data reads origins directly",
                    path)
        return {}
    return {"MLAAS_XCACHE": path.read_text().strip(), **CACHE_CLIENT_ENV}


def configure_kubernetes(c, profiles_dir: str = "/etc/mlaas/profiles", state_dir: str = "/srv/jupyterhub",
                         sites: dict[str, Any] | None = None, dask_gateway: bool = True,
                         gateway_address: str = K8S_GATEWAY_ADDRESS, gateway_proxy: str = K8S_GATEWAY_PROXY,
                         data_config: str | Path = K8S_DATA_CONFIG, profiles_configmap: str = "mlaas-profiles",
                         gpu_metrics_url: str | None = None, gpu_cull_every: int = 30) -> None:
    """The mlaas parts of a hub deployed with Zero to JupyterHub (charts/values/jupyterhub.yaml).

    The chart configures the hub, proxy and database; this adds the profile spawner, the AAI
    authenticator (its URLs and client come from the site's values), the platform's REST API,
    group projects and the profile watcher, the Dask Gateway's client settings and its access
    scope for users (the service itself is `hub.services.dask-gateway` in the values), and the
    site's cache map for users' pods, and experiment tracking where the site's values register
    the chart's tracking component (`hub.services.mlflow`). Everything is *added* to what z2jh and the site's values set
    (roles such as the idle culler's, services, template variables, singleuser.extraEnv).
    The profile files in force are those `mlaas deploy` put in the `profiles_configmap`
    ConfigMap (mounted at `profiles_dir`, which seeds them at the first start) overlaid by the
    admins' live edits (its `-live` ConfigMap, written by the admin service, which runs in the
    hub's pod): both are followed through the API. `sites`
    (name -> kubeconfig path, or "in-cluster" for the hub's own cluster, or a dict of
    `SiteConnection`'s fields: kubeconfig, serversUrl, ingressClassName, hubUrl) makes it a
    federation of several clusters (docs/deploy.md §8).
    """
    from .spawners.kube import KubeProfileSpawner

    logscrub.install()
    snapshot = str(Path(state_dir) / "profiles.last-good.json")
    live = in_cluster() and profiles_configmap
    if live:  # the deployed files and the admins' live edits, through the API (mlaas.profiles.configmap)
        profiles_dir = follow_profile_configmaps(profiles_dir, Path(state_dir) / "profiles", profiles_configmap)
    store = profile_store(profiles_dir, snapshot)
    c.JupyterHub.spawner_class = KubeProfileSpawner
    c.ProfileSpawnerMixin.profiles_dir = profiles_dir
    c.ProfileSpawnerMixin.profiles_snapshot = snapshot
    c.JupyterHub.authenticator_class = MLaaSAuthenticator
    for key, value in claim_settings(OidcSettings()).items():
        if key not in c.MLaaSAuthenticator:  # the site's hub.config comes first
            c.MLaaSAuthenticator[key] = value
    c.MLaaSAuthenticator.manage_groups = True  # groups come from the AAI on both hubs
    c.MLaaSAuthenticator.accounts_db = str(Path(state_dir) / "accounts.sqlite")  # identities bound to names
    tracking = chart_tracking_service(c.JupyterHub.services)
    c.JupyterHub.extra_handlers.extend(profile_api_handlers(
        profiles_dir, snapshot, gpu_metrics_url=gpu_metrics_url, tracking_service=tracking and tracking["name"]))
    roles = configure_projects(c, store)
    environment = k8s_data_env(data_config)
    if dask_gateway:
        roles.extend(gateway_roles_and_scopes(c))
        environment.update(k8s_gateway_client_env(gateway_address, gateway_proxy))
    if tracking is not None:  # the chart's component: servers reach it by its Service
        roles.extend(service_for_users(c, tracking["name"]))
        c.ProfileSpawnerMixin.tracking_url = tracking_url(tracking["url"])
    else:
        log.warning("Experiment tracking is off: the site's values register no hub.services.%s", TRACKING_SERVICE)
    if live:  # admins edit the profiles live (the live ConfigMap); it runs in the hub's pod
        env = {k: os.environ[k] for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT") if k in os.environ}
        env.update(MLAAS_STATE_DIR=state_dir, MLAAS_ADMIN_BIND=f"http://0.0.0.0:{K8S_ADMIN_PORT}",
                   MLAAS_ADMIN_CONFIGMAPS=f"{profiles_configmap},{live_configmap(profiles_configmap)}")
        add_services(c, [admin_service(f"http://hub:{K8S_ADMIN_PORT}", env)])
        roles.append(ADMIN_SERVICE_ROLE)
    if gpu_metrics_url:  # GPU-aware idle culling from the DCGM exporter's series (mlaas.gpu_culler)
        add_services(c, [gpu_culler.culler_service(gpu_cull_every, K8S_PROXY_URL)])
        roles.append(dict(gpu_culler.ROLE))
    warn_if_gpu_idle_unenforced(store, bool(gpu_metrics_url))
    add_roles(c, roles)
    add_server_environment(c, environment, "KubeSpawner")
    if sites:
        c.KubeProfileSpawner.sites = dict(sites)
    from .spawners.kube import federation_availability

    strategy = c.KubeProfileSpawner.mig_strategy if "mig_strategy" in c.KubeProfileSpawner else "mixed"
    instrument_hub(store, federation_availability(strategy, list(sites or {})), pod_gpu_use(gpu_metrics_url))
    follow_profile_files(store)
