"""Group project servers and storage, with real members and an outsider who log in through the
dev IdP (their groups come from the IdP's claims), a real hub, proxy and single-user servers.

atlas-ml has a project (tests/fixtures/profiles/projects.yaml); alice and dave are members
(dave through EGI entitlements), bob is not.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from collab import CollaborationClient
from conftest import needs_root
from helpers import (
    RunningPlatform,
    error_message,
    kernel_json,
    oidc_login,
    start_server,
    stop_server,
    user_token,
    wait_ready,
)

pytestmark = pytest.mark.platform
PROJECT = "project-atlas-ml"


@pytest.fixture(scope="module")
def people(hub: RunningPlatform) -> dict[str, dict]:
    """alice, dave (members of atlas-ml) and bob (not), logged in through the IdP."""
    people = {}
    for name in ("alice", "dave", "bob"):
        session, r = oidc_login(hub, name)
        assert r.status_code == 200, f"{name} could not log in: {r.status_code} {r.url}"
        people[name] = {"session": session, "token": user_token(hub, name)}
    deadline = time.monotonic() + 15  # the project user appears within seconds of the hub start
    while hub.api().get(f"{hub.url}/hub/api/users/{PROJECT}").status_code != 200:
        assert time.monotonic() < deadline, "the project's hub user was not created"
        time.sleep(0.3)
    return people


@pytest.fixture(scope="module")
def project_server(hub: RunningPlatform, people) -> str:
    """alice starts the project server with her own token; it is stopped at the end."""
    r = hub.api(people["alice"]["token"]).post(f"{hub.url}/hub/api/users/{PROJECT}/server", json={"profile": "small"})
    assert r.status_code in (201, 202), f"{r.status_code} {error_message(r)}"
    wait_ready(hub, PROJECT)
    yield f"{hub.url}/user/{PROJECT}"
    stop_server(hub, PROJECT)


def test_members_see_the_project_on_the_home_page_and_outsiders_do_not(hub, people):
    alice_home = people["alice"]["session"].get(f"{hub.url}/hub/home")
    assert "Group project servers" in alice_home.text and "ATLAS ML project" in alice_home.text
    assert f'href="/hub/spawn/{PROJECT}"' in alice_home.text or PROJECT in alice_home.text
    bob_home = people["bob"]["session"].get(f"{hub.url}/hub/home")
    assert bob_home.status_code == 200
    assert "Group project servers" not in bob_home.text and PROJECT not in bob_home.text


@pytest.mark.browser
def test_browser_member_starts_opens_and_stops_the_project_server_from_the_home_page(hub, people, browser):
    from conftest import browser_login
    from helpers import ARTIFACTS

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        browser_login(page, hub.url, "dave", hub.password("dave"))
        page.goto(f"{hub.url}/hub/home")
        row = f"#mlaas-projects tr[data-user={PROJECT}]"
        page.wait_for_selector(row)
        assert "stopped" in page.inner_text(f"{row} .mlaas-project-status")
        page.screenshot(path=str(ARTIFACTS / "20-home-projects.png"), full_page=True)
        page.click(f"{row} a.mlaas-start")
        page.wait_for_selector(".mlaas-profiles")  # the group's profiles
        page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
        # progress, then JupyterHub asks once before a server that is not the member's own may know who they are
        authorize = page.locator("form button[type=submit]:has-text('Authorize')")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and f"/user/{PROJECT}/lab" not in page.url:
            if authorize.count():
                authorize.click()
            page.wait_for_timeout(250)
        page.wait_for_selector(".jp-Launcher", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "21-project-jupyterlab.png"))
        page.goto(f"{hub.url}/hub/home")
        page.wait_for_selector(f"{row} a.mlaas-open")
        assert "running" in page.inner_text(f"{row} .mlaas-project-status")
        page.click(f"{row} button.mlaas-stop")
        page.wait_for_selector(f"{row} a.mlaas-start", timeout=60_000)
        assert not hub.api().get(f"{hub.url}/hub/api/users/{PROJECT}").json()["servers"]
    finally:
        context.close()


def test_the_project_spawn_form_offers_the_groups_profiles(hub, people):
    form = people["dave"]["session"].get(f"{hub.url}/hub/spawn/{PROJECT}")
    assert form.status_code == 200, form.text[:500]
    assert 'value="atlas-cpu"' in form.text  # atlas-ml's own profile
    assert 'value="small"' in form.text
    refused = people["bob"]["session"].get(f"{hub.url}/hub/spawn/{PROJECT}")
    assert refused.status_code in (403, 404)


def test_a_profile_the_group_may_not_use_cannot_start_a_project_server(hub, people):
    """A member's forged request for a profile of another group is refused; nothing starts."""
    r = hub.api(people["alice"]["token"]).post(f"{hub.url}/hub/api/users/{PROJECT}/server", json={"profile": "dask-notebook"})
    assert r.status_code == 403, f"{r.status_code} {error_message(r)}"
    assert "reserved for the groups dask-testers" in error_message(r) and "atlas-ml" in error_message(r)
    assert not hub.api().get(f"{hub.url}/hub/api/users/{PROJECT}").json()["servers"]


