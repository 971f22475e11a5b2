"""Container images, checked without a container engine: hadolint (the PyPI binary) on every
Dockerfile, every installed package pinned, a non-root user, and `make images` refusing clearly
where no engine exists (this machine has none)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "images").glob("*/Dockerfile"))
HADOLINT = Path(sys.executable).parent / "hadolint"


def test_the_six_images_exist():
    assert {d.parent.name for d in DOCKERFILES} == {"user-cpu", "user-cuda", "hub", "gateway", "xcache", "tracking"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.parent.name)
def test_hadolint_is_clean(dockerfile):
    r = subprocess.run([str(HADOLINT), "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.parent.name)
def test_base_and_packages_are_pinned_and_the_user_is_not_root(dockerfile):
    text = dockerfile.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest") and re.search(r":\S*\d", base), base
    for line in re.findall(r"apt-get install[^\n]*(?:\\\n[^\n]*)*", text):
        packages = [w for w in line.replace("\\\n", " ").split()[2:] if not w.startswith("-") and w not in {"&&", "\\"}]
        packages = packages[: packages.index("&&")] if "&&" in packages else packages
        assert packages and all("=" in p for p in packages), f"unpinned apt packages: {packages}"
    for req in re.findall(r"--requirement\s+(\S+)", text):
        source = REPO / "images" / dockerfile.parent.name / Path(req).name
        for line in source.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("--"):
                assert re.match(r"^[A-Za-z0-9_.\[\]-]+==[0-9][^ ]*$", line), f"{source.name}: unpinned {line!r}"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in {"0", "root"}, f"{dockerfile}: the image ends as root"


def test_user_image_versions_match_the_platform():
    """The image's notebook stack is the one the tests run (same pins as this environment)."""
    from importlib.metadata import version

    for line in (REPO / "images/user-cpu/requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, pinned = line.split("==")
            assert version(name) == pinned, f"{name}: image {pinned}, platform {version(name)}"


def usable_engine() -> bool:
    if shutil.which("buildah"):
        return True
    for engine in ("docker", "podman"):
        if shutil.which(engine) and subprocess.run([engine, "info"], capture_output=True).returncode == 0:
            return True
    return False


@pytest.mark.skipif(usable_engine(), reason="a container engine works here: make images would build")
def test_make_images_says_clearly_that_no_engine_exists():
    r = subprocess.run(["make", "-s", "images"], cwd=REPO, capture_output=True, text=True, env={**os.environ})
    assert r.returncode != 0 and "No container engine" in r.stdout
