"""Shared fixtures: one real platform for the session (dev IdP, hub, proxy, servers)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# KubeSpawner's mock mode still loads a kubeconfig when it is built: give it one that points
# nowhere, before anything imports kubernetes_asyncio. No test talks to a cluster.
_KUBECONFIG = Path(__file__).parent / "fixtures" / "kubeconfig-nowhere.yaml"
os.environ["KUBECONFIG"] = str(_KUBECONFIG)

import pytest

from helpers import ARTIFACTS, FIXTURES, RunningPlatform, start_platform, state_root


def pytest_sessionstart(session: pytest.Session) -> None:
    # State of earlier runs (servers are gone; their files would only pile up).
    root = state_root()
    for old in root.iterdir():
        shutil.rmtree(old, ignore_errors=True)
    ARTIFACTS.mkdir(exist_ok=True)


@pytest.fixture(scope="session")
def hub() -> RunningPlatform:
    running = start_platform("main")
    yield running
    running.platform.stop()
    shutil.copytree(running.log_dir, ARTIFACTS / "main-logs", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def gpu_hub() -> RunningPlatform:
    """A platform whose GPU inventory is simulated (tests/fixtures/inventory-a100-mig.yaml):
    this machine has no NVIDIA GPU, so NVML is the one part replaced."""
    running = start_platform("gpu", gpu_inventory=str(FIXTURES / "inventory-a100-mig.yaml"))
    yield running
    running.platform.stop()
    shutil.copytree(running.log_dir, ARTIFACTS / "gpu-logs", dirs_exist_ok=True)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="per-user accounts and cgroups need the hub to run as root (CI runs as root)"
)
