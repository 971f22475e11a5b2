"""tests/gpu/check.py on this machine: it needs an NVIDIA GPU and its driver, which the CI
machines do not have; there the check is skipped, saying so. On a GPU machine it runs for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlaas.capacity.nvml import read_nvml_inventory

CHECK = Path(__file__).resolve().parent / "gpu" / "check.py"


def test_the_gpu_check_script_passes_on_a_gpu_machine():
    inventory = read_nvml_inventory()
    if not inventory.devices:
        pytest.skip(f"no NVIDIA GPU here ({inventory.unavailable_reason}); run tests/gpu/check.py on a GPU machine")
    r = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
