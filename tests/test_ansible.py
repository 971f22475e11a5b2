"""Ansible: every playbook passes `--syntax-check`, `ansible-lint` (production profile, offline)
is clean, and the XCache role is applied for real to this machine (local connection) in front
of a real XRootD origin, then a file is read through that cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import needs_root
from helpers import free_port, state_root
from mlaas.xcache import origin_process, xrootd_binary

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted((ANSIBLE / "playbooks").glob("*.yml"))


def ansible_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_LOCAL_TEMP": str(state_root() / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1"}


@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda p: p.name)
def test_playbook_syntax(playbook):
    r = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", str(playbook)], cwd=ANSIBLE,
                       capture_output=True, text=True, env=ansible_env())
    assert r.returncode == 0, r.stdout + r.stderr


def test_ansible_lint_is_clean():
    r = subprocess.run([str(BIN / "ansible-lint")], cwd=ANSIBLE, capture_output=True, text=True, env=ansible_env(),
                       timeout=600)
    assert r.returncode == 0 and "Profile 'production' was required, and it passed" in r.stdout + r.stderr, (
        r.stdout[-3000:] + r.stderr[-3000:]
    )


@needs_root
@pytest.mark.skipif(xrootd_binary() is None, reason="xrootd-server is not installed (CI installs it)")
def test_xcache_role_applied_to_localhost_serves_reads_through_the_cache():
    root = state_root() / f"ansible-xcache-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    origin_port, cache_port = free_port(), free_port()
    origin = origin_process("ansible", origin_port, root / "origins" / "ansible" / "data", root)
    payload = os.urandom(3 * 2**20)
    (origin.base_dir / "data" / "store").mkdir(parents=True)
    (origin.base_dir / "data" / "store" / "events.bin").write_bytes(payload)
    origin.start()
    name = f"t{os.getpid()}"
    host_vars = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,  # already root
        "xcache_name": name,
        "xcache_origin_url": f"root://127.0.0.1:{origin_port}",
        "xcache_port": cache_port,
        "xcache_ram": "1g",
        "xcache_cache_dir": str(root / "cache"),
        "xcache_run_dir": str(root / "run"),
        "xcache_config_dir": str(root / "etc"),
        "xcache_use_systemd": False,  # no systemd in CI; the role starts xrootd in the background
    }
    inventory = root / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"all": {"children": {"xcaches": {"hosts": {"localhost": host_vars}}}}}))
    run = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(ANSIBLE / "playbooks" / "xcache.yml")]
    try:
        first = subprocess.run(run, cwd=ANSIBLE, capture_output=True, text=True, env=ansible_env(), timeout=300)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
        config = (root / "etc" / f"{name}.cfg").read_text()
        assert f"pss.origin 127.0.0.1:{origin_port}" in config and f"xrd.port {cache_port}" in config

        from XRootD import client

        f = client.File()
        status, _ = f.open(f"root://127.0.0.1:{cache_port}//store/events.bin")
        assert status.ok, status.message
        status, data = f.read(0, len(payload) + 1)
        f.close()
        assert status.ok and hashlib.sha256(data).hexdigest() == hashlib.sha256(payload).hexdigest()
        cached = root / "cache" / "store" / "events.bin"
        deadline = time.monotonic() + 10
        while not cached.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert cached.exists(), "the file did not land in the cache directory"

        second = subprocess.run(run, cwd=ANSIBLE, capture_output=True, text=True, env=ansible_env(), timeout=300)
        assert second.returncode == 0 and "changed=0" in second.stdout, second.stdout[-3000:]  # idempotent
    finally:
        for pid_file in (root / "run").rglob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
        origin.stop()
