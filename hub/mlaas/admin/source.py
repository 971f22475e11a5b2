"""Where the profile files live, behind one small interface (files here; a ConfigMap on Kubernetes).

Writes are atomic (a temporary file renamed over the old one, same mode and owner), and every
read-modify-write holds an exclusive lock, so two admins' changes are applied one after the
other, never interleaved.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ..profiles.loader import PROFILE_SUFFIXES, profile_files

FILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\.ya?ml$")


class ProfileSource(Protocol):
    def names(self) -> list[str]: ...
    def read(self, name: str) -> str: ...
    def write(self, name: str, text: str) -> None: ...
    def lock(self) -> contextlib.AbstractContextManager[None]: ...


class FileSource:
    """The YAML files of a profiles directory."""

    def __init__(self, directory: str | Path, lock_file: str | Path):
        self.directory = Path(directory)
        self.lock_file = Path(lock_file)

    def names(self) -> list[str]:
        return [p.name for p in profile_files(self.directory)]

    def read(self, name: str) -> str:
        return (self.directory / self._checked(name)).read_text(encoding="utf-8")

    def write(self, name: str, text: str) -> None:
        target = self.directory / self._checked(name)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if target.exists():
                st = target.stat()
                os.chmod(tmp, st.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):
                    os.chown(tmp, st.st_uid, st.st_gid)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _checked(name: str) -> str:
        if not FILE_NAME_RE.match(name) or not name.endswith(PROFILE_SUFFIXES):
            raise ValueError(f"{name!r} is not a profile file name (e.g. 'gpu.yaml': lower-case letters, digits, - and _)")
        return name


LIVE_LABELS = {"app.kubernetes.io/managed-by": "mlaas-admin", "app.kubernetes.io/component": "profiles-live"}


class ConfigMapSource:
    """A Kubernetes site's profiles: the files `mlaas deploy` puts in the chart's ConfigMap
    (`base`), overlaid by the admins' live edits in a second ConfigMap (`live`) that no Helm
    release owns, so `helm upgrade` / `mlaas deploy` never overwrite an edit. A file of `live`
    replaces the file of the same name of `base`; the first edit of a file copies it there.
    Writes carry the ConfigMap's resourceVersion: a change made meanwhile by someone else (kubectl)
    is a conflict, never overwritten."""

    def __init__(self, api, base: str, live: str):
        self.api, self.base, self.live = api, base, live
        self._lock = threading.Lock()

    def _data(self, name: str) -> tuple[dict[str, str], dict | None]:
        cm = self.api.configmap(name)
        return dict((cm or {}).get("data") or {}), cm

    def deployed(self) -> dict[str, str]:
        """The files as `mlaas deploy` put them, whatever the live edits."""
        return self._data(self.base)[0]

    def overridden(self) -> list[str]:
        """The files whose live edit is in force over the deployed one."""
        return sorted(n for n in self._data(self.live)[0] if FILE_NAME_RE.match(n))

    def names(self) -> list[str]:
        base, live = self._data(self.base)[0], self._data(self.live)[0]
        return sorted(n for n in {**base, **live} if FILE_NAME_RE.match(n) and n.endswith(PROFILE_SUFFIXES))

    def read(self, name: str) -> str:
        FileSource._checked(name)
        live = self._data(self.live)[0]
        if name in live:
            return live[name]
        base = self._data(self.base)[0]
        if name not in base:
            raise FileNotFoundError(name)
        return base[name]

    def write(self, name: str, text: str) -> None:
        FileSource._checked(name)
        data, cm = self._data(self.live)
        ns = self.api.namespace
        if cm is None:
            self.api.request("POST", f"/api/v1/namespaces/{ns}/configmaps", {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": self.live, "labels": LIVE_LABELS,
                             "annotations": {"mlaas.io/note": "Live profile edits of the admin page; Helm does not own this."}},
                "data": {name: text},
            })
            return
        cm["data"] = {**data, name: text}  # resourceVersion kept: a concurrent change is refused (409)
        self.api.request("PUT", f"/api/v1/namespaces/{ns}/configmaps/{self.live}", cm)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._lock:  # one admin service per site; other writers are caught by resourceVersion
            yield
