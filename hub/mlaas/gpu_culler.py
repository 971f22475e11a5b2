"""GPU-aware idle culling: a server whose GPUs stayed unused for its profile's `gpu_idle_timeout`
is warned, then stopped and its GPUs freed, even while a browser tab keeps the server "active"
(which is all jupyterhub-idle-culler sees).

A hub-managed service (`mlaas-gpu-culler`, its own role) samples the admins' usage API (GPU use
per server from NVML, hub/mlaas/api.py) every `culling.gpu_every` seconds. A server counts as
idle while every one of its devices shows 0 % utilisation; one busy sample, or a device whose use
the driver cannot tell, starts the count again. Before stopping it, the server gets a notice in
its home, visible in JupyterLab's file browser ("GPU idle - this server stops at …"); the notice
goes away if the GPU is used again, and stays after a stop, so the user sees why.

    python -m mlaas.gpu_culler   (started by the hub; reads JUPYTERHUB_API_TOKEN, JUPYTERHUB_API_URL,
                                  MLAAS_GPU_CULL_EVERY and MLAAS_SERVERS_URL)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

SERVICE = "mlaas-gpu-culler"
ROLE = {"name": SERVICE, "scopes": ["list:users", "read:servers", "delete:servers", "access:servers"],
        "services": [SERVICE]}
NOTICE_PREFIX = "GPU idle - this server stops at "
log = logging.getLogger("mlaas.gpu_culler")


def warning_lead(timeout: float) -> float:
    """How long before the stop the user is warned: a third of the timeout, at most 10 minutes."""
    return min(600.0, timeout / 3)


@dataclass
class _Idle:
    since: float
    notice: str | None = None  # the notice's file name once warned


@dataclass
class Action:
    kind: str  # "warn", "stop" or "clear" (busy again after a warning)
    user: str
    server: str
    seconds: float  # warn: until the stop; stop: how long it was idle
    notice: str | None = None


@dataclass
class GpuIdleTracker:
    """The decision, from successive samples of the usage API's `servers` (no I/O: tested alone)."""

    idle: dict[str, _Idle] = field(default_factory=dict)

    def observe(self, now: float, servers: list[dict]) -> list[Action]:
        actions: list[Action] = []
        seen = set()
        for s in servers:
            timeout, devices = s.get("gpu_idle_timeout"), s.get("devices") or []
            if not timeout or not devices:
                continue
            key = f"{s['user']}/{s['server']}"
            seen.add(key)
            if not all(d.get("utilization") == 0 for d in devices):  # busy, or not known: not idle
                state = self.idle.pop(key, None)
                if state and state.notice:
                    actions.append(Action("clear", s["user"], s["server"], 0, state.notice))
                continue
            state = self.idle.setdefault(key, _Idle(now))
            idle_for = now - state.since
            if idle_for >= timeout:
                actions.append(Action("stop", s["user"], s["server"], idle_for, state.notice))
                del self.idle[key]
            elif idle_for >= timeout - warning_lead(timeout) and state.notice is None:
                left = timeout - idle_for
                state.notice = f"{NOTICE_PREFIX}{time.strftime('%H.%M UTC', time.gmtime(time.time() + left))}.md"
                actions.append(Action("warn", s["user"], s["server"], left, state.notice))
        for key in set(self.idle) - seen:  # stopped or gone meanwhile
            del self.idle[key]
        return actions


class GpuCuller:
    def __init__(self, api_url: str, token: str, servers_url: str, every: float, tls_ca: str | None = None):
        self.api_url, self.token, self.servers_url, self.every = api_url.rstrip("/"), token, servers_url.rstrip("/"), every
        self.tracker = GpuIdleTracker()
        self.http = AsyncHTTPClient()
        from .tls import client_context

        self.ssl = client_context(tls_ca) if servers_url.startswith("https:") else None  # the proxy's certificate

    async def _call(self, method: str, url: str, body: dict | None = None, ok_missing: bool = False) -> dict:
        req = HTTPRequest(url, method=method, headers={"Authorization": f"token {self.token}"},
                          body=json.dumps(body) if body is not None else None, request_timeout=30,
                          ssl_options=self.ssl if url.startswith("https:") else None)
        try:
            r = await self.http.fetch(req)
        except HTTPClientError as e:
            if ok_missing and e.code == 404:
                return {}
            raise
        return json.loads(r.body) if r.body else {}

    def _contents(self, action: Action) -> str:
        server = f"/{quote(action.server)}" if action.server else ""
        return f"{self.servers_url}/user/{quote(action.user)}{server}/api/contents/{quote(action.notice or '')}"

    async def round(self) -> list[Action]:
        usage = await self._call("GET", f"{self.api_url}/mlaas/usage")
        actions = self.tracker.observe(time.monotonic(), usage.get("servers", []))
        for action in actions:
            try:
                await self._act(action)
            except Exception as e:  # one server's trouble never stops the culler
                log.warning("GPU culler: %s %s/%s failed: %s", action.kind, action.user, action.server, e)
        return actions

    async def _act(self, a: Action) -> None:
        who = f"{a.user}/{a.server}" if a.server else a.user
        if a.kind == "warn":
            minutes = max(1, round(a.seconds / 60))
            text = (f"# Your GPU has been idle\n\nThe GPUs of this server have not been used for a while. To free them "
                    f"for others, the server stops in about {minutes} minute(s) unless a GPU is used again "
                    f"(your files stay; start the server again from the hub's home page).\n")
            await self._call("PUT", self._contents(a), {"type": "file", "format": "text", "content": text})
            log.info("GPU culler: warned %s (GPUs idle; stop in %.0f s)", who, a.seconds)
        elif a.kind == "clear":
            await self._call("DELETE", self._contents(a), ok_missing=True)
            log.info("GPU culler: %s uses its GPUs again; warning removed", who)
        elif a.kind == "stop":
            path = f"/users/{quote(a.user)}/servers/{quote(a.server)}" if a.server else f"/users/{quote(a.user)}/server"
            await self._call("DELETE", f"{self.api_url}{path}", ok_missing=True)
            log.info("GPU culler: stopped %s, its GPUs idle for %.0f s", who, a.seconds)

    async def run(self) -> None:
        log.info("GPU culler: sampling GPU use every %.0f s", self.every)
        while True:
            try:
                await self.round()
            except Exception as e:  # the hub restarting, a slow answer: next round
                log.warning("GPU culler: round failed: %s", e)
            await asyncio.sleep(self.every)


def culler_service(every: int, servers_url: str, tls_ca: str | Path | None = None) -> dict:
    """`servers_url`: the proxy as reachable here; `tls_ca`: its certificate, where it serves TLS."""
    from .tls import CA_ENV

    env = {"MLAAS_GPU_CULL_EVERY": str(every), "MLAAS_SERVERS_URL": servers_url}
    if tls_ca:
        env[CA_ENV] = str(tls_ca)
    return {"name": SERVICE, "command": [sys.executable, "-m", "mlaas.hub_service", "mlaas.gpu_culler"],
            "environment": env}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname).1s %(asctime)s %(name)s] %(message)s")
    culler = GpuCuller(os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"],
                       os.environ["MLAAS_SERVERS_URL"], float(os.environ.get("MLAAS_GPU_CULL_EVERY", "30")),
                       os.environ.get("MLAAS_TLS_CA"))
    asyncio.run(culler.run())


if __name__ == "__main__":
    main()
