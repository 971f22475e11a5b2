"""`mlaas profiles check`: the table for good files, precise errors for bad ones (real CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def _errors(text: str) -> list[str]:
    from mlaas.profiles import ProfileErrors
    from mlaas.profiles.loader import load_profile_texts

    with pytest.raises(ProfileErrors) as e:
        load_profile_texts([("t.yaml", text)])
    return [str(x) for x in e.value.errors]


BASE = "profiles:\n  - slug: p\n    display_name: P\n    groups: ['*']\n"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", "NaN", "nan", "inf"])
def test_nan_and_infinities_are_refused_for_every_number(value):
    cpu = _errors(BASE + f"    cpu: {{limit: {value}}}\n    memory: {{limit: 1Gi}}\n")
    assert any("profiles[0].cpu.limit" in e for e in cpu), cpu
    memory = _errors(BASE + f"    cpu: {{limit: 1}}\n    memory: {{limit: {value}}}\n")
    assert any("profiles[0].memory.limit" in e for e in memory), memory
    quota = _errors(f"quotas:\n  - group: g\n    cpu: {value}\n")
    assert any("quotas[0].cpu" in e for e in quota), quota
    dask = _errors(f"dask:\n  cluster_max_cores: {value}\n")
    assert any("dask.cluster_max_cores" in e for e in dask), dask


def test_alias_bombs_and_oversized_files_are_refused_with_the_reason():
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (error,) = _errors("\n".join(levels) + "\nprofiles: *a8\n")
    assert "t.yaml: expands to more than 20,000 values" in error
    (error,) = _errors("# " + "x" * 300_000 + "\n")
    assert "t.yaml: is 300,003 bytes; a profile file may be at most 262,144 bytes" in error


def test_env_and_texts_are_bounded():
    many = "".join(f"      V{i}: x\n" for i in range(65))
    errors = _errors(BASE + "    cpu: {limit: 1}\n    memory: {limit: 1Gi}\n    env:\n" + many)
    assert any("profiles[0].env" in e and "at most 64" in e for e in errors), errors
    errors = _errors(BASE + "    cpu: {limit: 1}\n    memory: {limit: 1Gi}\n    env: {BIG: " + "y" * 5000 + "}\n")
    assert any("profiles[0].env" in e and "4096" in e for e in errors), errors
    errors = _errors(BASE.replace("display_name: P", "display_name: " + "P" * 200) + "    cpu: {limit: 1}\n    memory: {limit: 1Gi}\n")
    assert any("display_name" in e for e in errors), errors


def test_a_profile_file_that_becomes_a_directory_or_vanishes_is_reported_and_its_profiles_stay(tmp_path):
    from mlaas.profiles import ProfileStore

    (tmp_path / "a.yaml").write_text(BASE + "    cpu: {limit: 1}\n    memory: {limit: 1Gi}\n")
    (tmp_path / "b.yaml").write_text(BASE.replace("slug: p", "slug: q") + "    cpu: {limit: 1}\n    memory: {limit: 1Gi}\n")
    store = ProfileStore(tmp_path, tmp_path / "snapshot.json")
    assert store.current().slugs == ["p", "q"] and store.errors == []

    (tmp_path / "a.yaml").unlink()
    assert store.current().slugs == ["p", "q"]  # not silently withdrawn
    assert "a.yaml: is gone (deleted or renamed) with profile(s) p, which stay in force" in str(store.errors[0])

    (tmp_path / "a.yaml").mkdir()
    assert store.current().slugs == ["p", "q"]
    assert any("a.yaml: is a directory, not a profile file" in str(e) for e in store.errors)

    (tmp_path / "a.yaml").rmdir()
    (tmp_path / "a.yaml").write_text("profiles: []\n")  # withdrawn on purpose
    assert store.current().slugs == ["q"] and store.errors == []


def test_two_groups_whose_projects_would_share_names_are_refused():
    """`x.y` needs hashing for its project's names; a group literally named like the result would
    share its storage, hub user and Unix group."""
    from mlaas.projects.names import project_slug

    twin = project_slug("x.y")
    (error,) = _errors(f"projects:\n  - group: x.y\n  - group: {twin}\n")
    assert f"project of group '{twin}'" in error and "the same as the project of group 'x.y'" in error
