"""The admin service: a page and a REST API under `/services/mlaas-admin/`, for hub admins only.

JupyterHub runs it as a managed service and guards it with its own OAuth: only tokens and
logins that hold `access:services!service=mlaas-admin` get in, and only the admin role holds
it; everyone else gets 403.

    GET    api/profiles                    every profile, with its file and version
    POST   api/profiles                    {"item": {...}, "file": "gpu.yaml"}  create
    PUT    api/profiles/<slug>             {"item": {...}, "version": "..."}    replace
    PATCH  api/profiles/<slug>             {"fields": {...}, "version": "..."}  change some fields
    DELETE api/profiles/<slug>?version=…                                        delete
    (the same under api/quotas/<group>)
    GET    api/history[?kind=&key=]        changes, newest first
    POST   api/history/<id>/restore        the item as it was before that change
    GET    api/usage                       servers, profiles, groups, GPUs and MIG slices in use
    GET    api/files                       the profile files

Errors: 422 with `errors: [{field, message}]` (the checker's messages), 409 when the item
changed since `version` (with the current item), 404, 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import url_path_join
from tornado import httpclient, ioloop, web

from ..settings import load_settings
from .editor import EditError, Invalid, ProfileEditor
from .history import ChangeLog
from ..kube_api import InClusterAPI, KubeAPIError
from .source import FILE_NAME_RE, ConfigMapSource, FileSource

log = logging.getLogger("mlaas.admin")
MAX_BODY = 1024 * 1024
HERE = Path(__file__).parent


class AdminHandler(HubOAuthenticated, web.RequestHandler):
    def initialize(self, editor: ProfileEditor) -> None:
        self.editor = editor

    @property
    def who(self) -> str:
        user = self.current_user or {}
        return str(user.get("name", "?"))

    def check_admin(self) -> None:
        user = self.current_user
        if user is None:
            raise web.HTTPError(403, "Sign in as a hub admin.")
        if user.get("admin") is False:  # the access scope already says so; belt and braces
            raise web.HTTPError(403, f"{user.get('name')} is not a hub admin.")


class PageHandler(AdminHandler):
    @web.authenticated
    def get(self) -> None:
        self.check_admin()
        self.render(
            "page.html",
            user=self.who,
            prefix=os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/"),
            hub_home=url_path_join(os.environ.get("JUPYTERHUB_BASE_URL", "/"), "hub", "home"),
            xsrf=self.xsrf_token.decode() if isinstance(self.xsrf_token, bytes) else self.xsrf_token,
        )


class APIHandler(AdminHandler):
    def prepare(self) -> None:
        if len(self.request.body or b"") > MAX_BODY:
            raise web.HTTPError(413, f"The request body is over {MAX_BODY // 1024} KiB; an item is a few KiB.")
        if self.current_user is None:
            raise web.HTTPError(403, "Only hub admins may use this API (no admin token or login).")
        self.check_admin()

    def body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError as e:
            raise web.HTTPError(400, f"The request body is not JSON: {e}") from None
        except RecursionError:
            raise web.HTTPError(400, "The request body is nested too deeply to be an item.") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "The request body must be a JSON object.")
        return data

    def item(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body's `item`: always a JSON object of fields (a missing item never means delete)."""
        item = body.get("item")
        if not isinstance(item, dict):
            got = "missing" if "item" not in body else f"a {type(item).__name__ if item is not None else 'null'}"
            raise web.HTTPError(400, f"'item' must be a JSON object with the item's fields ({got}); "
                                     "to delete, use DELETE")
        return item

    def file(self, body: dict[str, Any]) -> str | None:
        """The body's `file`: a profile file's name in the profiles directory, or absent."""
        name = body.get("file")
        if name is None:
            return None
        if not isinstance(name, str) or not FILE_NAME_RE.match(name):
            raise web.HTTPError(400, f"'file' must name a profile file such as 'gpu.yaml' (lower-case letters, "
                                     f"digits, - and _, no directories), not {str(name)[:80]!r}")
        return name

    def version(self, value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise web.HTTPError(400, f"'version' must be the string from GET, not {str(value)[:40]!r}")
        return value

    def send(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message}))

    async def edit(self, action, *args: Any) -> None:
        try:
            # reading and validating YAML is work for a thread, not for this service's event loop
            change = await asyncio.to_thread(action, *args)
        except Invalid as e:
            self.send({"message": f"Not saved: {e}", "errors": [x.as_dict() for x in e.errors]}, e.status)
            return
        except EditError as e:
            self.send({"message": str(e), "current": getattr(e, "current", None)}, e.status)
            return
        except ValueError as e:  # a name the source refuses (FileSource._checked)
            self.send({"message": str(e)}, 400)
            return
        except KubeAPIError as e:  # the live ConfigMap (Kubernetes sites)
            if e.status == 409:
                self.send({"message": "The live profiles changed meanwhile (outside this page); reload and make "
                           "the change again."}, 409)
            else:
                self.send({"message": f"The cluster refused the change: {e}"}, 502)
            return
        log.info("%s: change #%d %s %s %s", self.who, change.id, change.action, change.kind, change.key)
        current = None
        if change.after is not None:
            current = self.editor.get(change.kind, change.key)
        self.send({"change": change.as_dict(), "current": current})


