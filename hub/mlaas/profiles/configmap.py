"""The profile files of a Kubernetes site, read from its profiles ConfigMap through the API, for a
component whose chart cannot mount the ConfigMap (Dask Gateway's API pod): the files are mirrored
into a private directory that a ProfileStore reads, so they get the same validation, the same
last-good behaviour and the same change detection as mounted or local files.

The mirror is refreshed every `interval` seconds (a kubelet refreshes a mounted ConfigMap about
once a minute; this is quicker). A ConfigMap that cannot be read (missing, RBAC, API down) leaves
the last mirrored files in place and is logged once per distinct error."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def own_namespace(default: str = "default") -> str:
    """The namespace of the pod this runs in (its ServiceAccount's mounted namespace file)."""
    try:
        return SA_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


class ConfigMapMirror:
    def __init__(self, core_api: Any, namespace: str, name: str, directory: str | Path | None = None,
                 log: logging.Logger | None = None):
        self.core_api, self.namespace, self.name = core_api, namespace, name
        self.directory = Path(directory or tempfile.mkdtemp(prefix="mlaas-profiles-"))
        self.log = log or logging.getLogger("mlaas.profiles")
        self._last_error = ""
        self._version = ""

    async def sync(self) -> bool:
        """Mirror the ConfigMap now; True when its files were read (changed or not)."""
        try:
            cm = await self.core_api.read_namespaced_config_map(self.name, self.namespace)
        except Exception as e:  # kubernetes_asyncio's ApiException, connection errors
            error = f"{type(e).__name__}: {getattr(e, 'status', '')} {getattr(e, 'reason', '') or e}".strip()
            if error != self._last_error:
                self.log.error("Cannot read the profiles ConfigMap %s/%s (%s); keeping the profiles mirrored last",
                               self.namespace, self.name, error)
                self._last_error = error
            return False
        if self._last_error:
            self.log.info("The profiles ConfigMap %s/%s can be read again", self.namespace, self.name)
            self._last_error = ""
        version = cm.metadata.resource_version or ""
        if version != self._version:
            self._write(dict(cm.data or {}))
            self._version = version
        return True

    def _write(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            if "/" in name or name.startswith("."):
                continue  # ConfigMap keys are file names; nothing else is written
            tmp = self.directory / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.directory / name)
        for old in self.directory.iterdir():
            if not old.name.startswith(".") and old.name not in files:
                old.unlink()

    async def run(self, interval: float = 10.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.sync()
