"""A real Kubernetes control plane on loopback with simulated (KWOK) nodes, for tests and
`make k8s-up` (test tooling, not product).

etcd, kube-apiserver (Pod Security and ResourceQuota admission on), kube-controller-manager and
kube-scheduler are the real programs, built by tests/cluster/build.sh. KWOK fakes the nodes
described in a YAML file (pools: count, cpu, memory, extended resources such as nvidia.com/gpu
and nvidia.com/mig-*, labels, taints) and marks scheduled pods Running, with pod IPs on
loopback (127.x). Several clusters run side by side on different ports, one per site.

    python tests/cluster/cluster.py up --name site-a [--nodes nodes.yaml] [--port 6443]
    python tests/cluster/cluster.py down --name site-a
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


_handed_out: set[int] = set()


def free_port() -> int:
    """A port no server of this machine listens on, below the kernel's range for outgoing
    connections: a port from that range (what binding port 0 gives) can be taken by any client's
    connection before the server that was meant to get it binds it (a platform failed to start so)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, max(10001, low))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def pod_range(index: int) -> str:
    """The pod IP range of the `index`-th cluster running side by side.

    As root: a /20 of 198.18.0.0/15 (set aside for network tests, RFC 2544), made local to this
    machine by a `local` route on lo, so pods' servers can listen on their IPs and Services get
    endpoints (the API refuses loopback addresses in Endpoints). Without root: 127.<index+1>.0.0/16
    on loopback; everything works except Services' endpoints."""
    if os.geteuid() == 0:
        return str(ipaddress.ip_network("198.18.0.0/20").network_address + (index % 16) * 4096) + "/20"
    return f"127.{index % 200 + 1}.0.0/16"


def service_range(pod_cidr: str) -> str:
    """The Service (ClusterIP) range that goes with a pod range: the same /20 of 198.19.0.0/16, so
    every address a test cluster uses stays inside 198.18.0.0/15 (never a private range)."""
    net = ipaddress.ip_network(pod_cidr)
    offset = int(net.network_address) - int(ipaddress.ip_address("198.18.0.0")) if not net.is_loopback else \
        (int(net.network_address) >> 16 & 0xFF) * 4096
    return f"{ipaddress.ip_address('198.19.0.0') + offset % 65536}/20"