class ItemsHandler(APIHandler):
    async def get(self, kind: str) -> None:
        items = await asyncio.to_thread(self.editor.items, kind)
        self.send({kind: items, "files": self.editor.files()})

    async def post(self, kind: str) -> None:
        body = self.body()
        await self.edit(self.editor.create, kind, self.item(body), self.who, self.file(body))


class ItemHandler(APIHandler):
    async def get(self, kind: str, key: str) -> None:
        try:
            self.send(await asyncio.to_thread(self.editor.get, kind, key))
        except EditError as e:
            raise web.HTTPError(e.status, str(e)) from None

    async def put(self, kind: str, key: str) -> None:
        body = self.body()
        await self.edit(self.editor.update, kind, key, self.item(body), self.version(body.get("version")), self.who)

    async def patch(self, kind: str, key: str) -> None:
        body = self.body()
        fields = body.get("fields")
        if not isinstance(fields, dict):
            raise web.HTTPError(400, "PATCH takes {'fields': {...}, 'version': ...}: 'fields' must be a JSON object.")
        await self.edit(self.editor.patch, kind, key, fields, self.version(body.get("version")), self.who)

    async def delete(self, kind: str, key: str) -> None:
        await self.edit(self.editor.delete, kind, key, self.get_query_argument("version", None), self.who)


class HistoryHandler(APIHandler):
    async def get(self) -> None:
        kind, key = self.get_query_argument("kind", None), self.get_query_argument("key", None)
        self.send({"changes": [c.as_dict() for c in self.editor.history.list(kind, key)]})


class RestoreHandler(APIHandler):
    async def post(self, change_id: str) -> None:
        await self.edit(self.editor.restore, int(change_id), self.who)


class FilesHandler(APIHandler):
    def get(self) -> None:
        self.send({"files": self.editor.files()})


class UsageHandler(APIHandler):
    async def get(self) -> None:
        """The hub's view of what runs (asked with this service's own token, scope read:servers)."""
        url = url_path_join(os.environ["JUPYTERHUB_API_URL"], "mlaas", "usage")
        client = httpclient.AsyncHTTPClient()
        try:
            response = await client.fetch(
                url, headers={"Authorization": f"token {os.environ['JUPYTERHUB_API_TOKEN']}"}, request_timeout=10
            )
        except (httpclient.HTTPClientError, OSError) as e:
            raise web.HTTPError(502, f"The hub did not answer the usage request: {e}") from None
        self.send(json.loads(response.body))


