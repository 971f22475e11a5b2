"""List-then-watch of one kind of object, as Kubernetes controllers do (test tooling): the callback
gets the full current set after every change; a watch that ends or fails is followed by a relist."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .cluster import Cluster


def follow(cluster: Cluster, path: str, on_change: Callable[[dict[str, dict]], None], stop: threading.Event) -> None:
    """Objects of `path` (a list URL, query allowed) keyed by uid, until `stop` is set."""
    sep = "&" if "?" in path else "?"
    while not stop.is_set():
        try:
            listed = cluster.request("GET", path)
            objects = {o["metadata"]["uid"]: o for o in listed["items"]}
            on_change(objects)
            version = listed["metadata"]["resourceVersion"]
            for event in cluster.watch(f"{path}{sep}watch=1&resourceVersion={version}&timeoutSeconds=10"):
                if stop.is_set():
                    return
                obj = event.get("object") or {}
                uid = (obj.get("metadata") or {}).get("uid")
                if event.get("type") not in ("ADDED", "MODIFIED", "DELETED") or not uid:
                    break  # an error event (e.g. the version expired): list again
                if event["type"] == "DELETED":
                    objects.pop(uid, None)
                else:
                    objects[uid] = obj
                on_change(objects)
        except Exception as e:  # the API server restarting, a callback failing: log, wait, relist
            if not stop.is_set():
                print(f"follow {path}: {type(e).__name__}: {e}", flush=True)
            stop.wait(0.5)


def thread(name: str, target: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t