def in_range(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def local_route(cidr: str, add: bool, netns: str = "") -> None:
    """Make a non-loopback pod range local to this machine (root only), or to the network
    namespace `netns` (another machine, tests/cluster/netns.py), or undo it."""
    if ipaddress.ip_network(cidr).is_loopback:
        return
    action = ["replace"] if add else ["del"]
    where = ["-n", netns] if netns else []
    r = subprocess.run(["ip", *where, "route", *action, "local", cidr, "dev", "lo"], capture_output=True, text=True)
    if add and r.returncode != 0:
        raise RuntimeError(f"cannot make the pod range {cidr} local (ip route: {r.stderr.strip()})")


def binaries() -> Path:
    """Build (or find in the cache) the pinned binaries; return their directory."""
    out = subprocess.run(["bash", str(HERE / "build.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class Cluster:
    name: str
    state: Path
    bin: Path
    port: int = 0
    pod_cidr: str = ""  # default: pod_range(0)
    service_cidr: str = ""  # default: service_range(pod_cidr)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    apiserver_args: list[str] = field(default_factory=list)
    # Another machine's cluster (tests/cluster/netns.py): its pods' network namespace, and the
    # address of its API server that both the hub's machine and its pods reach.
    netns: str = ""
    address: str = "127.0.0.1"

    @property
    def kubeconfig(self) -> Path:
        return self.state / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.port}"

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, nodes_file: Path | None = None, timeout: float = 120) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(exist_ok=True)
        shutil.rmtree(self.state / "etcd", ignore_errors=True)  # every start is a fresh cluster
        self.port = self.port or free_port()
        self.pod_cidr = self.pod_cidr or pod_range(0)
        self.service_cidr = self.service_cidr or service_range(self.pod_cidr)
        local_route(self.pod_cidr, add=True, netns=self.netns)
        local_route(self.service_cidr, add=True, netns=self.netns)  # Service IPs land here; the kube-proxy stand-in forwards them
        token = secrets.token_hex(16)
        (self.state / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
        key = self.state / "sa.key"
        if not key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(self.state / "sa.pub")],
                           check=True, capture_output=True)
        self._write_kubeconfig(token)
        self._serving_certificate()
        etcd_port, peer_port = free_port(), free_port()
        self._run("etcd", [
            "--name", self.name, "--data-dir", str(self.state / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"{self.name}=http://127.0.0.1:{peer_port}",
            "--quota-backend-bytes", str(2 * 2**30), "--log-level", "warn",
        ])
        self.apiserver_args = [
            "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
            "--bind-address", self.address, "--advertise-address", self.address, "--secure-port", str(self.port),
            "--tls-cert-file", str(self.state / "pki" / "apiserver.crt"),
            "--tls-private-key-file", str(self.state / "pki" / "apiserver.key"),
            "--token-auth-file", str(self.state / "tokens.csv"),
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,ResourceQuota,"
                                          "DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
            "--service-account-key-file", str(self.state / "sa.pub"),
            "--service-account-signing-key-file", str(key),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-cluster-ip-range", self.service_cidr,
            "--allow-privileged=false",
            "--storage-backend", "etcd3",
            "-v", "1",
        ]
        self._run("kube-apiserver", self.apiserver_args)
        self.wait_ready(timeout)
        common = ["--kubeconfig", str(self.kubeconfig), "--leader-elect=false"]
        self._run("kube-controller-manager", [
            *common, "--service-account-private-key-file", str(key), "--use-service-account-credentials=false",
            "--root-ca-file", str(self.ca_file),  # published to every namespace as kube-root-ca.crt
            "--controllers", "*,-nodeipam,-ttl,-cloud-node-lifecycle",
            # KWOK renews nodes' leases from one process; on 2 busy cores a renewal can come late
            "--node-monitor-grace-period", "3m",
            "--secure-port", "0", "--cluster-name", self.name,
        ])
        self._run("kube-scheduler", [*common, "--secure-port", "0"])
        self._run("kwok", [
            "--kubeconfig", str(self.kubeconfig),
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr", self.pod_cidr, "--node-ip", "127.0.0.1",
            # renew each node's Lease, as a kubelet does: without it the node controller takes the
            # nodes for gone after the grace period and marks every pod on them not ready
            "--node-lease-duration-seconds", "40",
            "--server-address", "127.0.0.1:0",
        ])
        if nodes_file is not None:
            self.add_nodes(yaml.safe_load(Path(nodes_file).read_text()))
        (self.state / "pids.json").write_text(json.dumps({**{n: p.pid for n, p in self.procs.items()},
                                                          "pod_cidr": self.pod_cidr, "service_cidr": self.service_cidr}))

    def stop(self) -> None:
        for name in ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]:
            proc = self.procs.pop(name, None)
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.pod_cidr:
            local_route(self.pod_cidr, add=False, netns=self.netns)
        if self.service_cidr:
            local_route(self.service_cidr, add=False, netns=self.netns)

    def apply_crds(self, path: Path, timeout: float = 30) -> None:
        """Create the CustomResourceDefinitions of a YAML file and wait until they are served."""
        for crd in yaml.safe_load_all(Path(path).read_text()):
            self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        deadline = time.monotonic() + timeout
        for crd in yaml.safe_load_all(Path(path).read_text()):
            name = crd["metadata"]["name"]
            while True:
                got = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
                if any(c["type"] == "Established" and c["status"] == "True" for c in got.get("status", {}).get("conditions", [])):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {name} not established")
                time.sleep(0.2)

    def stop_apiserver(self) -> None:
        """The site's API server goes away at once, as in a crash or a network cut (a graceful stop
        waits for open watches); the rest of the control plane keeps running."""
        proc = self.procs.pop("kube-apiserver")
        proc.kill()
        proc.wait(15)

    def start_apiserver(self, timeout: float = 60) -> None:
        self._run("kube-apiserver", self.apiserver_args)
        self.wait_ready(timeout)

    # --- helpers ----------------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.state / "pki" / "ca.crt"

    @property
    def kubernetes_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first address of the Service range."""
        return str(ipaddress.ip_network(self.service_cidr).network_address + 1)

    def _serving_certificate(self) -> None:
        """A cluster CA and the API server's certificate for every name a client uses: its address
        (the harness) and the `kubernetes` Service's IP and names (pods, through their mounted CA)."""
        pki = self.state / "pki"
        pki.mkdir(exist_ok=True)
        names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
                 "localhost"]
        ips = dict.fromkeys(["127.0.0.1", self.address, self.kubernetes_service_ip])
        san = ",".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{n}" for n in names)])
        run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
        if not (pki / "ca.key").exists():
            run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "ca.key"), "-out", str(self.ca_file),
                "-days", "30", "-subj", f"/CN={self.name}-ca")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pki / "apiserver.key"), "-out", str(pki / "apiserver.csr"),
            "-subj", "/CN=kube-apiserver")
        (pki / "san.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
        run("x509", "-req", "-in", str(pki / "apiserver.csr"), "-CA", str(self.ca_file), "-CAkey", str(pki / "ca.key"),
            "-CAcreateserial", "-out", str(pki / "apiserver.crt"), "-days", "30", "-extfile", str(pki / "san.ext"))

    def _run(self, name: str, args: list[str]) -> None:
        log = open(self.state / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([str(self.bin / name), *args], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _write_kubeconfig(self, token: str) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": self.name,
            "clusters": [{"name": self.name, "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": token}}],
            "contexts": [{"name": self.name, "context": {"cluster": self.name, "user": "admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        os.chmod(self.kubeconfig, 0o600)
        self._token = token

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig holding a ServiceAccount's own token (TokenRequest API): what a pod of the
        product would use, with exactly the permissions RBAC gives that account."""
        try:
            self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}})
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
        token = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                             {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                              "spec": {"expirationSeconds": 7200}})["status"]["token"]
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": self.name, "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": self.name, "user": name, "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        os.chmod(path, 0o600)
        return path

    def request(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json") -> dict:
        ctx = ssl._create_unverified_context()  # the apiserver's self-signed serving cert, loopback only
        req = urllib.request.Request(f"{self.server}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {self._token}", "Content-Type": content_type})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def watch(self, path: str, idle_timeout: float = 90):
        """The events of a watch request (`...?watch=1`), one dict per line, until the server ends it."""
        ctx = ssl._create_unverified_context()
        req = urllib.request.Request(f"{self.server}{path}", headers={"Authorization": f"Bearer {self._token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=idle_timeout) as r:
            for line in r:
                if line.strip():
                    yield json.loads(line)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}); see {self.state / 'logs' / (name + '.log')}")
            try:
                ctx = ssl._create_unverified_context()
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.3)
        raise TimeoutError(f"kube-apiserver of {self.name} not ready after {timeout}s: {last}")

    def add_nodes(self, spec: dict) -> list[str]:
        names = []
        for pool in spec.get("pools", []):
            for i in range(int(pool.get("count", 1))):
                name = f"{self.name}-{pool['name']}-{i}"
                capacity = {"cpu": str(pool["cpu"]), "memory": str(pool["memory"]), "pods": str(pool.get("pods", 110)),
                            **{k: str(v) for k, v in (pool.get("extended") or {}).items()}}
                node = {
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok",
                                   "mlaas.io/test-pool": pool["name"], **(pool.get("labels") or {})},
                    },
                    "spec": {"taints": pool.get("taints") or []},
                    "status": {"capacity": capacity, "allocatable": capacity},
                }
                self.request("POST", "/api/v1/nodes", node)
                names.append(name)
        return names


def alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM a process group, then SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--name", default="site-a")
    parser.add_argument("--nodes", default=str(HERE / "nodes.yaml"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pod-cidr", default="", help="pod IP range (default: one per name, see pod_range)")
    parser.add_argument("--state", default=str(REPO / "state" / "k8s"))
    args = parser.parse_args()
    state = Path(args.state) / args.name
    if args.action == "down":
        pids = json.loads((state / "pids.json").read_text()) if (state / "pids.json").exists() else {}
        for name in ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]:
            if name in pids:
                stop_group(pids[name])
        for cidr in (pids.get("pod_cidr"), pids.get("service_cidr")):
            if cidr:
                local_route(cidr, add=False)
        (state / "pids.json").unlink(missing_ok=True)
        print(f"stopped {args.name}")
        return 0
    if (state / "pids.json").exists():
        print(f"{args.name} seems to run already (state/k8s/{args.name}/pids.json); make k8s-down NAME={args.name}")
        return 1
    shutil.rmtree(state / "etcd", ignore_errors=True)
    cluster = Cluster(args.name, state, binaries(), port=args.port,
                      pod_cidr=args.pod_cidr or pod_range(zlib.crc32(args.name.encode())))
    started = time.monotonic()
    cluster.start(Path(args.nodes))
    print(f"{args.name}: {cluster.server} ready in {time.monotonic() - started:.1f}s")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