def make_app(editor: ProfileEditor, prefix: str) -> web.Application:
    kinds = r"(profiles|quotas)"
    args = {"editor": editor}
    return web.Application(
        [
            (prefix, PageHandler, args),
            (url_path_join(prefix, "oauth_callback"), HubOAuthCallbackHandler),
            (url_path_join(prefix, rf"api/{kinds}"), ItemsHandler, args),
            (url_path_join(prefix, rf"api/{kinds}/([^/]+)"), ItemHandler, args),
            (url_path_join(prefix, r"api/history"), HistoryHandler, args),
            (url_path_join(prefix, r"api/history/(\d+)/restore"), RestoreHandler, args),
            (url_path_join(prefix, r"api/files"), FilesHandler, args),
            (url_path_join(prefix, r"api/usage"), UsageHandler, args),
            (url_path_join(prefix, r"static/(.*)"), web.StaticFileHandler, {"path": str(HERE / "static")}),
        ],
        cookie_secret=os.urandom(32),
        template_path=str(HERE),
    )


class DeployWatch:
    """On a Kubernetes site: a change of the deployed profile files (`mlaas deploy` updating the
    chart's ConfigMap) goes into the history next to the admins' edits, saying when a live edit
    stays in force over the newly deployed file."""

    def __init__(self, source: ConfigMapSource, history: ChangeLog, state: Path):
        self.source, self.history, self.seen_file = source, history, state / "deployed.json"

    def check(self) -> None:
        import hashlib

        try:
            base = self.source.deployed()
            overridden = set(self.source.overridden())
        except (KubeAPIError, OSError) as e:
            log.warning("Cannot read the deployed profiles: %s", e)
            return
        now = {name: hashlib.sha256(text.encode()).hexdigest()[:16] for name, text in base.items()}
        seen = json.loads(self.seen_file.read_text()) if self.seen_file.exists() else None
        if seen is not None:
            for name in sorted(set(now) | set(seen)):
                if now.get(name) != seen.get(name):
                    self.history.record(
                        who="mlaas deploy", action="deploy", kind="files", key=name, file=name,
                        before={"deployed": seen.get(name)}, after={"deployed": now.get(name),
                                                                    "live_edit_in_force": name in overridden},
                    )
        self.seen_file.write_text(json.dumps(now))


def main() -> None:
    from ..logscrub import install

    install()
    logging.basicConfig(level=logging.INFO, format="[%(levelname).1s %(asctime)s mlaas-admin] %(message)s")
    settings = load_settings()
    state = settings.state_dir / "admin"
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    history = ChangeLog(state / "history")
    configmaps = os.environ.get("MLAAS_ADMIN_CONFIGMAPS", "")  # Kubernetes: "<deployed>,<live>"
    if configmaps:
        base, live = configmaps.split(",")
        source: Any = ConfigMapSource(InClusterAPI(), base, live)
        watch = DeployWatch(source, history, state)

        def check_deploys() -> None:  # reads the cluster: in a thread, off this service's loop
            asyncio.ensure_future(asyncio.to_thread(watch.check))

        ioloop.PeriodicCallback(check_deploys, 10_000).start()
        ioloop.IOLoop.current().add_callback(check_deploys)  # and once at start
        where = f"ConfigMaps {base} (deployed) and {live} (live edits)"
    else:
        source, where = FileSource(settings.profiles_dir, state / "profiles.lock"), str(settings.profiles_dir)
    editor = ProfileEditor(source, history)
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/mlaas-admin/")
    url = os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8004")
    from urllib.parse import urlparse

    parsed = urlparse(os.environ.get("MLAAS_ADMIN_BIND") or url)  # in a pod: every address of the pod
    # an item is a few KiB: bodies over MAX_BODY get a 413 (prepare); far larger ones are not even read
    make_app(editor, prefix).listen(parsed.port or 80, parsed.hostname or "127.0.0.1", max_body_size=16 * MAX_BODY)
    log.info("Admin service for %s at %s", where, url)
    ioloop.IOLoop.current().start()
