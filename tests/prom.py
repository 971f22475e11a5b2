"""A real Prometheus (Debian's package) for tests: started with a given configuration on a free
port, queried through its HTTP API, stopped with its log kept in test-artifacts."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from helpers import ARTIFACTS, free_port


class Prometheus:
    def __init__(self, root: Path, scrape_configs: list[dict], rule_files: list[str] | None = None):
        self.root = root
        self.config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                       "rule_files": rule_files or [], "scrape_configs": scrape_configs}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Prometheus:
        if shutil.which("prometheus") is None:
            pytest.fail("Prometheus is not installed (Debian: apt-get install prometheus); .ci/run installs it")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(self.config))
        port = free_port()
        log = open(self.root / "prometheus.log", "wb")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={self.root / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={self.root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(self.root / "prometheus.log", ARTIFACTS / f"prometheus-{self.root.name}.log")

    def query(self, expr: str) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, expr: str, timeout: float = 30) -> float | None:
        """The single value of `expr` once Prometheus has it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                result = self.query(expr)
            except requests.RequestException:
                result = []
            if len(result) == 1:
                return float(result[0]["value"][1])
            time.sleep(0.5)
        return None
