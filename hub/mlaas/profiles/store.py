"""Keep the profiles in force: reload on change, keep the last good set when an edit is broken.

The hub asks `await fresh()` before every form and spawn: a few `stat` calls decide whether the
files changed, and a changed file is parsed in a worker thread, never on the hub's event loop.
`current()` called on an event loop never parses either: it answers with the set in force.
A valid edit takes effect at once; an invalid one is logged with every error and the last good
profiles stay in force, also across hub restarts (a JSON snapshot). A file that disappears or
turns into something else (a directory) is an error too: the profiles it held stay in force
until an admin withdraws them (docs/profiles.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from .loader import (
    ProfileError, ProfileErrors, ProfileSet, load_profile_dir, not_regular_files, profile_entries, profile_files,
)
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
        """The profiles in force. Off an event loop, reloaded first if the files changed; on one
        (the hub's), never parsed here: `await fresh()` where a reload must be seen at once."""
        if not self._loaded_once or not _on_event_loop():  # the first load is at start-up, before users
            self.refresh()
        return self._good

    async def fresh(self) -> ProfileSet:
        """The profiles in force after a reload of changed files, parsed in a worker thread."""
        if self._read_signature() != self._signature:
            await asyncio.to_thread(self.refresh)
        return self._good

    def refresh(self) -> bool:
        """Reload if the files changed; return True when a new set came into force."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        signature = self._read_signature()
        if signature == self._signature:
            return False
        # `fresh()` compares signatures without the lock: the new one is recorded only once the
        # profiles read with it are in force, or a request during a reload got the old profiles
        try:
            fresh = load_profile_dir(self.directory)
            problems = self._entry_problems(fresh)
            if problems:
                raise ProfileErrors(problems)
        except ProfileErrors as e:
            self.errors = e.errors
            kept = self._good if self._loaded_once else self._restore_snapshot()
            self._good, self._loaded_once = kept, True
            self._signature = signature
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
        self._signature = signature
        if changed:
            self.log.info("Profiles in force: %s", ", ".join(fresh.slugs) or "none")
            self._save_snapshot(fresh)
        return changed

    def _read_signature(self) -> Signature:
        try:
            return tuple(
                (p.name, st.st_mtime_ns, st.st_size, st.st_mode)
                for p in profile_entries(self.directory) for st in [p.lstat()]
            )
        except OSError:
            return ()

    def _entry_problems(self, fresh: ProfileSet) -> list[ProfileError]:
        """Entries that are not profile files, and files that vanished with profiles still in force."""
        problems = not_regular_files(self.directory)
        known = self._good.sources if self._loaded_once else self._snapshot_sources()
        present = {str(p) for p in profile_files(self.directory)}
        by_file: dict[str, list[str]] = {}
        for slug, where in known.items():
            by_file.setdefault(where.rsplit(":", 1)[0], []).append(slug)
        for file, slugs in sorted(by_file.items()):
            withdrawn = [slug for slug in slugs if fresh.get(slug) is None]
            if file not in present and withdrawn and not any(str(e.file) == file for e in problems):
                problems.append(ProfileError(
                    file, None, "",
                    f"is gone (deleted or renamed) with profile(s) {', '.join(withdrawn)}, which stay in force; "
                    "to withdraw them, delete them on the admin page or put back the file without them",
                ))
        return problems

    def _snapshot_sources(self) -> dict[str, str]:
        if not self.snapshot or not self.snapshot.exists():
            return {}
        try:
            return dict(json.loads(self.snapshot.read_text()).get("sources", {}))
        except (OSError, ValueError, AttributeError):
            return {}

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


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
