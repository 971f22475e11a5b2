"""The researcher's environment in a real server: JupyterLab as comparable platforms ship it
(resource usage against the profile's limits, the Dask sidebar making clusters through the real
gateway, dashboards through the server's own authenticated proxy, widgets), and the analysis
stack importable in a kernel."""

from __future__ import annotations

import pytest
import requests

from helpers import RunningPlatform, ensure_user, kernel_json, start_server, stop_server, user_token

pytestmark = pytest.mark.platform


def _extension_names(listing) -> set[str]:
    items = listing[0] if isinstance(listing, list) and listing and isinstance(listing[0], list) else listing
    return {e["name"] for e in items}


@pytest.fixture(scope="module")
def researcher(hub: RunningPlatform):
    ensure_user(hub, "env-ria", ["ml-users"])
    ensure_user(hub, "env-other", ["ml-users"])
    tokens = {name: user_token(hub, name) for name in ("env-ria", "env-other")}
    start_server(hub, "env-ria", tokens["env-ria"], {"profile": "small"})
    yield tokens
    stop_server(hub, "env-ria")


def test_jupyterlab_shows_resource_use_against_the_profiles_limits(hub, researcher):
    token = researcher["env-ria"]
    base = f"{hub.url}/user/env-ria"
    names = _extension_names(hub.api(token).get(f"{base}/lab/api/extensions").json())
    assert {"@jupyter-server/resource-usage", "dask-labextension", "@jupyter-widgets/jupyterlab-manager"} <= names, names
    metrics = hub.api(token).get(f"{base}/api/metrics/v1")
    assert metrics.status_code == 200, metrics.text
    limit = kernel_json(hub, "env-ria", token, "import json, os; print(json.dumps(int(os.environ['MEM_LIMIT'])))")
    body = metrics.json()
    assert body["limits"]["memory"]["rss"] == limit and 0 < body["rss"] < limit, body
    assert "cpu_percent" in body and body["limits"]["cpu"]["cpu"] > 0, body


def test_the_dask_sidebar_makes_and_stops_clusters_through_the_gateway(hub, researcher):
    token = researcher["env-ria"]
    api = hub.api(token)
    base = f"{hub.url}/user/env-ria/dask/clusters"
    gateway = f"{hub.url}/services/dask-gateway/api/v1/clusters/"
    auth = {"Authorization": f"jupyterhub {token}"}
    made = api.put(base, timeout=120)
    assert made.status_code == 200, made.text
    model = made.json()
    listed = requests.get(gateway, headers=auth, timeout=30).json()
    assert len(listed) == 1, listed  # the sidebar's cluster is a gateway cluster of hers
    (name,) = listed
    assert name in model["dashboard_link"] and model["dashboard_link"].startswith("/services/dask-gateway/clusters/")
    assert [c["id"] for c in api.get(base).json()] == [model["id"]]
    assert api.delete(f"{base}/{model['id']}", timeout=60).status_code == 204
    assert requests.get(gateway, headers=auth, timeout=30).json() == {}


def test_a_web_app_in_the_server_is_reached_through_its_proxy_by_its_owner_only(hub, researcher):
    """jupyter-server-proxy (dashboards of clusters started in a kernel, TensorBoard, …): the
    server's own authentication applies to what it proxies."""
    token = researcher["env-ria"]
    port = kernel_json(hub, "env-ria", token, """
import http.server, json, socket, threading
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"dashboard of ria")
server = http.server.HTTPServer(("127.0.0.1", 0), Hello)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(json.dumps(server.server_address[1]))
""", keep=True)
    url = f"{hub.url}/user/env-ria/proxy/{port}/"
    mine = hub.api(token).get(url)
    assert mine.status_code == 200 and mine.text == "dashboard of ria"
    theirs = hub.api(researcher["env-other"]).get(url, allow_redirects=False)
    assert theirs.status_code in (302, 403) and "dashboard of ria" not in theirs.text
    assert requests.get(url, allow_redirects=False, timeout=10).status_code in (302, 403)


def test_the_analysis_stack_is_in_every_kernel(hub, researcher):
    versions = kernel_json(hub, "env-ria", researcher["env-ria"], """
import json
import awkward as ak, coffea, hist, ipywidgets, matplotlib, uproot, vector
h = hist.Hist.new.Reg(10, 0, 1).Double().fill([0.1, 0.2, 0.25])
v = vector.obj(px=3.0, py=4.0)
a = ak.Array([[1, 2], [], [3]])
print(json.dumps({"uproot": uproot.__version__, "hist_sum": h.sum(), "pt": v.pt, "counts": ak.num(a).tolist(),
                  "widgets": ipywidgets.__version__, "mpl": matplotlib.get_backend() != "",
                  "coffea": coffea.__version__}))
""")
    assert versions["hist_sum"] == 3 and versions["pt"] == 5.0 and versions["counts"] == [2, 0, 1]
    assert versions["uproot"].startswith("5.") and versions["widgets"].startswith("8.") and versions["mpl"]
    assert versions["coffea"] == "2026.9.0"


