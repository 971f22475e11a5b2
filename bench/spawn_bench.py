"""Spawn benchmark (numbers, not pass/fail): `make bench`.

1. Time from the REST API's start-server call to a ready server with LocalProfileSpawner (servers
   forked from the pre-started server process, mlaas.zygote), against a bare
   `jupyterhub-singleuser` started by hand (same machine, same run, same environment variables),
   and their ratio (issue #17: target <= 0.25). Rounds alternate to share background noise. With
   the hub as root, our servers run under per-user accounts, so the bare server runs under a user
   account too.
2. 20 users asking for a server at once: p50/p95 of each one's time to ready, and p95 against a
   single start (target <= 3).
3. Memory: PSS of each server process while 21 run (shared pages are split between the servers
   that share them), against the PSS of one exec'd server alone.
4. For reference, the same single start by exec (preforked servers off: the previous path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from jupyterhub.spawner import set_user_setuid  # noqa: E402

from mlaas.accounts import account_name, ensure_account  # noqa: E402
from procstat import machine_busy_seconds, proc_usage  # noqa: E402

from helpers import (  # noqa: E402  (the test helpers start the same platform as `make up`)
    ARTIFACTS,
    ensure_user,
    free_port,
    request_server,
    start_platform,
    stop_server,
    user_token,
    wait_ready,
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def time_our_spawn(hub, name: str, token: str) -> float:
    t0 = time.perf_counter()
    r = request_server(hub, name, token, {"profile": "cpu-small"})
    if r.status_code == 202:
        wait_ready(hub, name, timeout=300)
    elif r.status_code != 201:
        raise RuntimeError(f"spawn refused: {r.status_code} {r.text}")
    elapsed = time.perf_counter() - t0
    stop_server(hub, name)
    return elapsed


def time_bare_singleuser(hub, name: str, token: str) -> float:
    """jupyterhub-singleuser by hand, with the environment the hub would give it; time to first answer."""
    port = free_port()
    prefix = f"/user/{name}/"
    hub_api = f"http://127.0.0.1:{hub.platform.settings.hub_port}/hub/api"
    env = {
        "PATH": f"{sys.prefix}/bin:/usr/bin:/bin",
        "HOME": str(hub.state_dir / "bare-home"),
        "JUPYTERHUB_API_TOKEN": token,
        "JPY_API_TOKEN": token,
        "JUPYTERHUB_API_URL": hub_api,
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_SERVICE_PREFIX": prefix,
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}{prefix}",
        "JUPYTERHUB_USER": name,
        "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-{name}",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": f"{prefix}oauth_callback",
        "JUPYTERHUB_HOST": "",
        "JUPYTERHUB_DEFAULT_URL": "/lab",
        "JUPYTER_CONFIG_PATH": str(REPO / "hub" / "user_env" / "jupyter"),
    }
    args = [f"{sys.prefix}/bin/jupyterhub-singleuser", f"--port={port}", "--ip=127.0.0.1"]
    preexec = None
    if os.geteuid() == 0:  # like our servers: a user account, not root
        account = ensure_account(account_name(name), name, Path(env["HOME"]))
        preexec = set_user_setuid(account.name, chdir=False)
    else:
        Path(env["HOME"]).mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{port}{prefix}api"
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=env["HOME"],
                            preexec_fn=preexec)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bare jupyterhub-singleuser exited with {proc.returncode}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready_by_events(hub, name: str, token: str) -> None:
    """Wait on the spawn's progress stream (what the browser's progress page does), not by polling."""
    url = f"{hub.url}/hub/api/users/{name}/server/progress"
    with hub.api(token).get(url, stream=True, timeout=600) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("ready"):
                    return
                if event.get("failed"):
                    raise RuntimeError(f"{name}: {event.get('message')}")
    wait_ready(hub, name, timeout=60)  # the stream ended: the spawn finished in between


def concurrent_spawns(hub, n: int, keep: bool = False, usage: dict | None = None) -> list[float]:
    """`keep`: leave the servers running (the caller measures them and stops them). `usage`, if
    given, receives the CPU-seconds the machine and the hub spent from the first request to the
    last server's readiness."""
    names = [f"load-{i:02d}" for i in range(n)]
    tokens = {}
    for name in names:
        ensure_user(hub, name, ["ml-users"])
        tokens[name] = user_token(hub, name)
    times: dict[str, float] = {}
    barrier = threading.Barrier(n)

    def one(name: str) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        r = request_server(hub, name, tokens[name], {"profile": "cpu-small"})
        if r.status_code == 202:  # still starting after the hub's 10 s: follow its progress stream
            wait_ready_by_events(hub, name, tokens[name])
        elif r.status_code != 201:
            raise RuntimeError(f"{name}: {r.status_code} {r.text}")
        times[name] = time.perf_counter() - t0

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    hub_pid = hub.platform.hub.pid
    busy0, hub0, t0 = machine_busy_seconds(), proc_usage(hub_pid)[0], time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if usage is not None:
        usage.update(machine_cpu_s=machine_busy_seconds() - busy0, hub_cpu_s=proc_usage(hub_pid)[0] - hub0,
                     wall_s=time.perf_counter() - t0)
    if not keep:
        for name in names:
            stop_server(hub, name, timeout=120)
    if len(times) != n:
        raise RuntimeError(f"only {len(times)} of {n} servers became ready")
    return list(times.values())


