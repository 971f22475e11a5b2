"""The admin service (page and REST API under /services/mlaas-admin/) on a real platform: changes
are written to the profile files, validated like the checker, recorded, restorable, and apply
to the next spawn without a hub restart. The browser test drives the page in Chromium.
"""

from __future__ import annotations


import pytest
import requests

from helpers import (
    RunningPlatform,
    ensure_user,
    error_message,
    kernel_json,
    oidc_login,
    start_platform,
    start_server,
    stop_server,
    user_token,
)

pytestmark = pytest.mark.platform


@pytest.fixture(scope="module")
def admin_hub() -> RunningPlatform:
    """A platform of its own: these tests rewrite its profile files."""
    running = start_platform("admin", tracking={"enabled": False})
    yield running
    running.platform.stop()


@pytest.fixture(scope="module")
def admin_token(admin_hub) -> str:
    session, r = oidc_login(admin_hub, "admin")
    assert r.status_code == 200
    return user_token(admin_hub, "admin")


def admin_api(hub: RunningPlatform, token: str) -> tuple[requests.Session, str]:
    s = requests.Session()
    s.headers["Authorization"] = f"token {token}"
    return s, f"{hub.url}/services/mlaas-admin/api"


def test_admin_changes_memory_and_the_next_spawn_gets_the_new_limit(admin_hub, admin_token):
    api, base = admin_api(admin_hub, admin_token)
    small = api.get(f"{base}/profiles/small").json()
    assert small["item"]["memory"]["limit"] == "512Mi"
    r = api.patch(f"{base}/profiles/small", json={"fields": {"memory": {"guarantee": "128Mi", "limit": "640Mi"}},
                                                   "version": small["version"]})
    assert r.status_code == 200, r.text
    change = r.json()["change"]
    assert change["who"] == "admin" and change["before"]["memory"]["limit"] == "512Mi"
    text = (admin_hub.profiles_dir / "cpu.yaml").read_text()
    assert "limit: 640Mi" in text and "# Profiles of the test platform" in text  # the comment is kept

    ensure_user(admin_hub, "erin", ["ml-users"])
    token = user_token(admin_hub, "erin")
    start_server(admin_hub, "erin", token, {"profile": "small"})
    try:
        env = kernel_json(admin_hub, "erin", token, "import os, json; print(json.dumps(os.environ['MEM_LIMIT']))")
        assert int(env) == 640 * 2**20
    finally:
        stop_server(admin_hub, "erin")


def test_invalid_change_is_refused_with_the_field_error_and_nothing_is_written(admin_hub, admin_token):
    api, base = admin_api(admin_hub, admin_token)
    before = (admin_hub.profiles_dir / "cpu.yaml").read_text()
    current = api.get(f"{base}/profiles/atlas-cpu").json()
    r = api.patch(f"{base}/profiles/atlas-cpu", json={"fields": {"cpu": {"limit": "lots"}, "groups": ["atlas ml"]},
                                                       "version": current["version"]})
    assert r.status_code == 422
    fields = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert "cpu.limit" in fields and "lots" in fields["cpu.limit"]
    assert "groups" in fields and "'atlas ml' is not a group name" in fields["groups"]
    assert (admin_hub.profiles_dir / "cpu.yaml").read_text() == before
    # a second default profile is a cross-file error, reported on the field too
    r = api.post(f"{base}/profiles", json={"item": {"slug": "another", "display_name": "Another", "cpu": {"limit": 1},
                                                     "memory": {"limit": "1Gi"}, "groups": ["*"], "default": True}})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "default"
    assert (admin_hub.profiles_dir / "cpu.yaml").read_text() == before


def test_non_admins_are_refused(admin_hub):
    ensure_user(admin_hub, "frank", ["ml-users"])
    token = user_token(admin_hub, "frank")
    api, base = admin_api(admin_hub, token)
    assert api.get(f"{base}/profiles").status_code == 403
    assert api.patch(f"{base}/profiles/small", json={"fields": {"memory": {"limit": "8Gi"}}}).status_code == 403
    assert requests.get(f"{base}/profiles").status_code in (302, 403)  # no token at all
    session, r = oidc_login(admin_hub, "bob")
    page = session.get(f"{admin_hub.url}/services/mlaas-admin/")
    assert page.status_code == 403 and "MLaaS Hub administration" not in page.text


def test_concurrent_edits_never_lose_one_silently(admin_hub, admin_token):
    api, base = admin_api(admin_hub, admin_token)
    loaded = api.get(f"{base}/profiles/atlas-cpu").json()  # both admins load the same version
    first = api.patch(f"{base}/profiles/atlas-cpu", json={"fields": {"description": "first admin"}, "version": loaded["version"]})
    assert first.status_code == 200
    second = api.patch(f"{base}/profiles/atlas-cpu", json={"fields": {"description": "second admin"}, "version": loaded["version"]})
    assert second.status_code == 409
    assert "changed by admin" in second.json()["message"] and second.json()["current"]["description"] == "first admin"
    assert api.get(f"{base}/profiles/atlas-cpu").json()["item"]["description"] == "first admin"


