"""Every change an admin makes: who, when, what (the item before and after), one JSON file each."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Change:
    id: int
    time: float  # seconds since the epoch
    who: str
    action: str  # create | update | delete | restore
    kind: str  # profiles | quotas
    key: str  # the profile's slug or the quota's group
    file: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    restored_from: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChangeLog:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._lock = threading.Lock()
        self._changes: list[Change] = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                self._changes.append(Change(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue  # a damaged record is skipped, never fatal
        self._changes.sort(key=lambda c: c.id)

    def record(self, **fields: Any) -> Change:
        with self._lock:
            change = Change(id=(self._changes[-1].id + 1) if self._changes else 1, time=time.time(), **fields)
            path = self.directory / f"{change.id:08d}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(change.as_dict(), indent=1))
            os.replace(tmp, path)
            self._changes.append(change)
            return change

    def get(self, change_id: int) -> Change | None:
        return next((c for c in self._changes if c.id == change_id), None)

    def list(self, kind: str | None = None, key: str | None = None, limit: int = 200) -> list[Change]:
        found = [c for c in reversed(self._changes) if (kind is None or c.kind == kind) and (key is None or c.key == key)]
        return found[:limit]

    def last(self, kind: str, key: str) -> Change | None:
        found = self.list(kind, key, limit=1)
        return found[0] if found else None
