"""A site deployed the way a site admin deploys it, for tests: `mlaas deploy` of a site directory
(our chart, Zero to JupyterHub 4.4.0 and Dask Gateway 2026.3.0 from the chart mirror) into a test
cluster whose every pod runs as a real process (tests/cluster/kubelet.py).

Around the cluster, what a site has outside it: its AAI (the development OIDC provider), a data
origin (an XRootD server with a test file), storage classes (tests/cluster/provisioner.py) and a
load balancer that gives the public Service its address (tests/cluster/services.py). The site
directory is charts/sites/site-a with the test's own names and addresses in place of the site's
(no TLS: the test cluster has no certificates a browser trusts)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from cluster.cluster import Cluster, binaries, pod_range
from cluster.images import Images, image_programs
from cluster.kubelet import Kubelet
from cluster.provisioner import Provisioner
from cluster.services import ServiceNetwork
from helpers import FIXTURES, deep_merge, free_port
from mlaas.dev_idp import ensure_passwords
from mlaas.hubconfig import OPS_SCOPES
from mlaas.xcache import origin_process

REPO = Path(__file__).resolve().parents[1]
SITE_A = REPO / "charts" / "sites" / "site-a"
NAMESPACE = "mlaas"
TEST_FILE = "/store/demo/deployment/hello.txt"
TEST_CONTENT = b"read through the site's XCache\n"
CULL_TIMEOUT = 120  # seconds


class Deployment:
    """Duck-types the parts of helpers.RunningPlatform the shared helpers use (url, api, password)."""

    def __init__(self, state: Path, charts_dir: Path, nodes: dict | None = None, profiles: Path | None = None,
                 hub_values: dict | None = None, stub_servers: bool = False):
        """`nodes` (default tests/cluster/nodes.yaml), `profiles` (a directory instead of the
        site's profile files), `hub_values` (merged into the site's jupyterhub.yaml) and
        `stub_servers` (users' servers answer readiness only: benchmarks) adapt the site."""
        self.state, self.charts_dir = state, charts_dir
        self.nodes, self.profiles, self.hub_values = nodes, profiles, hub_values or {}
        self.stub_servers = stub_servers
        self.cluster = Cluster("deploy", state / "cluster", binaries(), pod_cidr=pod_range(10))
        self.ops_token = secrets.token_hex(24)
        self.metrics_token = secrets.token_hex(24)  # the site's Prometheus' (docs/deploy.md "Monitoring")
        self.procs: list[subprocess.Popen] = []
        self.stoppers: list = []

    # --- what the helpers use -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.public_ip}"

    def api(self, token: str | None = None) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"token {token or self.ops_token}"
        return s

    def password(self, username: str) -> str:
        return yaml.safe_load(self.passwords_file.read_text())["passwords"][username]

    # --- bring-up -------------------------------------------------------------------------------
    def start(self) -> Deployment:
        c = self.cluster
        c.start(REPO / "tests" / "cluster" / "nodes.yaml" if self.nodes is None else None)
        if self.nodes is not None:
            c.add_nodes(self.nodes)
        self.stoppers.append(c.stop)
        self.public_ip = str(__import__("ipaddress").ip_network(c.pod_cidr).broadcast_address - 1)
        provisioner = Provisioner(c, self.state / "volumes")
        for name, default in [("standard", True), ("cephfs", False), ("local-nvme", False)]:
            provisioner.storage_class(name, default)  # the default class, and the site's own classes
        self.stoppers.append(provisioner.start().stop)
        self.network = ServiceNetwork(c, self.state / "network").start()
        self.stoppers.append(self.network.stop)
        images = Images(image_programs())
        for image in ("ghcr.io/mlaas-hub/hub", "ghcr.io/mlaas-hub/user-cpu", "ghcr.io/mlaas-hub/gateway",
                      "ghcr.io/dask/dask-gateway-server", "ghcr.io/mlaas-hub/tracking"):
            images.get(image)  # built before the pods need them (a node pulls images before a pod runs)
        stub = {"component": "singleuser-server"} if self.stub_servers else False
        self.kubelet = Kubelet(c, images, self.state / "kubelet", self.network, stub=stub).start()
        self.stoppers.append(self.kubelet.stop)
        c.request("POST", "/api/v1/namespaces", {"metadata": {"name": "gpu-operator"}})  # the site's GPU operator
        self._origin()
        self._idp()
        self.site = self._site()
        self.deploy()
        self.wait_hub()
        return self

    def deploy(self, profiles: Path | None = None) -> str:
        """`mlaas deploy` of the site (again), as its admin runs it; `profiles`: new profile files."""
        if profiles is not None:
            spec = yaml.safe_load((self.site / "site.yaml").read_text())
            spec["profiles"] = [str(profiles)]
            (self.site / "site.yaml").write_text(yaml.safe_dump(spec))
        c = self.cluster
        env = {**os.environ, "KUBECONFIG": str(c.kubeconfig), "PATH": f"{c.bin}:{os.environ['PATH']}",
               "MLAAS_STATE_DIR": str(self.state / "mlaas")}
        mlaas = Path(sys.executable).parent / "mlaas"
        r = subprocess.run([str(mlaas), "deploy", str(self.site), "--charts-dir", str(self.charts_dir)],
                           env=env, capture_output=True, text=True, timeout=600)
        self.deploy_output = r.stdout + r.stderr
        if r.returncode != 0:
            raise RuntimeError(f"mlaas deploy failed:\n{self.deploy_output[-4000:]}")
        if profiles is not None:  # an upgrade: wait, as an admin does, until its rollouts are done
            self.wait_rollouts()
            self.wait_hub()
        return self.deploy_output

    def wait_rollouts(self, timeout: float = 180) -> None:
        """Every Deployment of the namespace rolled out: new pods ready, old ones gone
        (`kubectl rollout status`)."""
        def done() -> bool:
            for d in self.cluster.request("GET", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments")["items"]:
                st, want = d.get("status") or {}, d["spec"].get("replicas", 1)
                if st.get("observedGeneration", 0) < d["metadata"]["generation"] or \
                        st.get("updatedReplicas", 0) != want or st.get("replicas", 0) != want or \
                        st.get("availableReplicas", 0) != want:
                    return False
            return True

        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the upgrade's rollouts did not finish")
            time.sleep(1)

    def wait_hub(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                r = requests.get(f"{self.url}/hub/health", timeout=5)
                # and its services: the admin page (a hub service in the hub's pod) answers, by a redirect to sign in
                admin = requests.get(f"{self.url}/services/mlaas-admin/", timeout=5, allow_redirects=False)
                if r.status_code == 200 and admin.status_code < 500:
                    return
                last = f"HTTP {r.status_code}, admin page HTTP {admin.status_code}"
            except requests.RequestException as e:
                last = type(e).__name__
            time.sleep(1)
        raise TimeoutError(f"the hub did not answer through proxy-public ({self.url}) in {timeout}s: {last}\n"
                           f"{self.kubelet_log('hub')[-3000:]}")

    def pid(self, component: str) -> int:
        """The process of the first container of the pod labelled `component` (e.g. hub)."""
        for uid, running in self.kubelet.pods.items():
            labels = getattr(running, "meta", {}).get("labels") or {}
            if labels.get("component") == component and running.containers and running.containers[0].pid:
                return running.containers[0].pid
        raise LookupError(f"no running {component} pod")

    def kubelet_log(self, component: str) -> str:
        """The logs of the pods whose names start with `component`."""
        logs = sorted((self.kubelet.state / "logs").glob(f"{NAMESPACE}_{component}*"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}" for p in logs)

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            try:
                stop()
            except Exception as e:  # keep stopping the rest
                print(f"deployment stop: {e}", file=sys.stderr)
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    # --- the site's surroundings ----------------------------------------------------------------
    def _origin(self) -> None:
        self.origin_port = free_port()
        data = self.state / "origin-data"
        target = data / TEST_FILE.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(TEST_CONTENT)
        origin = origin_process("deploy-demo", self.origin_port, data, self.state / "origin")
        origin.start()
        self.stoppers.append(origin.stop)

    def _idp(self) -> None:
        self.idp_port = free_port()
        secrets_dir = self.state / "idp"
        secrets_dir.mkdir(parents=True, exist_ok=True)
        self.client_secret = secrets.token_hex(24)
        (secrets_dir / "client-secret").write_text(self.client_secret)
        self.passwords_file = secrets_dir / "passwords.yaml"
        ensure_passwords(FIXTURES / "idp-users.yaml", self.passwords_file)
        env = {**os.environ, "MLAAS_IDP_PORT": str(self.idp_port), "MLAAS_IDP_USERS": str(FIXTURES / "idp-users.yaml"),
               "MLAAS_IDP_PASSWORDS": str(self.passwords_file), "MLAAS_IDP_CLIENT_ID": "mlaas-deploy-test",
               "MLAAS_IDP_CLIENT_SECRET_FILE": str(secrets_dir / "client-secret"),
               "MLAAS_IDP_REDIRECT_URIS": f"{self.url}/hub/oauth_callback"}
        log = open(self.state / "idp.log", "ab")
        proc = subprocess.Popen([shutil.which("node") or "node", str(REPO / "hub" / "dev_idp" / "server.mjs")],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{self.idp_port}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise TimeoutError("the development IdP did not start")

    def _site(self) -> Path:
        """Site A's directory with this test's AAI, addresses, data origin and small sizes."""
        site = self.state / "site"
        shutil.copytree(SITE_A, site, dirs_exist_ok=True)
        idp = f"http://127.0.0.1:{self.idp_port}"
        spec = yaml.safe_load((site / "site.yaml").read_text())
        spec["namespace"] = NAMESPACE
        if self.profiles is not None:
            spec["profiles"] = [str(self.profiles)]
        (site / "site.yaml").write_text(yaml.safe_dump(spec))
        values = yaml.safe_load((site / "values.yaml").read_text())
        values["site"] = "deploy-test"
        values["projects"]["size"] = "1Gi"
        values["xcache"].update(ram="1g", storage={"size": "2Gi", "storageClassName": "local-nvme"},
                                resources={"requests": {"cpu": "100m", "memory": "256Mi"}},
                                origins=[{"name": "demo", "url": f"root://127.0.0.1:{self.origin_port}",
                                          "namespace": "/store/demo"}])
        values["tracking"] = {"storage": {"size": "1Gi"}, "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}
        (site / "values.yaml").write_text(yaml.safe_dump(values))
        hub = {
            "proxy": {"https": {"enabled": False}, "service": {"loadBalancerIP": self.public_ip}},
            "hub": {
                "config": {"JupyterHub": {"last_activity_interval": 10, "public_url": f"{self.url}/"},
                           "MLaaSAuthenticator": {
                    "client_id": "mlaas-deploy-test", "client_secret": self.client_secret,
                    "oauth_callback_url": f"{self.url}/hub/oauth_callback",
                    "authorize_url": f"{idp}/auth", "token_url": f"{idp}/token", "userdata_url": f"{idp}/me",
                    "allowed_groups": ["ml-users", "atlas-ml", "cms-gpu", "mlaas-admins"],
                    "admin_groups": ["mlaas-admins"],
                }},
                # the test's automation token, as a site admin would register one
                "services": {"mlaas-ops": {"apiToken": self.ops_token},
                             "mlaas-metrics": {"apiToken": self.metrics_token}},
                "loadRoles": {"mlaas-ops": {"scopes": list(OPS_SCOPES), "services": ["mlaas-ops"]},
                              "mlaas-metrics": {"scopes": ["read:metrics", "access:services!service=dask-gateway"],
                                                "services": ["mlaas-metrics"]}},
            },
            # activity reaches the hub every 10 s (z2jh: 5 min), so a short cull timeout culls only the idle
            "singleuser": {"extraEnv": {"JUPYTERHUB_ACTIVITY_INTERVAL": "10"}},
            "cull": {"enabled": True, "timeout": CULL_TIMEOUT, "every": 10},
        }
        (site / "jupyterhub.yaml").write_text(yaml.safe_dump(deep_merge(hub, self.hub_values)))
        return site