def _wheel(name: str, version: str, code: str) -> bytes:
    """A minimal pure-Python wheel (what `pip wheel` makes of a one-module project)."""
    import base64
    import hashlib
    import io
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": code,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text.encode())}")
        z.writestr(f"{info}/RECORD", "\n".join(record + [f"{info}/RECORD,,"]) + "\n")
    return out.getvalue()


def test_a_users_own_packages_and_kernels_persist_for_them_and_nobody_else(hub):
    """ria installs a package with plain `pip install` from her kernel (a wheel file: no index
    here) and registers a kernel of her own; both are there in her next server, absent for
    another user, and the shared environment is unchanged."""
    import base64
    import sys
    from pathlib import Path

    for name in ("pkg-ria", "pkg-ben"):
        ensure_user(hub, name, ["ml-users"])
    tokens = {name: user_token(hub, name) for name in ("pkg-ria", "pkg-ben")}
    wheel = "ria_tools-1.0-py3-none-any.whl"
    try:
        start_server(hub, "pkg-ria", tokens["pkg-ria"], {"profile": "small"})
        r = hub.api(tokens["pkg-ria"]).put(f"{hub.url}/user/pkg-ria/api/contents/{wheel}", json={
            "type": "file", "format": "base64",
            "content": base64.b64encode(_wheel("ria_tools", "1.0", 'ANSWER = 42\n')).decode()})
        assert r.status_code in (200, 201), r.text
        installed = kernel_json(hub, "pkg-ria", tokens["pkg-ria"], f"""
import json, subprocess, sys
pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", {wheel!r}], capture_output=True, text=True)
kernel = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "ria-own",
                         "--display-name", "Ria's kernel"], capture_output=True, text=True)
print(json.dumps([pip.returncode, pip.stdout[-500:] + pip.stderr[-500:], kernel.returncode, kernel.stderr[-300:]]))
""")
        assert installed[0] == 0 and installed[2] == 0, installed
        stop_server(hub, "pkg-ria")

        start_server(hub, "pkg-ria", tokens["pkg-ria"], {"profile": "small"})  # her next server
        found = kernel_json(hub, "pkg-ria", tokens["pkg-ria"],
                            "import json, os, ria_tools; print(json.dumps([ria_tools.ANSWER, ria_tools.__file__, os.environ['HOME']]))")
        assert found[0] == 42 and found[1].startswith(found[2] + "/.local/"), found
        specs = hub.api(tokens["pkg-ria"]).get(f"{hub.url}/user/pkg-ria/api/kernelspecs").json()["kernelspecs"]
        assert specs["ria-own"]["spec"]["display_name"] == "Ria's kernel"

        start_server(hub, "pkg-ben", tokens["pkg-ben"], {"profile": "small"})
        absent = kernel_json(hub, "pkg-ben", tokens["pkg-ben"], """
import importlib.util, json
print(json.dumps(importlib.util.find_spec("ria_tools") is None))
""")
        assert absent is True
        assert "ria-own" not in hub.api(tokens["pkg-ben"]).get(f"{hub.url}/user/pkg-ben/api/kernelspecs").json()["kernelspecs"]
        assert not list(Path(sys.prefix).glob("lib/python*/site-packages/ria_tools*"))  # the shared environment
    finally:
        stop_server(hub, "pkg-ria")
        stop_server(hub, "pkg-ben")


def test_a_researcher_sees_memory_use_and_the_dask_sidebar_in_jupyterlab(hub, browser):
    """What a person sees (Chromium): JupyterLab's status bar shows the server's memory against
    its profile's limit, and the left sidebar has the Dask panel, which lists the clusters the
    gateway gives her."""
    from conftest import browser_login

    ensure_user(hub, "carol", ["ml-users"])
    token = user_token(hub, "carol")
    start_server(hub, "carol", token, {"profile": "small"})
    page = browser.new_page()
    try:
        browser_login(page, hub.url, "carol", hub.password("carol"))
        page.goto(f"{hub.url}/user/carol/lab")
        status = page.locator("#jp-main-statusbar", has_text="Mem:")
        status.wait_for(timeout=60_000)
        limit_mib = kernel_json(hub, "carol", token, "import json, os; print(json.dumps(int(os.environ['MEM_LIMIT']) // 2**20))")
        text = status.inner_text()
        # e.g. "CPU: 26.40 % | Mem: 141.75 / 512.00 MB" (the extension's MB are MiB)
        assert "CPU:" in text and f"/ {limit_mib:.2f} MB" in text, text
        page.click("li[data-id=dask-dashboard-launcher]")
        page.get_by_text("NEW", exact=False).first.wait_for(timeout=30_000)  # the panel's "+ NEW" cluster button
    finally:
        page.close()
        stop_server(hub, "carol")
