"""Runs what KWOK only pretends to run: for each pod of a namespace that KWOK marked Running,
start the real single-user server command with the pod's environment, listening on the pod's
IP (loopback 127.x), so the hub reaches it exactly as it would on a node; stop it when the pod
is deleted. Test code: the one stand-in for a kubelet and a container runtime.

As root, a pod's PersistentVolumeClaim volumes appear at their mount paths, as a kubelet mounts
them: the process runs in a private mount namespace with the bound PersistentVolume's hostPath
bind-mounted there (under a private /home, so nothing of the machine changes). Not simulated
further: no image (the servers run from this environment) and no other isolation between pods."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .cluster import Cluster

VENV_BIN = Path(sys.executable).parent


class PodRunner:
    """`stub=True` (benchmarks with hundreds of pods, which 2 cores cannot run as JupyterLabs):
    each Running pod gets a listener on its IP and port that answers HTTP 200, which is all the
    hub's readiness check asks."""

    def __init__(self, cluster: Cluster, namespace: str, log_dir: Path, stub: bool = False):
        self.cluster, self.namespace, self.log_dir, self.stub = cluster, namespace, log_dir, stub
        self.ips: dict[str, str] = {}  # pod uid -> its IP
        self.running: dict[str, subprocess.Popen] = {}  # pod uid -> process
        self.started: dict[str, str] = {}  # pod name -> ip, for tests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)

    def start(self) -> PodRunner:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for proc in list(self.running.values()):  # the thread may still be reading its last watch event
            self._kill(proc)

    def _loop(self) -> None:
        """List, then follow the watch (relisting when it ends or fails): a poll of every pod a few
        times a second would cost the API server and this process more than the hub under test."""
        pods_path = f"/api/v1/namespaces/{self.namespace}/pods?labelSelector=component%3Dsingleuser-server"
        while not self._stop.is_set():  # users' servers only (KubeSpawner's label), not Dask's pods
            try:
                listed = self.cluster.request("GET", pods_path)
                pods = {p["metadata"]["uid"]: p for p in listed["items"]}
                self._reconcile(pods)
                version = listed["metadata"]["resourceVersion"]
                for event in self.cluster.watch(f"{pods_path}&watch=1&resourceVersion={version}&timeoutSeconds=10"):
                    if self._stop.is_set():
                        return
                    pod = event.get("object") or {}
                    uid = (pod.get("metadata") or {}).get("uid")
                    if event.get("type") not in ("ADDED", "MODIFIED", "DELETED") or not uid:
                        break  # an error event (e.g. the version expired): list again
                    if event["type"] == "DELETED":
                        pods.pop(uid, None)
                    else:
                        pods[uid] = pod
                    self._reconcile(pods)
            except Exception:
                self._stop.wait(0.5)

    def _reconcile(self, pods: dict[str, dict]) -> None:
        alive = {uid for uid, p in pods.items() if not p["metadata"].get("deletionTimestamp")}
        for uid in set(self.running) - alive:  # first free what deleted pods held (KWOK reuses IPs)
            self._kill(self.running.pop(uid))
        for uid, pod in pods.items():
            if uid in self.running or uid not in alive:
                continue
            if pod["status"].get("phase") == "Running" and pod["status"].get("podIP"):
                try:
                    self._run(pod)
                except OSError as e:  # never let one pod stop the runner; retried on the next event or relist
                    print(f"pod-runner: {pod['metadata']['name']}: {e}", file=sys.stderr)

    def _run(self, pod: dict) -> None:
        if self.stub:
            self._run_stub(pod)
            return
        container = pod["spec"]["containers"][0]
        ip = pod["status"]["podIP"]
        port = next((p["containerPort"] for p in container.get("ports", [])), 8888)
        env = {e["name"]: e.get("value", "") for e in container.get("env", []) if "value" in e}
        prefix = env.get("JUPYTERHUB_SERVICE_PREFIX", "/")
        home = tempfile.mkdtemp(prefix=f"pod-{pod['metadata']['name']}-")
        env.update(
            PATH=f"{VENV_BIN}:/usr/bin:/bin", HOME=home,
            JUPYTERHUB_SERVICE_URL=f"http://{ip}:{port}{prefix}",
        )
        argv = [*container.get("command", []), *container.get("args", [])] or ["jupyterhub-singleuser"]
        args = [str(VENV_BIN / Path(argv[0]).name), *argv[1:], f"--ServerApp.ip={ip}", f"--ServerApp.port={port}"]
        if os.geteuid() == 0:
            args.append("--ServerApp.allow_root=True")
        log = open(self.log_dir / f"{pod['metadata']['name']}.log", "ab")
        mounts = self._volume_mounts(pod) if os.geteuid() == 0 else []
        if mounts:
            args = _in_mount_namespace(args, mounts)
        self.running[pod["metadata"]["uid"]] = subprocess.Popen(args, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
        self.ips[pod["metadata"]["uid"]] = ip
        self.started[pod["metadata"]["name"]] = ip

    def _volume_mounts(self, pod: dict) -> list[tuple[str, str]]:
        """(host path, mount path) for each PVC volume of the pod's container, via the bound PV."""
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["spec"].get("volumes") or [] if "persistentVolumeClaim" in v}
        out = []
        for mount in pod["spec"]["containers"][0].get("volumeMounts") or []:
            claim = claims.get(mount["name"])
            if claim is None:
                continue
            pvc = self.cluster.request("GET", f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{claim}")
            volume = pvc["spec"].get("volumeName")
            if not volume:
                continue  # not bound: a kubelet would not start the pod either
            host = self.cluster.request("GET", f"/api/v1/persistentvolumes/{volume}")["spec"]["hostPath"]["path"]
            Path(host).mkdir(parents=True, exist_ok=True)
            os.chmod(host, 0o1777)  # a fresh volume, writable by the pod's account (fsGroup's job in a cluster)
            out.append((host, mount["mountPath"]))
        return out

    def _run_stub(self, pod: dict) -> None:
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

        ip = pod["status"]["podIP"]
        port = next((p["containerPort"] for p in pod["spec"]["containers"][0].get("ports", [])), 8888)
        server = socketserver.ThreadingTCPServer((ip, port), Answer, bind_and_activate=False)
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.running[pod["metadata"]["uid"]] = server  # type: ignore[assignment]
        self.ips[pod["metadata"]["uid"]] = ip
        self.started[pod["metadata"]["name"]] = ip

    @staticmethod
    def _kill(proc) -> None:
        if hasattr(proc, "shutdown"):  # a stub listener
            proc.shutdown()
            proc.server_close()
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _in_mount_namespace(args: list[str], mounts: list[tuple[str, str]]) -> list[str]:
    """The command, run in a private mount namespace with a private /home and each volume bound
    at its mount path (pods' paths are under /home/jovyan)."""
    import shlex

    steps = ["mount -t tmpfs tmpfs /home"]
    for host, target in mounts:
        steps += [f"mkdir -p {shlex.quote(target)}", f"mount --bind {shlex.quote(host)} {shlex.quote(target)}"]
    steps.append("exec " + shlex.join(args))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join(steps)]


def wait_until(check, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False
