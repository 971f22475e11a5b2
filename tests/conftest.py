"""Shared fixtures: one real platform for the session (dev IdP, hub, proxy, servers)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# KubeSpawner's mock mode still loads a kubeconfig when it is built: give it one that points
# nowhere, before anything imports kubernetes_asyncio. No test talks to a cluster.
_KUBECONFIG = Path(__file__).parent / "fixtures" / "kubeconfig-nowhere.yaml"
os.environ["KUBECONFIG"] = str(_KUBECONFIG)

import pytest
import yaml

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
    this machine has no NVIDIA GPU, so NVML is the one part replaced, and its device nodes are
    stand-ins (`gpu_device_nodes`)."""
    nodes = gpu_device_nodes()
    inventory = yaml.safe_load((FIXTURES / "inventory-a100-mig.yaml").read_text())
    inventory["device_nodes"] = str(nodes)
    path = nodes.parent / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory))
    profiles = nodes.parent / "profiles"
    shutil.copytree(FIXTURES / "profiles", profiles)
    (profiles / "gpu-idle.yaml").write_text(yaml.safe_dump({"profiles": [{
        "slug": "gpu-idle", "display_name": "One GPU, stopped when unused", "cpu": {"limit": 1},
        "memory": {"limit": "1Gi"}, "gpu": {"count": 1}, "gpu_idle_timeout": 30, "groups": ["*"]}]}))
    running = start_platform("gpu", gpu_inventory=str(path), profiles=profiles, culling={"gpu_every": 2},
                             tracking={"enabled": False})
    yield running
    running.platform.stop()
    shutil.copytree(running.log_dir, ARTIFACTS / "gpu-logs", dirs_exist_ok=True)
    shutil.rmtree(nodes.parent, ignore_errors=True)


GPU_NODES = ["nvidia0", "nvidia1", "nvidiactl", "nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap2",
             "nvidia-caps/nvidia-cap21", "nvidia-caps/nvidia-cap22", "nvidia-caps/nvidia-cap30",
             "nvidia-caps/nvidia-cap31"]


def gpu_device_nodes() -> Path:
    """Stand-ins for the NVIDIA device nodes of tests/fixtures/inventory-a100-mig.yaml (no driver
    here): readable files, each holding its own name, where /dev/nvidia* would be. The GPU fence
    hides a node the same way for a file as for a device (a bind mount of /dev/null over it), so a
    server reading a name sees the node, and reading nothing means it is fenced off. nvidia-cap1
    and 2 stand for the MIG config and monitor capabilities."""
    root = Path(tempfile.mkdtemp(prefix="mlaas-gpu-nodes-"))
    root.chmod(0o755)
    dev = root / "dev"
    for name in GPU_NODES:
        node = dev / name
        node.parent.mkdir(parents=True, exist_ok=True)
        node.parent.chmod(0o755)
        node.write_text(name.rsplit("/", 1)[-1])
        node.chmod(0o666)
    return dev


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium, driven by Playwright. Per module: Playwright's sync API keeps
    an event loop running in this thread while it is open, which asyncio.run() elsewhere refuses."""
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def browser_login(page, hub_url: str, username: str, password: str) -> None:
    """Sign in through the dev IdP's own login page, as a person does."""
    page.goto(f"{hub_url}/hub/oauth_login")
    page.wait_for_selector("#username")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login")
    page.wait_for_url(f"{hub_url}/**")


def open_profile_editor(page, hub_url: str, password: str, slug: str) -> None:
    """Sign in as the demo admin, open the admin page and the editor of one profile."""
    browser_login(page, hub_url, "admin", password)
    for attempt in range(3):  # right after a hub (re)start its services may still be starting: reload, as a person would
        page.goto(f"{hub_url}/services/mlaas-admin/")
        try:
            page.wait_for_selector(f"#profiles-table tr[data-slug={slug}]", timeout=15_000)
            break
        except Exception:
            if attempt == 2:
                raise AssertionError(f"no profile {slug} on the admin page {page.url}:\n"
                                     f"{page.inner_text('body')[:2000]}") from None
    page.click(f"#profiles-table tr[data-slug={slug}] button.edit")


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="per-user accounts and cgroups need the hub to run as root (CI runs as root)"
)
