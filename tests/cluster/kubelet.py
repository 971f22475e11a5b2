"""The test clusters' kubelet (test tooling, root): every container of every pod that KWOK marks
Running is started as a real process of this machine, and stopped when its pod goes away.

What a container gets, as on a node:
- its image's programs and files (tests/cluster/images.py: the image's Python environment built
  from the same requirement files, or the same program);
- its volumes at their container paths, in a private mount namespace of its own: ConfigMap,
  Secret, projected (the ServiceAccount token from the TokenRequest API, bound to the pod, with
  the cluster CA as `kube-root-ca.crt` publishes it, and the namespace), downwardAPI, emptyDir,
  PersistentVolumeClaim (the bound volume's directory, group-owned by the pod's fsGroup) and
  hostPath; `subPath` and `readOnly` are honoured. A missing mount point is made in an overlay of
  its nearest existing parent, so the machine's own directories stay as they are;
- its environment: the image's, the Services of its namespace (service links) and the API server,
  `envFrom` and `env` with `valueFrom` (Secret and ConfigMap keys, field and resource references)
  and `$(VAR)` expansion, also in its command and arguments;
- its Services by name (/etc/hosts of its namespace) and by ClusterIP (tests/cluster/services.py);
- its user: `runAsUser`/`runAsGroup`, `fsGroup` and `supplementalGroups` (setpriv), its hostname,
  its own PID namespace (stopping a container stops every process it started);
- init containers run first, in order; containers are restarted with a back-off like
  `restartPolicy: Always`.

Simulated: KWOK, not this code, reports the pods' status (Running and Ready as soon as they are
scheduled; no probes). Pods share their cluster's network namespace (this machine's, or another
machine's: tests/cluster/netns.py), so each program is told to listen on its pod's IP (see `listen_on`), and there is no kernel isolation between pods beyond
the mount and PID namespaces and the account (no cgroup limits, no seccomp). Images are environments built
from their requirement files, not pulled (none can be pulled here)."""

from __future__ import annotations

import base64
import math
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .cluster import Cluster
from .follow import follow, thread
from .images import ImageEnv, Images
from .services import ServiceNetwork, in_network, service_env



@dataclass
class Mount:
    source: str  # host path
    target: str  # container path
    read_only: bool = False
    make_source: bool = False  # a subPath directory: made (as root) when the container starts, as a kubelet does


class PodError(Exception):
    """A pod that cannot start yet (a missing Secret, an unbound claim): retried on the next event."""


class Kubelet:
    def __init__(self, cluster: Cluster, images: Images, state: Path, network: ServiceNetwork,
                 namespace: str | None = None, selector: str = "", stub: bool | dict[str, str] = False):
        """`namespace`/`selector`: only those pods. `stub` (benchmarks with hundreds of pods, which
        2 cores cannot run as JupyterLabs): every pod (True) or those with these labels gets a
        listener on its IP and first port that answers HTTP 200, which is all a hub's readiness
        check asks."""
        self.cluster, self.images, self.state, self.network, self.stub = cluster, images, state, network, stub
        path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        self.path = path + (f"?labelSelector={urllib.parse.quote(selector)}" if selector else "")
        self.pods: dict[str, PodProcesses] = {}  # uid -> its processes
        self.started: dict[str, str] = {}  # "namespace/name" -> pod IP, for tests
        self.failures: dict[str, str] = {}  # "namespace/name" -> why it has not started
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stopping = 0  # pods whose processes are being stopped now

    def idle(self) -> bool:
        """No pod's processes run or are being stopped: a new pod that gets a freed IP (KWOK reuses
        them at once, a real CNI does not) cannot be answered for by an old pod's server."""
        return not self.pods and not self._stopping

    def start(self) -> Kubelet:
        (self.state / "pods").mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        thread("kubelet", lambda: follow(self.cluster, self.path, self._reconcile, self._stop))
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for pod in self.pods.values():
                pod.stop()
            self.pods.clear()

    def _stubbed(self, pod: dict) -> bool:
        if isinstance(self.stub, dict):
            labels = pod["metadata"].get("labels") or {}
            return all(labels.get(k) == v for k, v in self.stub.items())
        return bool(self.stub)

    def _reconcile(self, pods: dict[str, dict]) -> None:
        with self._lock:
            if self._stop.is_set():  # a watch event that arrived while stop() held the lock: after it
                return  # cleared the pods, every pod would look new and be started again (and outlive us)
            alive = {uid for uid, p in pods.items() if not p["metadata"].get("deletionTimestamp")}
            for uid in set(self.pods) - alive:  # first free what deleted pods held (KWOK reuses IPs)
                self._stopping += 1
                try:
                    self.pods.pop(uid).stop()
                finally:
                    self._stopping -= 1
            for uid, pod in pods.items():
                if uid in self.pods or uid not in alive:
                    continue
                if pod["status"].get("phase") != "Running" or not pod["status"].get("podIP"):
                    continue
                key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
                try:
                    self.pods[uid] = StubPod(pod) if self._stubbed(pod) else PodProcesses(self, pod).start()
                    self.started[key] = pod["status"]["podIP"]
                    self.failures.pop(key, None)
                except (PodError, OSError, LookupError, urllib.error.HTTPError) as e:
                    self.failures[key] = str(e)
                    print(f"kubelet: {key}: {e}", flush=True)


