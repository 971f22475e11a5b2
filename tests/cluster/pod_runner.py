"""Users' servers of one namespace on a test cluster, as the one-machine hub's Kubernetes mode and
the federation tests use them: the test kubelet (tests/cluster/kubelet.py) for the pods
KubeSpawner makes (label component=singleuser-server), with the Service network it needs. Each
server runs from the user image's environment, as the pod's account, with its volumes (e.g. the
project volumes) at their mount paths. Other pods of the namespace (e.g. Dask's, when the gateway
runs on the hub's machine) stay simulated by KWOK alone."""

from __future__ import annotations

import time
from pathlib import Path

from .cluster import Cluster
from .images import Images, image_programs
from .kubelet import Kubelet
from .services import ServiceNetwork


class PodRunner:
    def __init__(self, cluster: Cluster, namespace: str, state: Path, stub: bool = False):
        self.network = ServiceNetwork(cluster, state / "network")
        self.kubelet = Kubelet(cluster, Images(image_programs()), state, self.network, namespace=namespace,
                               selector="component=singleuser-server", stub=stub)

    @property
    def started(self) -> dict[str, str]:
        """"namespace/name" -> pod IP of every pod started so far."""
        return self.kubelet.started

    def start(self) -> PodRunner:
        self.network.start()
        self.kubelet.start()
        return self

    def stop(self) -> None:
        self.kubelet.stop()
        self.network.stop()


def wait_until(check, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return False
