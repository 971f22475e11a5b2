"""Read remote data through the site's XCache as if it were local (runs in users' servers).

    from mlaas import data
    df = pandas.read_parquet(data.open("/store/demo/events.parquet"))
    with data.open("root://origin.example.org:1094//store/demo/events.parquet") as f: ...
    data.url("/store/demo/events.parquet")   # the cache URL, for tools that take URLs

The spawner tells each server where its site's caches are (`MLAAS_XCACHE`): which origins they
serve and which logical path prefixes (namespaces) belong to which origin. Only those origins
can be read: the caches are not open proxies. Imports nothing of the hub.

A cache on this machine with direct access (`data.direct_access`) also says where it keeps its
files. When it holds a file completely, opening it through the cache answers with a redirect to
that copy (XRootD's direct cache access); `open` then returns the copy as a plain local file,
read at the speed of the local disk. The cache decides, as for any read: a file it would refuse,
or holds only in part, is never handed out, and is streamed or refused as before.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlparse

ENV = "MLAAS_XCACHE"


class DataAccessError(OSError):
    """Reading failed; the message says which origin or path and why."""


class OriginNotPermitted(DataAccessError):
    pass


class BadDataURL(DataAccessError, ValueError):
    pass


@dataclass(frozen=True)
class SiteCaches:
    origins: dict[str, str]  # root://origin:port -> root://cache:port
    namespaces: dict[str, str]  # /logical/prefix -> root://origin:port
    direct: dict[str, str] = field(default_factory=dict)  # root://cache:port -> its directory on this machine

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SiteCaches:
        raw = (environ if environ is not None else os.environ).get(ENV)
        if not raw:
            raise DataAccessError(f"this server has no site cache configured (${ENV} is not set)")
        doc = json.loads(raw)
        return cls(dict(doc.get("origins", {})), dict(doc.get("namespaces", {})), dict(doc.get("direct", {})))


_ORIGIN_RE = re.compile(r"^root://([^/?#]+)//(/?.*)$")


def _clean_path(path: str, original: str) -> str:
    if not path.startswith("/"):
        path = "/" + path
    parts = path.split("/")
    if any(p in ("..", ".") for p in parts) or "//" in path.rstrip("/") or path.rstrip("/") == "":
        raise BadDataURL(f"{original!r}: the path must be absolute, without '.', '..' or empty parts")
    return path


def resolve(target: str, caches: SiteCaches | None = None) -> tuple[str, str, str]:
    """(origin, path, cache URL) for `root://origin//path` or a logical path under a namespace."""
    caches = caches or SiteCaches.from_env()
    if target.startswith("root://"):
        m = _ORIGIN_RE.match(target)
        if not m:
            raise BadDataURL(f"{target!r} is not an XRootD URL like root://host:1094//path/to/file")
        host = m.group(1)
        parsed = urlparse(f"root://{host}")
        if not parsed.hostname or parsed.port is None:
            raise BadDataURL(f"{target!r}: the origin needs a host and a port (root://host:1094//path)")
        origin = f"root://{parsed.hostname}:{parsed.port}"
        path = _clean_path(m.group(2), target)
    elif target.startswith("/"):
        path = _clean_path(target, target)
        matches = [ns for ns in caches.namespaces if path == ns or path.startswith(ns + "/")]
        if not matches:
            known = ", ".join(sorted(caches.namespaces)) or "none"
            raise OriginNotPermitted(f"{target!r} is under no namespace this site serves (namespaces: {known})")
        origin = caches.namespaces[max(matches, key=len)]
    else:
        raise BadDataURL(f"{target!r}: give root://host:port//path or an absolute logical path like /store/…")
    cache = caches.origins.get(origin)
    if cache is None:
        known = ", ".join(sorted(caches.origins)) or "none"
        raise OriginNotPermitted(f"origin {origin} is not served by this site's caches (origins: {known})")
    return origin, path, f"{cache}/{path}"


def url(target: str) -> str:
    """The cache URL to read `target` through."""
    return resolve(target)[2]


def _explain(exc: Exception, origin: str, path: str) -> DataAccessError:
    text = str(exc)
    if "[3011]" in text or "no such file" in text.lower():
        return DataAccessError(f"{path} does not exist at origin {origin}")
    if "[3005]" in text or "connection refused" in text.lower() or "[3012]" in text:
        return DataAccessError(f"origin {origin} is unreachable and {path} is not in the site cache ({text.strip()})")
    if "[3010]" in text or "permission" in text.lower():
        return DataAccessError(f"{path} at origin {origin}: permission denied")
    return DataAccessError(f"reading {path} from origin {origin} through the site cache failed: {text.strip()}")


def complete_copy(cache_url: str, cache_dir: str, path: str) -> int | None:
    """A descriptor of the cache's complete copy of `path` on this machine, when the cache hands
    it out; None when it does not (not cached, cached in part, refused, not readable here).

    The copy is opened first and the cache asked second: a cache answers with a local redirect
    only for a file it holds completely and would serve, and a complete copy is never written
    again (an eviction unlinks it). So if the path still names the opened file after the cache's
    answer, the descriptor reads exactly what the cache would have streamed."""
    local = os.path.join(cache_dir, path.lstrip("/"))
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        from XRootD import client

        remote = client.File()
        status, _ = remote.open(cache_url)
        if status.ok:
            handed_out = remote.get_property("DataServer") == "localhost"
            remote.close()
            if handed_out and os.path.samestat(os.stat(local, follow_symlinks=False), os.fstat(fd)):
                return fd
    except (ImportError, OSError):
        pass
    os.close(fd)
    return None


def open(target: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:  # noqa: A001 - mirrors builtins.open
    """Open a remote file through the site cache (read-only), as a file object."""
    if mode not in ("rb", "r"):
        raise DataAccessError("data through the site cache is read-only: use mode 'rb' or 'r'")
    caches = SiteCaches.from_env()
    origin, path, cache_url = resolve(target, caches)
    cache_dir = caches.direct.get(caches.origins[origin])
    if cache_dir is not None and (fd := complete_copy(cache_url, cache_dir, path)) is not None:
        text = {k: kwargs[k] for k in ("encoding", "errors", "newline") if k in kwargs and mode == "r"}
        return io.open(fd, mode, **text)
    import fsspec

    try:
        return fsspec.open(cache_url, mode, **kwargs).open()
    except OSError as e:
        raise _explain(e, origin, path) from e


def read_bytes(target: str) -> bytes:
    with open(target) as f:
        return f.read()