class PodProcesses:
    def __init__(self, kubelet: Kubelet, pod: dict):
        self.kubelet, self.pod = kubelet, pod
        self.meta, self.spec = pod["metadata"], pod["spec"]
        self.ip = pod["status"]["podIP"]
        self.dir = kubelet.state / "pods" / self.meta["uid"]
        self.containers: list[ContainerProcess] = []
        self._stop = threading.Event()

    def start(self) -> PodProcesses:
        self.dir.mkdir(parents=True, exist_ok=True)
        volumes = {v["name"]: self._volume(v) for v in self.spec.get("volumes") or []}
        inits = [self._container(c, volumes, init=True) for c in self.spec.get("initContainers") or []]
        mains = [self._container(c, volumes) for c in self.spec["containers"]]
        thread(f"pod-{self.meta['name']}", lambda: self._run(inits, mains))
        return self

    def _run(self, inits: list[ContainerProcess], mains: list[ContainerProcess]) -> None:
        for init in inits:
            self.containers = [init]
            if not init.run_once(self._stop):
                return
        self.containers = mains
        if self._stop.is_set():  # stopped while the init containers ran
            return
        for c in mains:
            c.start()

    def stop(self) -> None:
        self._stop.set()
        for c in self.containers:
            c.stop()
        self.kubelet.network.forget(self.meta["uid"])
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- volumes ---------------------------------------------------------------------------------
    def _volume(self, v: dict) -> str:
        """The host directory (or file) holding the volume's content."""
        name, ns = v["name"], self.meta["namespace"]
        path = self.dir / "volumes" / name
        request = self.kubelet.cluster.request
        if "configMap" in v or "secret" in v:
            ref = v.get("configMap") or v.get("secret")
            data = self._keys("configMap" in v, ref.get("name") or ref.get("secretName"), ref.get("optional", False))
            self._write_keys(path, data, ref.get("items"), ref.get("defaultMode", 0o644))
        elif "projected" in v:
            path.mkdir(parents=True, exist_ok=True)
            for source in v["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    t = source["serviceAccountToken"]
                    self._write_file(path / t["path"], self._token(t).encode(), 0o644)
                elif "configMap" in source or "secret" in source:
                    ref = source.get("configMap") or source.get("secret")
                    data = self._keys("configMap" in source, ref["name"], ref.get("optional", False))
                    self._write_keys(path, data, ref.get("items"), v["projected"].get("defaultMode", 0o644), clear=False)
                elif "downwardAPI" in source:
                    self._write_downward(path, source["downwardAPI"].get("items") or [])
        elif "downwardAPI" in v:
            path.mkdir(parents=True, exist_ok=True)
            self._write_downward(path, v["downwardAPI"].get("items") or [])
        elif "emptyDir" in v:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
        elif "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            pvc = request("GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
            volume = pvc["spec"].get("volumeName")
            if not volume or pvc.get("status", {}).get("phase") != "Bound":
                raise PodError(f"claim {claim} is not bound yet")
            host = Path(request("GET", f"/api/v1/persistentvolumes/{volume}")["spec"]["hostPath"]["path"])
            host.mkdir(parents=True, exist_ok=True)
            group = (self.spec.get("securityContext") or {}).get("fsGroup")
            if group is not None:  # fsGroup: the volume's group is the pod's, new files inherit it
                os.chown(host, -1, int(group))
                host.chmod(0o2775)
            else:
                host.chmod(0o1777)
            return str(host)
        elif "hostPath" in v:
            return v["hostPath"]["path"]
        else:
            raise PodError(f"volume {name}: this kind of volume is not supported by the test kubelet")
        return str(path)

    def _keys(self, configmap: bool, name: str, optional: bool) -> dict[str, bytes]:
        kind = "configmaps" if configmap else "secrets"
        try:
            obj = self.kubelet.cluster.request("GET", f"/api/v1/namespaces/{self.meta['namespace']}/{kind}/{name}")
        except urllib.error.HTTPError as e:
            if e.code == 404 and optional:
                return {}
            raise PodError(f"{kind[:-1]} {name} is missing") from None
        if configmap:
            out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            return out
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def _write_keys(self, path: Path, data: dict[str, bytes], items: list | None, mode: int, clear: bool = True) -> None:
        if clear:
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        chosen = [(i["key"], i["path"], i.get("mode", mode)) for i in items] if items else [(k, k, mode) for k in data]
        for key, rel, m in chosen:
            if key in data:
                self._write_file(path / rel, data[key], m)

    @staticmethod
    def _write_file(path: Path, content: bytes, mode: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)

    def _write_downward(self, path: Path, items: list) -> None:
        for item in items:
            value = self._field(item["fieldRef"]["fieldPath"]) if "fieldRef" in item else \
                self._resource(item["resourceFieldRef"])
            self._write_file(path / item["path"], value.encode(), item.get("mode", 0o644))

    def _token(self, source: dict) -> str:
        sa = self.spec.get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.meta["name"], "uid": self.meta["uid"]},
            **({"audiences": [source["audience"]]} if source.get("audience") else {}),
        }}
        r = self.kubelet.cluster.request("POST", f"/api/v1/namespaces/{self.meta['namespace']}/serviceaccounts/{sa}/token", body)
        return r["status"]["token"]

    def _field(self, path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (self.meta.get(m.group(1)) or {}).get(m.group(2), "")
        return {
            "metadata.name": self.meta["name"], "metadata.namespace": self.meta["namespace"],
            "metadata.uid": self.meta["uid"], "spec.nodeName": self.spec.get("nodeName", ""),
            "spec.serviceAccountName": self.spec.get("serviceAccountName", ""), "status.hostIP": "127.0.0.1",
            "status.podIP": self.ip, "status.podIPs": self.ip,
        }[path]

    def _resource(self, ref: dict, container: dict | None = None) -> str:
        c = container or next(x for x in self.spec["containers"] if x["name"] == ref.get("containerName", x["name"]))
        kind, _, res = ref["resource"].partition(".")
        value = ((c.get("resources") or {}).get(kind) or {}).get(res)
        if value is None:
            return "0"
        amount, divisor = _quantity(str(value)), _quantity(str(ref.get("divisor", "1")))
        return str(math.ceil(amount / divisor))

    # --- containers ------------------------------------------------------------------------------
    def _container(self, c: dict, volumes: dict[str, str], init: bool = False) -> ContainerProcess:
        image = self.kubelet.images.get(c["image"])
        env = self._env(c, image)
        argv = ([*c["command"], *c.get("args", [])] if c.get("command")
                else [*image.entrypoint, *(c["args"] if "args" in c else image.cmd)])
        argv = [_expand(a, env) for a in argv]
        if not argv:
            raise PodError(f"container {c['name']} has no command")
        argv = listen_on([image.which(argv[0]), *argv[1:]], self.ip, c)
        mounts = [Mount(host, target, True) for target, host in image.files.items()]
        for vm in c.get("volumeMounts") or []:
            source = volumes[vm["name"]]
            sub = bool(vm.get("subPath"))
            if sub:  # (after the init containers, which may make it themselves)
                source = os.path.join(source, vm["subPath"])
            mounts.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly")), sub and not os.path.exists(source)))
        ns = self.meta["namespace"]
        mounts.append(Mount(str(self.kubelet.network.hosts_file(self.pod)), "/etc/hosts", True))
        mounts.append(Mount(str(_resolv_conf(self.kubelet.state)), "/etc/resolv.conf", True))
        pod_sc, sc = self.spec.get("securityContext") or {}, c.get("securityContext") or {}
        uid = int(sc.get("runAsUser", pod_sc.get("runAsUser", image.user)))
        gid = int(sc.get("runAsGroup", pod_sc.get("runAsGroup", image.group if uid == image.user else uid)))
        groups = [int(g) for g in [pod_sc.get("fsGroup"), *(pod_sc.get("supplementalGroups") or [])] if g is not None]
        workdir = c.get("workingDir") or image.workdir
        name = f"{ns}_{self.meta['name']}_{c['name']}"
        script = namespace_script(mounts, self.dir / "overlays" / c["name"], self.meta["name"], workdir, uid, gid, groups, argv)
        script = [*in_network(self.kubelet.cluster.netns), *script]
        policy = "Never" if init else self.spec.get("restartPolicy", "Always")
        return ContainerProcess(name, script, env, self.kubelet.state / "logs" / f"{name}.log", policy)

    def _env(self, c: dict, image: ImageEnv) -> dict[str, str]:
        env = {"PATH": ":".join(image.path), "HOSTNAME": self.meta["name"], **image.env}
        if self.spec.get("enableServiceLinks", True):
            services = self.kubelet.cluster.request("GET", f"/api/v1/namespaces/{self.meta['namespace']}/services")["items"]
        else:
            services = []
        env.update(service_env(services, self.meta["namespace"], (self.kubelet.cluster.kubernetes_service_ip, 443)))
        for source in c.get("envFrom") or []:
            ref = source.get("configMapRef") or source.get("secretRef")
            data = self._keys("configMapRef" in source, ref["name"], ref.get("optional", False))
            env.update({source.get("prefix", "") + k: v.decode() for k, v in data.items()})
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = _expand(e["value"], env)
            elif "valueFrom" in e:
                value = self._value_from(e["valueFrom"], c)
                if value is not None:
                    env[e["name"]] = value
            else:
                env[e["name"]] = ""
        return env

    def _value_from(self, source: dict, c: dict) -> str | None:
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in source:
                ref = source[kind]
                data = self._keys(kind == "configMapKeyRef", ref["name"], ref.get("optional", False))
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise PodError(f"{ref['name']} has no key {ref['key']}")
                return data[ref["key"]].decode()
        if "fieldRef" in source:
            return self._field(source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return self._resource(source["resourceFieldRef"], c)
        return None


class StubPod:
    def __init__(self, pod: dict):
        import http.server
        import socketserver

        class Answer(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        port = next((p["containerPort"] for p in pod["spec"]["containers"][0].get("ports") or []), 8888)
        self.server = socketserver.ThreadingTCPServer((pod["status"]["podIP"], port), Answer, bind_and_activate=False)
        self.server.allow_reuse_address = True
        self.server.server_bind()
        self.server.server_activate()
        self.containers: list[ContainerProcess] = []
        thread("stub", self.server.serve_forever)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ContainerProcess:
    """One container's process; restarted after it exits (1 s, doubling up to 10 s) unless Never."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, restart: str):
        self.name, self.argv, self.env, self.log_path, self.restart = name, argv, env, log, restart
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()

    def _spawn(self) -> subprocess.Popen:
        log = open(self.log_path, "ab")
        log.write(f"--- start {time.strftime('%H:%M:%S')}: {self.argv[-1].rsplit(chr(10), 1)[-1][:400]}\n".encode())
        log.flush()
        return subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def run_once(self, stop: threading.Event) -> bool:
        self.proc = self._spawn()
        while self.proc.poll() is None:
            if stop.wait(0.2):
                self.stop()
                return False
        return self.proc.returncode == 0

    def start(self) -> None:
        thread(f"container-{self.name}", self._loop)

    def _loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            self.proc = self._spawn()
            if self._stop.is_set():  # stop() ran while this one was being started: it did not see it
                self.stop()
                return
            code = self.proc.wait()
            if self._stop.is_set() or self.restart == "Never" or (self.restart == "OnFailure" and code == 0):
                return
            delay = 1.0 if time.monotonic() - started > 30 else min(delay * 2, 10.0)
            self._stop.wait(delay)

    @property
    def pid(self) -> int | None:
        """The container's own first process (inside its PID namespace, under `unshare`)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return None
        if os.geteuid() != 0:
            return proc.pid
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def stop(self) -> None:
        """SIGTERM to the container's first process (a grace of 10 s), then SIGKILL to what is left;
        its PID namespace ends with it."""
        self._stop.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(self.pid or proc.pid, 15)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(5)
        except ProcessLookupError:
            pass


def listen_on(argv: list[str], ip: str, container: dict) -> list[str]:
    """Tell the program to listen on its pod's IP instead of every address (pods share this
    machine's network namespace): by the flags each program of the three releases has. The hub
    keeps z2jh's every-address binding: its idle culler reaches it at localhost:8081, so one
    chart-deployed hub runs on a machine at a time."""
    program = os.path.basename(argv[0])
    ports = [p["containerPort"] for p in container.get("ports") or []]
    out = list(argv)
    if program in ("jupyterhub-singleuser", "jupyter-server", "jupyter-lab", "jupyter-labhub"):
        out.append(f"--ServerApp.ip={ip}")
    elif program == "configurable-http-proxy":
        out = [f"{a.split('=')[0]}={ip}" if a.split("=")[0] in ("--ip", "--api-ip", "--metrics-ip") else a for a in out]
    elif program == "dask-gateway-server":
        cls = "KubeController" if "kube-controller" in out else "DaskGateway"
        out.append(f"--{cls}.address={ip}:{ports[0] if ports else 8000}")
    elif program == "dask" and "scheduler" in out[1:2]:  # dask-gateway's: --host "" --dashboard-address :8787 ...
        out = [ip if prev == "--host" else f"{ip}{a}" if prev in ("--dashboard-address", "--dg-api-address") and
               a.startswith(":") else a for prev, a in zip(["", *out], out)]
    elif program == "dask" and "worker" in out[1:2]:
        out = [f"{ip}{a}" if prev == "--dashboard-address" and a.startswith(":") else a for prev, a in zip(["", *out], out)]
        out += ["--host", ip]
    elif program == "kube-scheduler":
        out.append(f"--bind-address={ip}")
    elif program == "traefik":
        out = [re.sub(r"^(--entry[pP]oints\.[^.]+\.address)=:(\d+)", rf"\1={ip}:\2", a) for a in out]
    return out


def mount_order(mounts: list[Mount]) -> list[Mount]:
    """Parents before children; and a mount that would hide another one's source on this machine
    (an emptyDir at /tmp, where the test state may live) after that one, where it has no children
    (pods share this machine's file system, which a node's containers do not)."""
    def below(path: str, top: str) -> bool:
        return path == top or path.startswith(top.rstrip("/") + "/")

    ordered = sorted(mounts, key=lambda m: m.target.rstrip("/").count("/"))
    late = [m for m in ordered
            if any(o is not m and below(o.source, m.target) for o in mounts)
            and not any(o is not m and below(o.target, m.target) for o in mounts)]
    return [m for m in ordered if not any(m is x for x in late)] + late


def namespace_script(mounts: list[Mount], overlays: Path, hostname: str, workdir: str, uid: int, gid: int,
                     groups: list[int], argv: list[str]) -> list[str]:
    """The command that runs `argv` in a private mount (and UTS) namespace with the mounts in
    place, as the given user, in `workdir`."""
    q = shlex.quote
    overlay_steps: list[str] = []  # first: a later overlay would hide the binds made before it
    steps: list[str] = []
    covered: list[str] = []  # container paths under which mount points may be made (mounts, overlays)

    def under(path: str) -> bool:
        return any(path == c or path.startswith(c.rstrip("/") + "/") for c in covered)

    def make_room(target: str, is_dir: bool) -> None:
        if os.path.lexists(target) and not under(target):
            return
        if not under(target):
            parent = os.path.dirname(target.rstrip("/"))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            real = os.path.realpath(parent)
            if real == "/":  # nothing to lay an overlay on: make the top directory on the machine
                os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
            else:
                n = len(overlay_steps)
                upper, work = overlays / str(n) / "upper", overlays / str(n) / "work"
                upper.mkdir(parents=True, exist_ok=True)
                work.mkdir(parents=True, exist_ok=True)
                overlay_steps.append(f"mount -t overlay overlay -o {q(f'lowerdir={real},upperdir={upper},workdir={work}')} {q(real)}")
                covered.extend([real, parent])
        if is_dir:
            steps.append(f"mkdir -p {q(target)}")
        else:
            steps.append(f"mkdir -p {q(os.path.dirname(target))} && {{ [ -e {q(target)} ] || touch {q(target)}; }}")

    for m in mount_order(mounts):
        is_dir = m.make_source or os.path.isdir(m.source)
        if m.make_source:
            steps.append(f"mkdir -p {q(m.source)}")
        make_room(m.target, is_dir)
        steps.append(f"mount --bind {q(m.source)} {q(m.target)}")
        if m.read_only:
            steps.append(f"mount -o remount,bind,ro {q(m.target)}")
        if is_dir:
            covered.append(m.target)
    mounted = any(m.target.rstrip("/") == workdir.rstrip("/") for m in mounts)
    if not mounted and (not os.path.exists(workdir) or under(workdir)):
        make_room(workdir, True)  # an image's working directory (its user's home) belongs to its user
        steps.append(f"[ \"$(stat -c %u {q(workdir)})\" != 0 ] || chown {uid}:{gid} {q(workdir)}")
    steps.append(f"cd {q(workdir)}")
    user = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups", "--"] if uid != 0 else []
    steps.append("exec " + shlex.join([*user, *argv]))
    if os.geteuid() != 0:  # development without root: no namespace, no account change, no volumes
        return argv
    script = [f"hostname {q(hostname[:63])}", *overlay_steps, *steps]
    # a PID namespace too: when the container's first process ends, everything it started ends with
    # it (JupyterHub starts its services in sessions of their own), as in a container
    return ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--uts", "--propagation", "private",
            "sh", "-ec", "\n".join(script)]


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references: replaced when VAR is defined, `$$` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def _quantity(text: str) -> float:
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text.strip())
    if not m:
        raise ValueError(f"not a quantity: {text}")
    return float(m.group(1)) * units.get(m.group(2), 1)


def _resolv_conf(state: Path) -> Path:
    """No DNS server: names come from /etc/hosts; an unknown name fails at once, as NXDOMAIN would."""
    path = state / "resolv.conf"
    if not path.exists():
        path.write_text("options timeout:1 attempts:1\n")
        path.chmod(0o644)
    return path
