"""`mlaas profiles check`: the table for good files, precise errors for bad ones (real CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import FIXTURES

REPO = Path(__file__).resolve().parents[1]


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlaas.cli", "profiles", "check", str(path)], capture_output=True, text=True
    )


def test_shipped_profiles_pass_and_print_a_table():
    r = check(REPO / "spawner_profiles")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["SLUG", "(*"]
    slugs = [line.split()[0] for line in lines[2:] if line and not line.startswith(" ") and "profile(s)" not in line]
    # the lab's set: small and large CPU, a whole GPU, two MIG sizes and a group-reserved one
    assert {"cpu-small", "cpu-large", "gpu-a100", "mig-1g-10gb", "mig-3g-20gb", "atlas-2xa100"} <= set(slugs)
    assert "cpu-small *" in r.stdout  # the default is marked
    assert "1x MIG 3g.20gb" in r.stdout and "atlas-ml" in r.stdout


def test_broken_yaml_names_file_and_line():
    r = check(FIXTURES / "bad" / "broken.yaml")
    assert r.returncode == 1
    assert "broken.yaml:5: YAML syntax error" in r.stderr


def test_unknown_field_names_file_line_and_field():
    r = check(FIXTURES / "bad" / "unknown_field.yaml")
    assert r.returncode == 1
    assert "unknown_field.yaml:11 profiles[1].gpus: unknown field" in r.stderr


def test_duplicate_slug_across_files_names_both_places():
    r = check(FIXTURES / "dup")
    assert r.returncode == 1
    assert "b.yaml:8 slug 'same': duplicate: already defined at" in r.stderr
    assert "a.yaml:2" in r.stderr


def test_absurd_and_negative_resources_and_bad_groups_are_errors():
    r = check(FIXTURES / "bad" / "absurd.yaml")
    assert r.returncode == 1
    err = r.stderr
    assert "absurd.yaml:4 profiles[0].cpu: guarantee 4 is more than limit 2" in err
    assert "absurd.yaml:5 profiles[0].memory.limit: '900Ti' is more than 64 TiB" in err
    assert "absurd.yaml:6 profiles[0].mig: '3g.21gb' is not a MIG profile" in err
    assert "absurd.yaml:7 profiles[0].groups: 'atlas ml' is not a group name" in err
    assert "4 error(s)" in err
