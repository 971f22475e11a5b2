"""Dynamic volume provisioning for the test clusters (test tooling), as a local-path provisioner
does on a one-node cluster: every claim of a StorageClass whose provisioner is ours gets a new
hostPath PersistentVolume (a directory under the cluster's state) bound to it; the volume is
deleted with its claim when the class says Delete. `default_class` creates the cluster's default
StorageClass (claims that name no class, such as z2jh's hub database, use it); a site's own
class names (e.g. cephfs for project storage) are StorageClasses with the same provisioner."""

from __future__ import annotations

import shutil
import threading
import urllib.error
from pathlib import Path

from .cluster import Cluster
from .follow import follow, thread

PROVISIONER = "mlaas.test/local-path"


class Provisioner:
    def __init__(self, cluster: Cluster, root: Path):
        self.cluster, self.root = cluster, root
        self._stop = threading.Event()
        self._classes: dict[str, dict] = {}

    def storage_class(self, name: str, default: bool = False) -> None:
        body = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": name, "annotations": {"storageclass.kubernetes.io/is-default-class": str(default).lower()}},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}
        try:
            self.cluster.request("POST", "/apis/storage.k8s.io/v1/storageclasses", body)
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise

    def start(self) -> Provisioner:
        self.root.mkdir(parents=True, exist_ok=True)
        thread("storage-classes", lambda: follow(self.cluster, "/apis/storage.k8s.io/v1/storageclasses",
                                                 self._on_classes, self._stop))
        thread("claims", lambda: follow(self.cluster, "/api/v1/persistentvolumeclaims", self._on_claims, self._stop))
        thread("volumes", lambda: follow(self.cluster, "/api/v1/persistentvolumes", self._on_volumes, self._stop))
        return self

    def stop(self) -> None:
        self._stop.set()

    def _on_classes(self, objects: dict[str, dict]) -> None:
        self._classes = {o["metadata"]["name"]: o for o in objects.values()}

    def _on_claims(self, claims: dict[str, dict]) -> None:
        for claim in claims.values():
            cls = self._classes.get(claim["spec"].get("storageClassName") or "")
            if claim["spec"].get("volumeName") or cls is None or cls.get("provisioner") != PROVISIONER:
                continue
            meta = claim["metadata"]
            path = self.root / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # as local-path does; the pod's fsGroup owns what it writes
            pv = {
                "metadata": {"name": f"pvc-{meta['uid']}", "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
                    "accessModes": claim["spec"]["accessModes"],
                    "storageClassName": cls["metadata"]["name"],
                    "persistentVolumeReclaimPolicy": cls.get("reclaimPolicy", "Delete"),
                    "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                                 "name": meta["name"], "uid": meta["uid"]},
                },
            }
            try:
                self.cluster.request("POST", "/api/v1/persistentvolumes", pv)
            except urllib.error.HTTPError as e:
                if e.code != 409:
                    raise

    def _on_volumes(self, volumes: dict[str, dict]) -> None:
        """Released volumes of ours with policy Delete: remove the directory, then the object."""
        for pv in volumes.values():
            ours = (pv["metadata"].get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
            if ours and pv.get("status", {}).get("phase") == "Released" and \
                    pv["spec"].get("persistentVolumeReclaimPolicy") == "Delete":
                shutil.rmtree(pv["spec"]["hostPath"]["path"], ignore_errors=True)
                try:
                    self.cluster.request("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
                except urllib.error.HTTPError:
                    pass
