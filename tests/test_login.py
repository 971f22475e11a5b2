"""Logging in through the development OIDC provider, as a person does.

The browser test drives Debian's headless Chromium (Playwright) through the IdP's login page,
the profile form, the progress page and into JupyterLab; screenshots land in test-artifacts/.
"""

from __future__ import annotations

import re

import pytest
import requests

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
        page.fill("#password", hub.password("alice"))
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
        # JupyterHub waits a second for the start before it shows the progress page; a server forked
        # from the pre-started one (mlaas.zygote) is often ready by then, and the user lands in
        # JupyterLab directly. The progress events themselves: test_spawn_api.
        page.wait_for_url(lambda url: "/hub/spawn-pending/alice" in url or "/user/alice/lab" in url)
        if "/hub/spawn-pending/" in page.url:
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
    _, r = oidc_login(hub, "mallory")
    assert r.status_code == 403
    assert "not a member of a group that may use this MLaaS Hub" in r.text
    assert hub.api().get(f"{hub.url}/hub/api/users/mallory").status_code == 404


def test_admin_group_maps_to_jupyterhub_admin(hub: RunningPlatform):
    session, r = oidc_login(hub, "admin")
    assert r.status_code == 200 and r.url.startswith(f"{hub.url}/hub/")
    model = hub.api().get(f"{hub.url}/hub/api/users/admin").json()
    assert model["admin"] is True
    assert set(model["groups"]) == {"ml-users", "mlaas-admins"}
    _, r = oidc_login(hub, "bob")
    assert r.status_code == 200
    assert hub.api().get(f"{hub.url}/hub/api/users/bob").json()["admin"] is False


def test_egi_entitlements_become_groups(hub: RunningPlatform):
    _, r = oidc_login(hub, "dave")
    assert r.status_code == 200
    model = hub.api().get(f"{hub.url}/hub/api/users/dave").json()
    # member entitlements count; the manager role of atlas-ml adds nothing new
    assert sorted(model["groups"]) == ["atlas-ml", "ml-users"]
    assert model["admin"] is False


def test_case_distinct_idp_accounts_never_land_on_one_hub_user(hub: RunningPlatform):
    """IdP account `Alice` (another person, in the admin group) must not become hub user `alice`
    (JupyterHub lowercases names): refused with a readable page, alice's groups untouched."""
    session, r = oidc_login(hub, "alice")
    assert r.status_code == 200
    before = hub.api().get(f"{hub.url}/hub/api/users/alice").json()
    impostor, r = oidc_login(hub, "Alice")
    assert r.status_code == 403
    assert "already belongs to a different account of your identity provider" in r.text
    after = hub.api().get(f"{hub.url}/hub/api/users/alice").json()
    assert (after["admin"], sorted(after["groups"])) == (before["admin"], sorted(before["groups"])) == (
        False, ["atlas-ml", "ml-users"])
    r = impostor.get(f"{hub.url}/hub/api/user", allow_redirects=False)
    assert r.status_code in (302, 403)  # no session as alice
    session, r = oidc_login(hub, "alice")  # the real alice still signs in
    assert r.status_code == 200 and r.url.startswith(f"{hub.url}/hub/")


def test_an_invalid_user_name_is_told_that_its_name_is_invalid(hub: RunningPlatform):
    _, r = oidc_login(hub, "eve/x")
    assert r.status_code == 403
    assert "which this hub cannot use as a user name" in r.text
    assert "not a member of a group" not in r.text


def test_an_account_without_the_name_claim_is_told_so(hub: RunningPlatform):
    import html

    _, r = oidc_login(hub, "nameless")
    assert r.status_code == 403
    assert "did not send the 'preferred_username' claim that names you" in html.unescape(r.text)


def test_demo_passwords_are_generated_per_installation_and_private(hub: RunningPlatform):
    from mlaas.settings import REPO_ROOT

    shipped = (REPO_ROOT / "hub" / "dev_idp" / "users.yaml").read_text()
    assert "password" not in shipped.split("\n", 3)[-1]  # the shipped users file holds none
    secret = hub.state_dir / "secrets" / "dev-idp-passwords.yaml"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (secret.parent.stat().st_mode & 0o777) == 0o700
    _, r = oidc_login(hub, "admin", "admin-pw")  # the old, published demo password
    assert r.status_code == 401 and "Unknown username or wrong password." in r.text
    assert hub.password("admin") != "admin-pw" and len(hub.password("admin")) >= 12


def test_the_dev_idp_refuses_a_public_hub_unless_forced(tmp_path):
    from mlaas.launcher import LaunchError, Platform
    from mlaas.settings import Settings

    settings = Settings(state_dir=tmp_path, public_url="http://192.0.2.10:8000")
    with pytest.raises(LaunchError, match="will not serve a hub at http://192.0.2.10:8000"):
        Platform(settings)._start_idp(5)


def test_idp_unreachable_during_the_callback_gives_a_readable_page_and_no_code_in_logs(hub: RunningPlatform):
    from urllib.parse import parse_qs, urljoin, urlparse

    from mlaas.launcher import _stop

    s = requests.Session()
    r = s.get(f"{hub.url}/hub/oauth_login")
    action = re.search(r'action="([^"]+)"', r.text).group(1)
    r = s.post(urljoin(r.url, action), data={"username": "carol", "password": hub.password("carol")},
               allow_redirects=False)
    while r.is_redirect and "/hub/oauth_callback" not in r.headers["Location"]:
        r = s.get(urljoin(r.url, r.headers["Location"]), allow_redirects=False)
    callback = urljoin(r.url, r.headers["Location"])
    query = parse_qs(urlparse(callback).query)
    code, state = query["code"][0], query["state"][0]
    _stop(hub.platform.idp, 10)  # the IdP goes away between its redirect and the hub's token request
    try:
        r = s.get(callback)
    finally:
        hub.platform._start_idp(60)
    assert r.status_code == 503
    assert "The identity provider" in r.text and "cannot be reached right now" in r.text
    log = hub.hub_log()
    assert code not in log and state not in log


def test_a_link_with_spawn_options_never_starts_a_server(hub: RunningPlatform):
    """Cross-site spawning: a page anywhere can make a signed-in browser GET
    /hub/spawn/<user>?profile=…; that must show the form (where a POST with the XSRF token starts
    a server), never start one and spend the group's quota."""
    session, r = oidc_login(hub, "carol")
    assert r.status_code == 200
    for link in (f"{hub.url}/hub/spawn/carol?profile=small", f"{hub.url}/hub/spawn?profile=small&next=/hub/home"):
        r = session.get(link, headers={"Referer": "https://elsewhere.example/"})
        assert "mlaas-profiles" in r.text  # the form is shown
        assert "A link cannot start a server" in r.text
        model = hub.api().get(f"{hub.url}/hub/api/users/carol").json()
        assert model["servers"] == {} and not model["pending"]
