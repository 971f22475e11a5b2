"""The profile files of a Kubernetes site, read from its ConfigMaps through the API: the deployed
files (`mlaas deploy`, the chart's ConfigMap) overlaid by the admins' live edits (a ConfigMap no
Helm release owns; mlaas.admin.source.ConfigMapSource writes it). The hub and the Dask Gateway
(whose chart cannot mount a ConfigMap) mirror them into a directory that a ProfileStore reads,
so they get the same validation, the same last-good behaviour and the same change detection as
local files.

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

def live_configmap(configmap: str) -> str:
    """The ConfigMap of the admins' live edits that goes with a deployed profiles ConfigMap."""
    return f"{configmap}-live"


class ConfigMapMirror:
    """`names`: the deployed ConfigMap first, then the live one (optional: it exists after the
    first edit); a later one's file replaces an earlier one's of the same name."""

    def __init__(self, core_api: Any, namespace: str, names: str | list[str], directory: str | Path | None = None,
                 log: logging.Logger | None = None):
        self.core_api, self.namespace = core_api, namespace
        self.names = [names] if isinstance(names, str) else list(names)
        self.directory = Path(directory or tempfile.mkdtemp(prefix="mlaas-profiles-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = log or logging.getLogger("mlaas.profiles")
        self._last_error = ""
        self._version: tuple[str, ...] = ()

    async def sync(self) -> bool:
        """Mirror the ConfigMaps now; True when they were read (changed or not)."""
        files: dict[str, str] = {}
        versions = []
        for i, name in enumerate(self.names):
            try:
                cm = await self.core_api.read_namespaced_config_map(name, self.namespace)
            except Exception as e:  # kubernetes_asyncio's ApiException, connection errors
                if i > 0 and getattr(e, "status", None) == 404:
                    versions.append("")  # no live edit yet
                    continue
                error = f"{type(e).__name__}: {getattr(e, 'status', '')} {getattr(e, 'reason', '') or e}".strip()
                if error != self._last_error:
                    self.log.error("Cannot read the profiles ConfigMap %s/%s (%s); keeping the profiles mirrored last",
                                   self.namespace, name, error)
                    self._last_error = error
                return False
            files.update(dict(cm.data or {}))
            versions.append(cm.metadata.resource_version or "")
        if self._last_error:
            self.log.info("The profiles ConfigMaps %s can be read again", ", ".join(self.names))
            self._last_error = ""
        if tuple(versions) != self._version:
            self._write(files)
            self._version = tuple(versions)
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


def seed(directory: Path, mounted: str | Path) -> None:
    """Fill an empty mirror from the mounted deployed files, so its reader starts with profiles
    before the API has answered."""
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.iterdir()):
        for f in Path(mounted).iterdir():
            if f.is_file() and not f.name.startswith("."):
                (directory / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")


async def follow(configmap: str, directory: Path, log: logging.Logger, interval: float = 5.0) -> None:
    """Mirror a deployed profiles ConfigMap and its live edits into `directory`, every `interval`
    seconds, from inside a pod (its ServiceAccount may `get` those two ConfigMaps)."""
    from kubernetes_asyncio import client, config

    from ..kube_api import own_namespace

    try:
        config.load_incluster_config()
        mirror = ConfigMapMirror(client.CoreV1Api(client.ApiClient()), own_namespace(),
                                 [configmap, live_configmap(configmap)], directory, log)
        await mirror.sync()
        await mirror.run(interval=interval)
    except Exception:
        log.exception("Following the profile ConfigMaps failed; the profiles stay as they are")
