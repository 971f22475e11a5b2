"""Keep the profiles in force: reload on change, keep the last good set when an edit is broken.

The hub asks `current()` before every form and spawn; a few `stat` calls decide whether the
files changed. A valid edit takes effect at once; an invalid one is logged with every error
and the last good profiles stay in force, also across hub restarts (a JSON snapshot).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from .loader import ProfileError, ProfileErrors, ProfileSet, load_profile_dir, profile_files
from .model import DaskPolicy, GroupQuota, Profile, Project

Signature = tuple[tuple[str, int, int], ...]


class ProfileStore:
    def __init__(self, directory: str | Path, snapshot: str | Path | None = None, log: logging.Logger | None = None):
        self.directory = Path(directory)
        self.snapshot = Path(snapshot) if snapshot else None
        self.log = log or logging.getLogger("JupyterHub.mlaas.profiles")
        self._lock = threading.Lock()  # the hub's loop and the watcher thread both refresh
        self._signature: Signature | None = None
        self._good = ProfileSet()
        self.errors: list[ProfileError] = []
        self._loaded_once = False

    def current(self) -> ProfileSet:
        self.refresh()
        return self._good

    def refresh(self) -> bool:
        """Reload if the files changed; return True when a new set came into force."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        signature = self._read_signature()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            fresh = load_profile_dir(self.directory)
        except ProfileErrors as e:
            self.errors = e.errors
            kept = self._good if self._loaded_once else self._restore_snapshot()
            self._good, self._loaded_once = kept, True
            self.log.error(
                "Profile files in %s are invalid; keeping the last good profiles (%s):\n  %s",
                self.directory,
                ", ".join(kept.slugs) or "none",
                "\n  ".join(str(err) for err in e.errors),
            )
            return False
        changed = (fresh.profiles, fresh.quotas, fresh.dask, fresh.projects) != (
            self._good.profiles, self._good.quotas, self._good.dask, self._good.projects
        ) or not self._loaded_once
        self.errors = []
        self._good, self._loaded_once = fresh, True
        if changed:
            self.log.info("Profiles in force: %s", ", ".join(fresh.slugs) or "none")
            self._save_snapshot(fresh)
        return changed

    def _read_signature(self) -> Signature:
        try:
            return tuple((p.name, st.st_mtime_ns, st.st_size) for p in profile_files(self.directory) for st in [p.stat()])
        except OSError:
            return ()

    def _save_snapshot(self, pset: ProfileSet) -> None:
        if not self.snapshot:
            return
        data = {
            "profiles": [p.model_dump(mode="json") for p in pset.profiles],
            "sources": pset.sources,
            "quotas": [q.model_dump(mode="json") for q in pset.quotas],
            "dask": pset.dask.model_dump(mode="json"),
            "projects": [p.model_dump(mode="json") for p in pset.projects],
        }
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.snapshot.parent, prefix=".profiles-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.snapshot)

    def _restore_snapshot(self) -> ProfileSet:
        if not self.snapshot or not self.snapshot.exists():
            return ProfileSet()
        try:
            data = json.loads(self.snapshot.read_text())
            pset = ProfileSet(
                tuple(Profile.model_validate(p) for p in data["profiles"]),
                dict(data["sources"]),
                tuple(GroupQuota.model_validate(q) for q in data.get("quotas", [])),
                DaskPolicy.model_validate(data.get("dask", {})),
                tuple(Project.model_validate(p) for p in data.get("projects", [])),
            )
        except Exception as e:  # a damaged snapshot must not stop the hub either
            self.log.error("Cannot read the last good profiles from %s: %s", self.snapshot, e)
            return ProfileSet()
        self.log.warning("Using the last good profiles saved in %s", self.snapshot)
        return pset
