"""Services by name and port, as CoreDNS and kube-proxy give them to pods (test tooling, root).

- Names: each pod's hosts file (bind-mounted at /etc/hosts by the kubelet) maps its own
  hostname to its IP, as a kubelet writes it, and `svc`, `svc.ns`, `svc.ns.svc` and
  `svc.ns.svc.cluster.local` to each Service's ClusterIP (headless Services: to their
  endpoints). Rewritten in place on change, so running pods see new Services as through DNS.
- Traffic: iptables NAT rules in the OUTPUT chain (kube-proxy's iptables mode, for a node whose
  pods share its network) turn ClusterIP:port into a ready endpoint's IP and target port, one
  endpoint chosen at random per connection; the same rules in PREROUTING serve connections that
  arrive from another machine (tests/cluster/netns.py) at a load balancer's address. The
  `kubernetes` Service leads to the API server.

- Load balancers: a Service of type LoadBalancer gets its `spec.loadBalancerIP` (or the next
  free address at the top of the pod range) as its external IP in its status, as a site's load
  balancer (e.g. MetalLB) reports it, and the same NAT rules for that address.

The Service and pod ranges have local routes (tests/cluster/cluster.py) in the cluster's network
namespace (this machine's, or the one of a remote site: `Cluster.netns`)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import threading
import zlib
from pathlib import Path

from .cluster import Cluster
from .follow import follow, thread


class ServiceNetwork:
    def __init__(self, cluster: Cluster, state: Path):
        self.cluster, self.state = cluster, state
        self.hosts_dir = state / "hosts"
        self.chain = f"MLAAS-SVC-{zlib.crc32(cluster.name.encode()):08X}"[:28]
        self._services: dict[str, dict] = {}
        self._endpoints: dict[str, dict] = {}
        self._pods: dict[str, tuple[str, str, list[str]]] = {}  # pod uid -> namespace, IP, its names
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> ServiceNetwork:
        self.hosts_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.hosts_dir, 0o755)
        ipt = self._iptables
        ipt("-t", "nat", "-N", self.chain, check=False)
        ipt("-t", "nat", "-F", self.chain)
        for hook in HOOKS:
            if ipt("-t", "nat", "-C", hook, "-j", self.chain, check=False).returncode != 0:
                ipt("-t", "nat", "-A", hook, "-j", self.chain)
        self._threads = [
            thread("services", lambda: follow(self.cluster, "/api/v1/services", self._on_services, self._stop)),
            thread("endpoints", lambda: follow(self.cluster, "/api/v1/endpoints", self._on_endpoints, self._stop)),
        ]
        return self

    def stop(self) -> None:
        self._stop.set()
        for hook in HOOKS:
            self._iptables("-t", "nat", "-D", hook, "-j", self.chain, check=False)
        self._iptables("-t", "nat", "-F", self.chain, check=False)
        self._iptables("-t", "nat", "-X", self.chain, check=False)

    def _iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _iptables(*args, check=check, netns=self.cluster.netns)

    def hosts_file(self, pod: dict) -> Path:
        """The pod's /etc/hosts, kept current until `forget` is called for it."""
        meta, spec = pod["metadata"], pod["spec"]
        hostname = spec.get("hostname") or meta["name"]
        names = [hostname]
        if spec.get("subdomain"):
            names.insert(0, f"{hostname}.{spec['subdomain']}.{meta['namespace']}.svc.cluster.local")
        with self._lock:
            self._pods[meta["uid"]] = (meta["namespace"], pod["status"]["podIP"], names)
            self._write_hosts()
        return self.hosts_dir / meta["uid"]

    def forget(self, uid: str) -> None:
        with self._lock:
            self._pods.pop(uid, None)
            (self.hosts_dir / uid).unlink(missing_ok=True)

    # --- state -----------------------------------------------------------------------------------
    def _on_services(self, objects: dict[str, dict]) -> None:
        self._services = {_key(o): o for o in objects.values()}
        for key, svc in self._services.items():
            if svc["spec"].get("type") == "LoadBalancer" and not _external_ips(svc):
                self._assign_load_balancer(key, svc)
        self._sync()

    def _assign_load_balancer(self, key: str, svc: dict) -> None:
        taken = {ip for s in self._services.values() for ip in _external_ips(s)}
        top = int(ipaddress.ip_network(self.cluster.pod_cidr).broadcast_address)
        ip = svc["spec"].get("loadBalancerIP") or next(
            str(ipaddress.ip_address(top - i)) for i in range(1, 256) if str(ipaddress.ip_address(top - i)) not in taken)
        ns, name = key.split("/")
        patch = {"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}}
        self.cluster.request("PATCH", f"/api/v1/namespaces/{ns}/services/{name}/status", patch,
                             content_type="application/merge-patch+json")

    def _on_endpoints(self, objects: dict[str, dict]) -> None:
        self._endpoints = {_key(o): o for o in objects.values()}
        self._sync()

    def _sync(self) -> None:
        with self._lock:
            self._write_hosts()
            self._write_rules()

    def _addresses(self, key: str) -> list[str]:
        eps = self._endpoints.get(key) or {}
        return [a["ip"] for s in eps.get("subsets") or [] for a in s.get("addresses") or []]

    def _write_hosts(self) -> None:
        entries: list[tuple[str, str, list[str]]] = []  # (namespace, ip, names)
        for key, svc in self._services.items():
            ns, name = key.split("/")
            ip = svc["spec"].get("clusterIP")
            ips = self._addresses(key) if ip in (None, "", "None") else [ip]
            entries += [(ns, i, [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]) for i in ips]
        for uid, (namespace, pod_ip, own) in self._pods.items():
            lines = ["127.0.0.1\tlocalhost", f"{pod_ip}\t{' '.join(own)}"]
            for ns, ip, names in sorted(entries):
                lines.append(f"{ip}\t{' '.join(names if ns == namespace else names[1:])}")
            text = "\n".join(lines) + "\n"
            path = self.hosts_dir / uid
            if not path.exists() or path.read_text() != text:
                with open(path, "r+" if path.exists() else "w") as f:  # in place: bind mounts keep the inode
                    f.seek(0)
                    f.write(text)
                    f.truncate()
                os.chmod(path, 0o644)

    def _write_rules(self) -> None:
        rules = [f":{self.chain} - [0:0]"]
        for key, svc in sorted(self._services.items()):
            ip = svc["spec"].get("clusterIP")
            if ip in (None, "", "None"):
                continue
            for port in svc["spec"].get("ports") or []:
                if port.get("protocol", "TCP") != "TCP":
                    continue
                targets = self._targets(key, svc, port)
                for address in [ip, *_external_ips(svc)]:
                    for i, (ep, target) in enumerate(targets):
                        match = f"-A {self.chain} -d {address}/32 -p tcp --dport {port['port']}"
                        left = len(targets) - i
                        chance = f" -m statistic --mode random --probability {1 / left:.5f}" if left > 1 else ""
                        rules.append(f"{match}{chance} -j DNAT --to-destination {ep}:{target}")
        text = "*nat\n" + "\n".join(rules) + "\nCOMMIT\n"
        r = subprocess.run([*in_network(self.cluster.netns), "iptables-restore", "--noflush"], input=text,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"services: iptables-restore: {r.stderr.strip()}", flush=True)

    def _targets(self, key: str, svc: dict, port: dict) -> list[tuple[str, int]]:
        if key == "default/kubernetes":  # the API server, outside the pod network
            return [(self.cluster.address, self.cluster.port)]
        eps = self._endpoints.get(key) or {}
        out = []
        for subset in eps.get("subsets") or []:
            ports = {p.get("name", ""): p["port"] for p in subset.get("ports") or []}
            target = ports.get(port.get("name", ""), next(iter(ports.values()), None))
            if target is None:
                continue
            out += [(a["ip"], target) for a in subset.get("addresses") or []]
        return out


def _external_ips(svc: dict) -> list[str]:
    return [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or [] if i.get("ip")]


def _key(obj: dict) -> str:
    return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"


HOOKS = ("OUTPUT", "PREROUTING")


def in_network(netns: str) -> list[str]:
    """The command prefix that runs a program in a named network namespace ("": this one)."""
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


def _iptables(*args: str, check: bool = True, netns: str = "") -> subprocess.CompletedProcess:
    r = subprocess.run([*in_network(netns), "iptables", "-w", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {r.stderr.strip()}")
    return r


def service_env(services: list[dict], namespace: str, kubernetes: tuple[str, int]) -> dict[str, str]:
    """The variables a kubelet gives every container for the Services of its namespace (service
    links) and for the API server (KUBERNETES_SERVICE_HOST/PORT)."""
    env: dict[str, str] = {}
    for svc in services:
        ip = svc["spec"].get("clusterIP")
        if svc["metadata"]["namespace"] != namespace or ip in (None, "", "None"):
            continue
        name = svc["metadata"]["name"].upper().replace("-", "_")
        ports = [p for p in svc["spec"].get("ports") or []]
        if not ports:
            continue
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{name}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
        for p in ports:
            if p.get("name"):
                env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            proto = p.get("protocol", "TCP")
            prefix = f"{name}_PORT_{p['port']}_{proto}"
            env.update({prefix: f"{proto.lower()}://{ip}:{p['port']}", f"{prefix}_PROTO": proto.lower(),
                        f"{prefix}_PORT": str(p["port"]), f"{prefix}_ADDR": ip})
    host, port = kubernetes
    env.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=str(port), KUBERNETES_SERVICE_PORT_HTTPS=str(port),
               KUBERNETES_PORT=f"tcp://{host}:{port}")
    return env
