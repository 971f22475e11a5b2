"""Group quotas, enforced at spawn on the real platform and shown to admins.

Uses the platform with the simulated GPU inventory (see conftest.gpu_hub). quota-team may hold
one 3g.20gb MIG slice, 2 CPU cores (sum of limits) and one server per member.
"""

from __future__ import annotations

import pytest

from helpers import FIXTURES, ensure_user, error_message, request_server, start_server, stop_server, user_token
from mlaas.profiles.loader import parse_file


@pytest.fixture(scope="module")
def team(gpu_hub):
    tokens = {}
    for name in ("q-alice", "q-bob", "q-carol"):
        ensure_user(gpu_hub, name, ["atlas-ml", "quota-team"])
        tokens[name] = user_token(gpu_hub, name)
    yield tokens
    for name in tokens:
        stop_server(gpu_hub, name)


def test_quota_refusal_names_the_quota_the_use_and_who_holds_it(gpu_hub, team):
    start_server(gpu_hub, "q-alice", team["q-alice"], {"profile": "mig-atlas"})

    r = request_server(gpu_hub, "q-bob", team["q-bob"], {"profile": "mig-atlas"})
    assert r.status_code == 403
    assert error_message(r) == (
        "Quota exceeded: group quota-team uses 1 of 1 MIG 3g.20gb slices: q-alice (mig-atlas); "
        "profile 'mig-atlas' needs 1 more."
    )
    # the form says so before anyone clicks
    listed = gpu_hub.api(team["q-bob"]).get(f"{gpu_hub.url}/hub/api/mlaas/profiles").json()
    mig = next(p for p in listed["profiles"] if p["slug"] == "mig-atlas")
    assert not mig["available"] and mig["unavailable_reason"].startswith("your group's quota is used")

    start_server(gpu_hub, "q-bob", team["q-bob"], {"profile": "small"})  # 1 + 1 = 2 CPU cores
    r = request_server(gpu_hub, "q-carol", team["q-carol"], {"profile": "small"})
    assert r.status_code == 403
    assert "group quota-team uses 2 of 2 CPU cores: q-alice (mig-atlas), q-bob (small)" in error_message(r)

    report = gpu_hub.api().get(f"{gpu_hub.url}/hub/api/mlaas/quotas").json()["groups"]
    team_use = next(g for g in report if g["group"] == "quota-team")
    assert team_use["used"] == {"cpu": 2.0, "memory": float(2**30 + 512 * 2**20), "mig:3g.20gb": 1}
    assert {(s["user"], s["profile"]) for s in team_use["servers"]} == {("q-alice", "mig-atlas"), ("q-bob", "small")}

    stop_server(gpu_hub, "q-alice")  # frees the slice and a core
    start_server(gpu_hub, "q-carol", team["q-carol"], {"profile": "mig-atlas"})


def test_quota_report_is_for_admins_only(gpu_hub, team):
    r = gpu_hub.api(team["q-alice"]).get(f"{gpu_hub.url}/hub/api/mlaas/quotas")
    assert r.status_code == 403


def test_quota_files_are_validated_like_profiles():
    text = "quotas:\n  - group: team\n    gpus: -1\n    mig: {3g.21gb: 1}\n    memory: 10XB\n"
    _, errors = parse_file(text, "q.yaml")
    shown = [str(e) for e in errors]
    assert shown[0] == "q.yaml:3 quotas[0].gpus: Input should be greater than or equal to 0"
    assert any("q.yaml:4 quotas[0].mig: '3g.21gb' is not a MIG profile" in e for e in shown)
    assert any("q.yaml:5 quotas[0].memory: '10XB' is not a memory size" in e for e in shown)


def test_duplicate_group_quota_is_an_error(tmp_path):
    from mlaas.profiles import ProfileErrors, load_profile_files

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("quotas:\n  - {group: team, gpus: 1}\n")
    b.write_text("quotas:\n  - {group: team, gpus: 2}\n")
    with pytest.raises(ProfileErrors, match=r"b.yaml:2 quota for group 'team': duplicate: already defined at .*a.yaml:2"):
        load_profile_files([a, b])
    assert load_profile_files([FIXTURES / "profiles" / "quotas.yaml"]).quota_of("quota-team").cpu == 2