def test_members_open_the_project_server_and_share_files(hub, people, project_server):
    alice, dave = people["alice"]["token"], people["dave"]["token"]
    r = requests.put(
        f"{project_server}/api/contents/results.txt",
        json={"type": "file", "format": "text", "content": "accuracy 0.93 (dave)\n"},
        headers={"Authorization": f"token {dave}"},
    )
    assert r.status_code in (200, 201), r.text
    read = requests.get(f"{project_server}/api/contents/results.txt", headers={"Authorization": f"token {alice}"})
    assert read.status_code == 200 and read.json()["content"] == "accuracy 0.93 (dave)\n"
    # a member's browser session reaches JupyterLab on the project server, after JupyterHub's
    # one-time "Authorize access" page for a server that is not the member's own
    session = people["alice"]["session"]
    lab = session.get(f"{project_server}/lab")
    if "oauth2/authorize" in lab.url:
        assert lab.status_code == 200 and "Authorize" in lab.text
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', lab.text))
        lab = session.post(lab.url, data=fields)
    assert lab.status_code == 200 and "JupyterLab" in lab.text, lab.url
    again = session.get(f"{project_server}/lab")  # asked once only
    assert again.status_code == 200 and "oauth2/authorize" not in again.url


def test_outsider_cannot_reach_the_project_server_by_any_way(hub, people, project_server):
    bob = people["bob"]["token"]
    headers = {"Authorization": f"token {bob}"}
    for method, url in [
        ("GET", f"{project_server}/api/contents"),
        ("GET", f"{project_server}/api/kernels"),
        ("POST", f"{project_server}/api/kernels"),
        ("GET", f"{project_server}/api/contents/results.txt"),
        ("GET", f"{project_server}/api/terminals"),
    ]:
        r = requests.request(method, url, headers=headers, allow_redirects=False)
        assert r.status_code in (403, 404), f"bob got {r.status_code} for {method} {url}"
    # hub API: neither stop, start, nor see the project user
    api = hub.api(bob)
    assert api.delete(f"{hub.url}/hub/api/users/{PROJECT}/server").status_code in (403, 404)
    assert api.post(f"{hub.url}/hub/api/users/{PROJECT}/server", json={}).status_code in (403, 404)
    assert api.get(f"{hub.url}/hub/api/users/{PROJECT}").status_code in (403, 404)
    # and his browser session gets no page of it
    page = people["bob"]["session"].get(f"{project_server}/lab")
    assert page.status_code in (403, 404), f"bob's browser got {page.status_code} at {page.url}"
    assert "JupyterLab" not in page.text or page.status_code != 200


