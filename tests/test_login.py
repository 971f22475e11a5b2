"""Logging in through the development OIDC provider, as a person does.

The browser test drives Debian's headless Chromium (Playwright) through the IdP's login page,
the profile form, the progress page and into JupyterLab; screenshots land in test-artifacts/.
"""

from __future__ import annotations

import pytest

from helpers import ARTIFACTS, RunningPlatform, oidc_login, stop_server

@pytest.mark.browser
def test_browser_login_form_progress_and_jupyterlab(hub: RunningPlatform, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(f"{hub.url}/hub/login")
        page.click("a[href*=oauth_login]")
        page.wait_for_selector("#username")
        assert "Development identity provider" in page.inner_text(".banner")
        page.fill("#username", "alice")
        page.fill("#password", "alice-pw")
        page.click("#login")
        page.wait_for_url(f"{hub.url}/hub/spawn*")
        page.wait_for_selector(".mlaas-profiles")
        page.screenshot(path=str(ARTIFACTS / "01-profile-form.png"), full_page=True)

        shown = page.eval_on_selector_all("[data-profile]", "els => els.map(e => e.dataset.profile)")
        assert shown == ["small", "atlas-cpu", "gpu-one", "mig-atlas"]  # alice: ml-users + atlas-ml
        assert page.is_checked("input[value=small]")  # the default
        assert page.is_disabled("input[value=gpu-one]")
        assert "Unavailable: no NVIDIA GPU driver" in page.inner_text("[data-profile=gpu-one]")

        page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
        page.wait_for_url("**/hub/spawn-pending/alice*")
        page.wait_for_selector("#progress-bar")
        page.screenshot(path=str(ARTIFACTS / "02-progress.png"))
        page.wait_for_url(f"{hub.url}/user/alice/lab*", timeout=60_000)
        page.wait_for_selector(".jp-Launcher", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "03-jupyterlab.png"))
        assert "Notebook" in page.inner_text(".jp-Launcher")
    finally:
        page.close()
        stop_server(hub, "alice")


@pytest.mark.browser
def test_browser_wrong_password_stays_on_the_login_page(hub: RunningPlatform, browser):
    page = browser.new_page()
    try:
        page.goto(f"{hub.url}/hub/oauth_login")
        page.fill("#username", "bob")
        page.fill("#password", "not-bobs")
        page.click("#login")
        page.wait_for_selector("[role=alert]")
        assert "Unknown username or wrong password." in page.inner_text("[role=alert]")
        assert page.url.startswith("http://127.0.0.1:") and "/interaction/" in page.url
    finally:
        page.close()


def test_user_outside_allowed_groups_gets_a_readable_refusal(hub: RunningPlatform):
    _, r = oidc_login(hub, "mallory", "mallory-pw")
    assert r.status_code == 403
    assert "not a member of a group that may use this MLaaS Hub" in r.text
    assert hub.api().get(f"{hub.url}/hub/api/users/mallory").status_code == 404


def test_admin_group_maps_to_jupyterhub_admin(hub: RunningPlatform):
    session, r = oidc_login(hub, "admin", "admin-pw")
    assert r.status_code == 200 and r.url.startswith(f"{hub.url}/hub/")
    model = hub.api().get(f"{hub.url}/hub/api/users/admin").json()
    assert model["admin"] is True
    assert set(model["groups"]) == {"ml-users", "mlaas-admins"}
    plain = hub.api().get(f"{hub.url}/hub/api/users/bob")
    if plain.status_code == 200:
        assert plain.json()["admin"] is False


def test_egi_entitlements_become_groups(hub: RunningPlatform):
    _, r = oidc_login(hub, "dave", "dave-pw")
    assert r.status_code == 200
    model = hub.api().get(f"{hub.url}/hub/api/users/dave").json()
    # member entitlements count; the manager role of atlas-ml adds nothing new
    assert sorted(model["groups"]) == ["atlas-ml", "ml-users"]
    assert model["admin"] is False