def test_restore_brings_back_the_previous_version_and_is_recorded(admin_hub, admin_token):
    api, base = admin_api(admin_hub, admin_token)
    current = api.get(f"{base}/profiles/atlas-cpu").json()
    change = api.patch(f"{base}/profiles/atlas-cpu", json={"fields": {"display_name": "ATLAS CPU (renamed)"},
                                                            "version": current["version"]}).json()["change"]
    r = api.post(f"{base}/history/{change['id']}/restore")
    assert r.status_code == 200, r.text
    assert r.json()["current"]["item"]["display_name"] == current["item"]["display_name"]
    history = api.get(f"{base}/history", params={"kind": "profiles", "key": "atlas-cpu"}).json()["changes"]
    assert history[0]["action"] == "restore" and history[0]["restored_from"] == change["id"]
    # disable, then delete and restore: the profile comes back
    current = api.get(f"{base}/profiles/atlas-cpu").json()
    gone = api.delete(f"{base}/profiles/atlas-cpu", params={"version": current["version"]})
    assert gone.status_code == 200 and "atlas-cpu" not in (admin_hub.profiles_dir / "cpu.yaml").read_text()
    back = api.post(f"{base}/history/{gone.json()['change']['id']}/restore")
    assert back.status_code == 200 and "atlas-cpu" in (admin_hub.profiles_dir / "cpu.yaml").read_text()


def test_disabled_profile_is_not_offered_and_cannot_be_started(admin_hub, admin_token):
    api, base = admin_api(admin_hub, admin_token)
    ensure_user(admin_hub, "gina", ["atlas-ml"])
    token = user_token(admin_hub, "gina")
    current = api.get(f"{base}/profiles/atlas-cpu").json()
    assert api.patch(f"{base}/profiles/atlas-cpu", json={"fields": {"enabled": False}, "version": current["version"]}).status_code == 200
    try:
        offered = requests.get(f"{admin_hub.url}/hub/api/mlaas/profiles", headers={"Authorization": f"token {token}"}).json()
        assert "atlas-cpu" not in [p["slug"] for p in offered["profiles"]]
        r = requests.post(f"{admin_hub.url}/hub/api/users/gina/server", json={"profile": "atlas-cpu"},
                          headers={"Authorization": f"token {token}"})
        assert r.status_code == 403 and "disabled" in error_message(r)
    finally:
        current = api.get(f"{base}/profiles/atlas-cpu").json()
        api.patch(f"{base}/profiles/atlas-cpu", json={"fields": {"enabled": True}, "version": current["version"]})


def test_usage_view_lists_servers_by_user_group_and_profile(admin_hub, admin_token):
    api, base = admin_api(admin_hub, admin_token)
    ensure_user(admin_hub, "hank", ["atlas-ml"])
    token = user_token(admin_hub, "hank")
    start_server(admin_hub, "hank", token, {"profile": "atlas-cpu"})
    try:
        usage = api.get(f"{base}/usage").json()
        mine = [s for s in usage["servers"] if s["user"] == "hank"]
        assert mine and mine[0]["profile"] == "atlas-cpu" and mine[0]["cpu"] == 2
        assert "hank" in usage["groups"]["atlas-ml"]["users"] and usage["groups"]["atlas-ml"]["cpu"] >= 2
    finally:
        stop_server(admin_hub, "hank")
    usage = api.get(f"{base}/usage").json()
    assert not [s for s in usage["servers"] if s["user"] == "hank"]