@needs_root
def test_personal_servers_see_project_storage_and_outsiders_cannot_read_it(hub, people, project_server):
    alice, bob = people["alice"]["token"], people["bob"]["token"]
    requests.put(
        f"{project_server}/api/contents/shared.csv",
        json={"type": "file", "format": "text", "content": "x,y\n1,2\n"},
        headers={"Authorization": f"token {alice}"},
    ).raise_for_status()
    start_server(hub, "dave", people["dave"]["token"])
    start_server(hub, "bob", bob)
    try:
        seen = requests.get(
            f"{hub.url}/user/dave/api/contents/projects/atlas-ml/shared.csv",
            headers={"Authorization": f"token {people['dave']['token']}"},
        )
        assert seen.status_code == 200 and seen.json()["content"] == "x,y\n1,2\n"
        # dave writes from his own server; the file is the group's, not only his
        requests.put(
            f"{hub.url}/user/dave/api/contents/projects/atlas-ml/from-dave.txt",
            json={"type": "file", "format": "text", "content": "hello"},
            headers={"Authorization": f"token {people['dave']['token']}"},
        ).raise_for_status()
        back = requests.get(f"{project_server}/api/contents/from-dave.txt", headers={"Authorization": f"token {alice}"})
        assert back.status_code == 200 and back.json()["content"] == "hello"
        # bob's kernel cannot list or read the project directory, nor does he get a link to it
        storage = hub.state_dir / "projects" / "atlas-ml"
        result = kernel_json(
            hub, "bob", bob,
            "import json, os\n"
            f"p = {str(storage)!r}\n"
            "out = {'link': os.path.exists(os.path.expanduser('~/projects/atlas-ml'))}\n"
            "for what, f in (('list', lambda: os.listdir(p)), ('read', lambda: open(p + '/shared.csv').read())):\n"
            "    try:\n        f(); out[what] = 'allowed'\n"
            "    except PermissionError:\n        out[what] = 'denied'\n"
            "print(json.dumps(out))",
        )
        assert result == {"link": False, "list": "denied", "read": "denied"}
    finally:
        stop_server(hub, "dave")
        stop_server(hub, "bob")


def test_two_members_editing_one_notebook_see_each_others_changes(hub, people, project_server):
    alice, dave = people["alice"]["token"], people["dave"]["token"]
    notebook = {
        "cells": [{"cell_type": "code", "source": "x = 1", "metadata": {}, "outputs": [], "execution_count": None}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
    }
    requests.put(
        f"{project_server}/api/contents/together.ipynb",
        json={"type": "notebook", "format": "json", "content": notebook},
        headers={"Authorization": f"token {alice}"},
    ).raise_for_status()
    a = CollaborationClient(project_server, alice, "together.ipynb")
    d = CollaborationClient(project_server, dave, "together.ipynb")
    try:
        assert a.wait_for(lambda c: c.cell_source(0) == "x = 1"), "alice's session did not load the notebook"
        assert d.wait_for(lambda c: c.cell_source(0) == "x = 1"), "dave's session did not load the notebook"
        source = a.notebook.ycells[0]["source"]
        source.insert(len(source), "  # tuned by alice")
        assert d.wait_for(lambda c: "tuned by alice" in c.cell_source(0)), d.cell_source(0)
        d.notebook.ycells[0]["source"].insert(0, "# reviewed by dave\n")
        assert a.wait_for(lambda c: c.cell_source(0).startswith("# reviewed by dave")), a.cell_source(0)
        # the shared document is saved to the project storage, for everyone
        deadline = time.monotonic() + 20
        saved = ""
        while time.monotonic() < deadline:
            r = requests.get(f"{project_server}/api/contents/together.ipynb", headers={"Authorization": f"token {dave}"})
            saved = "".join(r.json()["content"]["cells"][0]["source"])
            if "tuned by alice" in saved and "reviewed by dave" in saved:
                break
            a.pump(0.5)
            d.pump(0.5)
        assert "tuned by alice" in saved and "reviewed by dave" in saved, saved
    finally:
        a.close()
        d.close()


def test_an_outsider_cannot_join_the_collaboration_room(hub, people, project_server):
    with pytest.raises(requests.HTTPError) as refused:
        CollaborationClient(project_server, people["bob"]["token"], "together.ipynb")
    assert refused.value.response.status_code in (403, 404)


def test_a_member_stops_the_project_server(hub, people, project_server):
    r = hub.api(people["dave"]["token"]).delete(f"{hub.url}/hub/api/users/{PROJECT}/server")
    assert r.status_code in (202, 204), r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        model = hub.api().get(f"{hub.url}/hub/api/users/{PROJECT}").json()
        if not model["servers"]:
            break
        time.sleep(0.3)
    assert not model["servers"]
    # and starts it again for the fixture's final stop
    r = hub.api(people["dave"]["token"]).post(f"{hub.url}/hub/api/users/{PROJECT}/server", json={"profile": "atlas-cpu"})
    assert r.status_code in (201, 202), error_message(r)
    wait_ready(hub, PROJECT)
    assert json.loads(json.dumps(hub.api().get(f"{hub.url}/hub/api/users/{PROJECT}").json()["servers"][""]["user_options"]))["profile"] == "atlas-cpu"