def server_pss(prefix: str) -> dict[str, int]:
    """PSS in bytes of each running server process whose user's name starts with `prefix`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if len(cmdline) < 2 or not cmdline[1].endswith(b"/jupyterhub-singleuser"):
                continue
            env = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
            user = env.get(b"JUPYTERHUB_USER", b"").decode()
            if not user.startswith(prefix):
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    out[user] = int(line.split()[1]) * 1024
        except OSError:
            continue
    return out


PREVIOUS = {  # issue #17, measured on main before the zygote (2 cores, one run)
    "single_ratio": 0.98, "burst_p95_over_single": 45.5 / 3.17, "bare_s": 3.24, "ours_s": 3.17,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--with-culler-comparison", action="store_true",
                        help="also time single starts on a platform with both cullers and the scraper off")
    args = parser.parse_args()
    token_file = ARTIFACTS / "bench-metrics-token"
    ARTIFACTS.mkdir(exist_ok=True)
    token_file.write_text("bench-metrics-" + "7" * 32)
    hub = start_platform("bench", profiles=REPO / "spawner_profiles", spawn_timeout=600,
                         metrics_token_file=str(token_file))
    stop = threading.Event()

    def scrape() -> None:  # as a site's Prometheus would, every second
        session = requests.Session()
        session.headers["Authorization"] = f"token {token_file.read_text()}"
        while not stop.wait(1.0):
            try:
                session.get(f"{hub.url}/hub/metrics", timeout=10)
            except requests.RequestException:
                pass

    threading.Thread(target=scrape, daemon=True).start()
    try:
        results = measure(hub, args)
    finally:
        stop.set()
        hub.platform.stop()

    print("\nThe same single start by exec (preforked servers off: the path before the zygote)…", flush=True)
    by_exec = start_platform("bench-exec", profiles=REPO / "spawner_profiles", spawn_timeout=600,
                             preforked_servers=False)
    try:
        ensure_user(by_exec, "bench-ours", ["ml-users"])
        token = user_token(by_exec, "bench-ours")
        time_our_spawn(by_exec, "bench-ours", token)  # warm-up
        execs = [time_our_spawn(by_exec, "bench-ours", token) for _ in range(max(2, args.rounds // 2))]
        request_server(by_exec, "bench-ours", token, {"profile": "cpu-small"})
        wait_ready(by_exec, "bench-ours", timeout=300)
        exec_pss = server_pss("bench-ours").get("bench-ours", 0)
        stop_server(by_exec, "bench-ours")
    finally:
        by_exec.platform.stop()
    results["exec_s"] = execs
    results["exec_pss_bytes"] = exec_pss
    print(f"  by exec: {statistics.median(execs):.2f} s (median of {len(execs)}); one server alone: PSS "
          f"{exec_pss / 2**20:.0f} MiB")

    if args.with_culler_comparison:
        print("\nSingle spawns with the idle culler and GPU culler off and no metrics scraper…", flush=True)
        plain = start_platform("bench-noculler", profiles=REPO / "spawner_profiles", spawn_timeout=600,
                               culling={"enabled": False})
        try:
            ensure_user(plain, "bench-ours", ["ml-users"])
            token = user_token(plain, "bench-ours")
            time_our_spawn(plain, "bench-ours", token)  # warm-up
            without = [time_our_spawn(plain, "bench-ours", token) for _ in range(args.rounds)]
        finally:
            plain.platform.stop()
        ratio = statistics.median(results["ours_s"]) / statistics.median(without)
        print(f"  without: {statistics.median(without):.2f} s   with culler, GPU culler and a 1 s metrics scrape: "
              f"{statistics.median(results['ours_s']):.2f} s   ratio {ratio:.2f}")
        results["culler_and_metrics"] = {"without_s": without, "ratio_median": ratio}

    single, bare = statistics.median(results["ours_s"]), statistics.median(results["bare_s"])
    burst = results["concurrent"]
    pss = results["pss_bytes"]
    print("\nIssue #17, goal 1 (figure / target / before the zygote):")
    print(f"  one start, ours / bare jupyterhub-singleuser : {single / bare:.3f} / <= 0.25 / "
          f"{PREVIOUS['single_ratio']:.2f}   ({single:.2f} s vs {bare:.2f} s)")
    print(f"  {burst['n']} at once, p95 / one start            : {burst['p95_s'] / single:.2f} / <= 3 / "
          f"{PREVIOUS['burst_p95_over_single']:.1f}   (p95 {burst['p95_s']:.2f} s)")
    # however the starts are ordered, the 19th of 20 cannot be ready before 19/20 of their CPU work
    # is done on this machine's CPUs: the least p95 / one start this design can reach here
    cpus = os.cpu_count() or 1
    floor = 0.95 * burst["n"] * burst["cpu_per_start_s"] / cpus
    print(f"    its floor on {cpus} CPUs: p95 >= 95 % of the burst's CPU work / CPUs = {floor:.2f} s = "
          f"{floor / single:.2f} x one start; the hub's share alone {burst['hub_cpu_s'] / burst['machine_cpu_s']:.0%} "
          f"of it, on one CPU: {0.95 * burst['hub_cpu_s'] / single:.2f} x one start")
    print(f"  PSS per server, {len(pss)} running (mean)         : {statistics.mean(pss.values()) / 2**20:.0f} MiB "
          f"(first {results['pss_first_bytes'] / 2**20:.0f} MiB, last {results['pss_last_bytes'] / 2**20:.0f} MiB) vs "
          f"{exec_pss / 2**20:.0f} MiB for one exec'd server alone" if pss else "  PSS: not measured")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "bench-spawn.json").write_text(json.dumps(results, indent=2))
    return 0


def measure(hub, args) -> dict:
    ensure_user(hub, "bench-ours", ["ml-users"])
    ensure_user(hub, "bench-bare", ["ml-users"])
    ours_token, bare_token = user_token(hub, "bench-ours"), user_token(hub, "bench-bare")
    print("warming up (first spawn creates the account; caches fill)…", flush=True)
    time_our_spawn(hub, "bench-ours", ours_token)
    time_bare_singleuser(hub, "bench-bare", bare_token)
    ours, bare = [], []
    for i in range(args.rounds):
        bare.append(time_bare_singleuser(hub, "bench-bare", bare_token))
        ours.append(time_our_spawn(hub, "bench-ours", ours_token))
        print(f"  round {i + 1}: bare {bare[-1]:.2f}s  ours {ours[-1]:.2f}s", flush=True)
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"\nSingle spawn, API call -> ready server ({args.rounds} rounds, median):")
    print(f"  bare jupyterhub-singleuser : {statistics.median(bare):.2f} s")
    print(f"  LocalProfileSpawner        : {statistics.median(ours):.2f} s")
    print(f"  ratio                      : {ratio:.3f}  (target <= 0.25)")

    print(f"\n{args.concurrent} users spawning at once…", flush=True)
    usage: dict = {}
    times = concurrent_spawns(hub, args.concurrent, keep=True, usage=usage)
    cpus = os.cpu_count() or 1
    per_start = usage["machine_cpu_s"] / args.concurrent
    print(f"  p50 {percentile(times, 0.5):.2f} s   p95 {percentile(times, 0.95):.2f} s   "
          f"max {max(times):.2f} s   all ready in {usage['wall_s']:.1f} s  ({cpus} CPUs)")
    print(f"  CPU per start (whole machine, first request to last ready): {per_start * 1000:.0f} ms, of it the hub "
          f"{usage['hub_cpu_s'] / args.concurrent * 1000:.0f} ms; the CPUs were "
          f"{100 * usage['machine_cpu_s'] / (usage['wall_s'] * cpus):.0f} % busy")
    # one more: the 21st server, while the 20 run
    request_server(hub, "bench-ours", ours_token, {"profile": "cpu-small"})
    wait_ready(hub, "bench-ours", timeout=300)
    time.sleep(2)  # the servers' start-up work is over
    per_server = server_pss("load-") | server_pss("bench-ours")
    first, last = per_server.get("load-00", 0), per_server.get("bench-ours", 0)
    print(f"  PSS with {len(per_server)} servers running: mean {statistics.mean(per_server.values()) / 2**20:.0f} MiB, "
          f"total {sum(per_server.values()) / 2**20:.0f} MiB", flush=True)
    for name in [f"load-{i:02d}" for i in range(args.concurrent)] + ["bench-ours"]:
        stop_server(hub, name, timeout=120)
    return {
        "bare_s": bare, "ours_s": ours, "ratio_median": ratio,
        "concurrent": {"n": args.concurrent, "p50_s": percentile(times, 0.5),
                       "p95_s": percentile(times, 0.95), "times_s": sorted(times), **usage,
                       "cpu_per_start_s": per_start},
        "pss_bytes": per_server, "pss_first_bytes": first, "pss_last_bytes": last,
    }


if __name__ == "__main__":
    sys.exit(main())