@pytest.mark.browser
def test_browser_admin_edits_a_profile_and_a_user_sees_it_in_the_spawn_form(admin_hub, browser):
    from conftest import browser_login, open_profile_editor
    from helpers import ARTIFACTS

    admin = browser.new_context(viewport={"width": 1280, "height": 1000})
    user = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = admin.new_page()
        open_profile_editor(page, admin_hub.url, admin_hub.password("admin"), "small")
        # an invalid value: the error appears next to the memory field and nothing is saved
        page.fill("#profile-form [name='memory.limit']", "lots")
        page.click("#profile-save")
        page.wait_for_selector("#profile-form .error[data-error=memory]:has-text('lots')")
        page.screenshot(path=str(ARTIFACTS / "10-admin-field-error.png"), full_page=True)
        assert "lots" not in (admin_hub.profiles_dir / "cpu.yaml").read_text()
        # a valid edit
        page.fill("#profile-form [name='memory.limit']", "700Mi")
        page.fill("#profile-form [name=display_name]", "Small (edited in the browser)")
        page.click("#profile-save")
        page.wait_for_selector("#message.ok")
        assert "Saved" in page.inner_text("#message")
        page.wait_for_selector("#profiles-table tr[data-slug=small]:has-text('Small (edited in the browser)')")
        page.screenshot(path=str(ARTIFACTS / "11-admin-saved.png"), full_page=True)
        # the change is in the history, with who made it
        page.click("nav button[data-panel=history]")
        page.wait_for_selector("#history-table tbody tr")
        first = page.inner_text("#history-table tbody tr:first-child")
        assert "admin" in first and "small" in first and "700Mi" in first

        # a user's spawn form shows the new name and size at once, without a hub restart
        alice = user.new_page()
        browser_login(alice, admin_hub.url, "alice", admin_hub.password("alice"))
        alice.goto(f"{admin_hub.url}/hub/spawn")
        alice.wait_for_selector("[data-profile=small]")
        text = alice.inner_text("[data-profile=small]")
        assert "Small (edited in the browser)" in text and "700 MiB" in text, text
        alice.screenshot(path=str(ARTIFACTS / "12-form-after-admin-edit.png"), full_page=True)
    finally:
        admin.close()
        user.close()


@pytest.mark.parametrize(
    "method, path, body, field",
    [
        ("post", "profiles", {"item": None}, "'item'"),
        ("post", "profiles", {"item": ["slug", "x"]}, "'item'"),
        ("post", "profiles", {"item": "small"}, "'item'"),
        ("post", "profiles", {}, "'item'"),
        ("post", "profiles", {"item": {"slug": "x"}, "file": "../../etc/evil.yaml"}, "'file'"),
        ("post", "profiles", {"item": {"slug": "x"}, "file": "/tmp/evil.yaml"}, "'file'"),
        ("post", "profiles", {"item": {"slug": "x"}, "file": 5}, "'file'"),
        ("post", "profiles", {"item": {"slug": "x"}, "file": ["cpu.yaml"]}, "'file'"),
        ("put", "profiles/small", {"version": "x"}, "'item'"),
        ("put", "profiles/small", {"item": None, "version": "x"}, "'item'"),
        ("put", "profiles/small", {"item": {"slug": "small"}, "version": 7}, "'version'"),
        ("patch", "profiles/small", {"fields": ["memory"]}, "'fields'"),
        ("patch", "profiles/small", {"fields": None}, "'fields'"),
        ("post", "quotas", {"item": 3}, "'item'"),
        ("put", "quotas/quota-team", {}, "'item'"),
    ],
)
def test_malformed_requests_get_a_400_naming_the_field_and_change_nothing(admin_hub, admin_token, method, path, body,
                                                                         field):
    api, base = admin_api(admin_hub, admin_token)
    files = {p.name: p.read_text() for p in admin_hub.profiles_dir.iterdir()}
    r = getattr(api, method)(f"{base}/{path}", json=body)
    assert r.status_code == 400, r.text
    assert field in r.json()["message"]
    assert {p.name: p.read_text() for p in admin_hub.profiles_dir.iterdir()} == files  # nothing written or deleted
    assert api.get(f"{base}/profiles/small").status_code == 200


def test_a_profile_file_of_nested_aliases_is_refused_and_the_api_keeps_answering(admin_hub, admin_token):
    """A few hundred bytes of YAML aliases expand to millions of values: refused by size of the
    expansion, reported, and the last good profiles stay in force for the hub and the admin API."""
    bomb = admin_hub.profiles_dir / "bomb.yaml"
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(levels) + "\nprofiles: *a8\n")
    assert len(bomb.read_bytes()) < 700
    try:
        api, base = admin_api(admin_hub, admin_token)
        r = api.get(f"{base}/profiles", timeout=30)
        assert r.status_code == 200 and "small" in [p["key"] for p in r.json()["profiles"]]
        hub_profiles = admin_hub.api(admin_token).get(f"{admin_hub.url}/hub/api/mlaas/profiles", timeout=30)
        assert hub_profiles.status_code == 200 and "small" in [p["slug"] for p in hub_profiles.json()["profiles"]]
        assert "bomb.yaml: expands to more than 20,000 values" in admin_hub.hub_log()
    finally:
        bomb.unlink()


def test_deeply_nested_or_huge_bodies_are_refused_not_crashed(admin_hub, admin_token):
    api, base = admin_api(admin_hub, admin_token)
    deep = "[" * 100_000 + "]" * 100_000
    r = api.post(f"{base}/profiles", data=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["message"]
    r = api.post(f"{base}/profiles", data=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "over 1024 KiB" in r.json()["message"]
    assert api.get(f"{base}/profiles/small").status_code == 200  # the service is still there
