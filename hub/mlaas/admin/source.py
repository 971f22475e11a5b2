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
