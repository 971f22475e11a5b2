"""Experiment tracking benchmark (numbers, not pass/fail): `make bench`.

Issue #18: the time a notebook takes to log 1,000 metrics one by one (`mlflow.log_metric` in a
loop, the way training loops log) through the platform's tracking service, against the same
client logging straight to the MLflow server behind it (with the same user's MLflow password),
and their ratio. Then the same with one `log_batch` call of 1,000 metrics. Each client runs in a
fresh process with only the mlflow client's environment, as in a user's server; 3 rounds
alternating, medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import ensure_user, start_platform, user_token, wait_for_tracking  # noqa: E402

CLIENT = """
import json, sys, time, mlflow
from mlflow.entities import Metric
mlflow.set_experiment("bench")
with mlflow.start_run() as run:
    t0 = time.perf_counter()
    for step in range(1000):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    single = time.perf_counter() - t0
    now = int(time.time() * 1000)
    t0 = time.perf_counter()
    mlflow.MlflowClient().log_batch(run.info.run_id, metrics=[Metric("acc", i / 1000, now, i) for i in range(1000)])
    batch = time.perf_counter() - t0
print(json.dumps({"single": single, "batch": batch}))
"""


def run_client(env: dict[str, str]) -> dict[str, float]:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "MLFLOW_WORKSPACE": "bench-group"}
    r = subprocess.run([sys.executable, "-c", CLIENT], env={**base, **env}, capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    hub = start_platform("bench-tracking", profiles=REPO / "spawner_profiles")
    try:
        wait_for_tracking(hub)
        ensure_user(hub, "bench-tracker", ["bench-group"])
        token = user_token(hub, "bench-tracker")
        through = {"MLFLOW_TRACKING_URI": f"{hub.url}/services/mlflow", "MLFLOW_TRACKING_TOKEN": token}
        run_client(through)  # makes the MLflow user, its workspace and role (once), warms both ends
        secrets = json.loads((hub.platform.settings.state_dir / "tracking" / "secrets.json").read_text())
        port = hub.platform.settings.tracking.mlflow_port
        direct = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}/services/mlflow",
                  "MLFLOW_TRACKING_USERNAME": "bench-tracker",
                  "MLFLOW_TRACKING_PASSWORD": secrets["users"]["bench-tracker"]}
        rounds: dict[str, list[dict[str, float]]] = {"hub": [], "direct": []}
        for i in range(3):
            rounds["direct"].append(run_client(direct))
            rounds["hub"].append(run_client(through))
            print(f"  round {i + 1}: 1,000 log_metric calls through the hub {rounds['hub'][-1]['single']:.2f} s, "
                  f"straight to MLflow {rounds['direct'][-1]['single']:.2f} s", flush=True)
    finally:
        hub.platform.stop()
    med = {(k, kind): statistics.median(r[kind] for r in v) for k, v in rounds.items() for kind in ("single", "batch")}
    print("\nIssue #18: logging 1,000 metrics from a notebook (median of 3):")
    for kind, what in (("single", "1,000 × mlflow.log_metric"), ("batch", "one log_batch of 1,000")):
        print(f"  {what:27s}: through the hub {med[('hub', kind)]:.2f} s, straight to MLflow "
              f"{med[('direct', kind)]:.2f} s, ratio {med[('hub', kind)] / med[('direct', kind)]:.2f}")
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    (REPO / "test-artifacts" / "bench-tracking.json").write_text(json.dumps(rounds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
