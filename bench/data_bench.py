"""Data and Dask benchmark (numbers, not pass/fail): `make bench`.

1. Read throughput of one 1 GiB file, same run: through the XCache cold (first read, fetched
   from the origin) and warm (the cache holds it completely): as `mlaas.data.open` reads it (the
   cache hands its complete copy over: direct cache access) and as any XRootD client reads it
   (fsspec: the client follows the cache's local redirect itself); directly from the origin; and
   from local disk. The OS page cache is dropped before each read where this machine allows it.
   Issue #17, goal 2: warm >= 0.9 x local disk, cold >= 0.8 x the origin read directly.
2. Time from `Gateway().new_cluster()` in a user's server to a cluster with 2 ready workers.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import (  # noqa: E402
    ARTIFACTS,
    ensure_user,
    free_port,
    kernel_json,
    start_platform,
    start_server,
    state_root,
    stop_server,
    user_token,
)

from mlaas import data  # noqa: E402
from mlaas.xcache import DataSettings, OriginSettings, cache_process, client_env, origin_process  # noqa: E402

SIZE = 1 << 30
CHUNK = 16 << 20


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_read(open_file) -> float:
    t0 = time.perf_counter()
    n = 0
    with open_file() as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
    assert n == SIZE, n
    return SIZE / (time.perf_counter() - t0) / 1e6


ROUNDS = 3  # a fresh file each round (a cold read happens once per file); medians are reported


def throughput() -> dict:
    root = state_root() / f"bench-data-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    port = free_port()
    origin = origin_process("bench", port, root / "origins" / "bench" / "data", root)
    target = origin.base_dir / "data" / "store" / "bench"
    target.mkdir(parents=True)
    origin.start()
    settings = DataSettings(origins=[OriginSettings(name="bench", url=f"root://127.0.0.1:{port}",
                                                    namespace="/store/bench", cache_port=free_port())])
    cache = cache_process(settings.origins[0], settings, root)
    cache.start()
    os.environ.update(client_env(settings, root))
    import fsspec

    rounds: dict[str, list[float]] = {}
    dropped = True
    try:
        for i in range(ROUNDS):
            name = f"1g-{i}.bin"
            with open(target / name, "wb") as f:
                for _ in range(SIZE // CHUNK):
                    f.write(os.urandom(CHUNK))
            reads = {
                "cache_cold_MBps": lambda: data.open(f"/store/bench/{name}"),
                "cache_warm_MBps": lambda: data.open(f"/store/bench/{name}"),
                "cache_warm_fsspec_MBps": lambda: fsspec.open(data.url(f"/store/bench/{name}"), "rb").open(),
                "origin_direct_MBps": lambda: fsspec.open(f"root://127.0.0.1:{port}//store/bench/{name}", "rb").open(),
                "local_disk_MBps": lambda: open(target / name, "rb"),
            }
            for key, opener in reads.items():
                dropped = drop_page_cache() and dropped
                rounds.setdefault(key, []).append(timed_read(opener))
            print(f"  round {i + 1}: " + "  ".join(f"{k.removesuffix('_MBps')} {v[-1]:.0f}" for k, v in rounds.items()),
                  flush=True)
            (target / name).unlink()
    finally:
        cache.stop()
        origin.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {**{k: statistics.median(v) for k, v in rounds.items()}, "rounds": rounds, "page_cache_dropped": dropped}


def dask_cluster_start() -> float:
    hub = start_platform("bench-dask")
    try:
        ensure_user(hub, "bench-dask", ["ml-users", "dask-testers"])
        token = user_token(hub, "bench-dask")
        start_server(hub, "bench-dask", token, {"profile": "dask-notebook"})
        result = kernel_json(hub, "bench-dask", token, """
import json, time
from dask_gateway import Gateway
t0 = time.perf_counter()
cluster = Gateway().new_cluster()
cluster.scale(2)
client = cluster.get_client()
client.wait_for_workers(2, timeout=180)
elapsed = time.perf_counter() - t0
cluster.shutdown()
print(json.dumps({"seconds": elapsed}))
""")
        stop_server(hub, "bench-dask")
        return result["seconds"]
    finally:
        hub.platform.stop()


# issue #17's figures before direct cache access and the tuned cache (fresh clone, 2 cores)
BEFORE = {"warm_vs_local": 0.34, "cold_vs_origin": 0.61}


def main() -> int:
    print(f"Reading a {SIZE >> 20} MiB file in {CHUNK >> 20} MiB chunks, a fresh file in each of {ROUNDS} rounds "
          "(medians below)…", flush=True)
    r = throughput()
    local = r["local_disk_MBps"]
    note = "" if r["page_cache_dropped"] else "  (page cache could not be dropped: reads may be from memory)"
    for key, label in (("cache_cold_MBps", "through XCache, cold"),
                       ("cache_warm_MBps", "through XCache, warm (mlaas.data: the cache's copy)"),
                       ("cache_warm_fsspec_MBps", "through XCache, warm (fsspec: local redirect)"),
                       ("origin_direct_MBps", "origin directly"), ("local_disk_MBps", "local disk")):
        print(f"  {label:52} {r[key]:8.0f} MB/s   {r[key] / local:5.2f} x local disk")
    print(f"  warm/cold {r['cache_warm_MBps'] / r['cache_cold_MBps']:.2f}{note}")
    print("\nIssue #17, goal 2 (figure / target / before):")
    print(f"  warm through the cache / local disk : {r['cache_warm_MBps'] / local:.2f} / >= 0.9 / {BEFORE['warm_vs_local']}")
    print(f"  cold through the cache / origin     : {r['cache_cold_MBps'] / r['origin_direct_MBps']:.2f} / >= 0.8 / "
          f"{BEFORE['cold_vs_origin']}")
    seconds = dask_cluster_start()
    print(f"\nDask: Gateway().new_cluster() in a user's server to 2 ready workers: {seconds:.2f} s")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bench-data.json").write_text(json.dumps({**r, "dask_two_workers_s": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
