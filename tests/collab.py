"""A minimal real-time collaboration client (the Yjs sync protocol over jupyter-collaboration's
WebSocket), for tests: what JupyterLab does when two people open the same notebook."""

from __future__ import annotations

import time
from typing import Any

import requests
import websocket
from jupyter_ydoc import YNotebook
from pycrdt import Doc, YMessageType, create_sync_message, create_update_message, handle_sync_message


class CollaborationClient:
    def __init__(self, server_url: str, token: str, path: str):
        headers = {"Authorization": f"token {token}"}
        for _ in range(2):  # once more after a 503 of the proxy itself (below)
            r = requests.put(
                f"{server_url}/api/collaboration/session/{path}",
                json={"format": "json", "type": "notebook"},
                headers=headers,
                timeout=30,
            )
            # configurable-http-proxy answers 503 when its write to the server fails with EPIPE
            # although the server answered (seen in CI after the server's 403 to an outsider, and
            # in test_zygote after a 204): the proxy's race, not the server's answer
            if r.status_code != 503:
                break
        r.raise_for_status()
        session = r.json()
        room = f"json:notebook:{session['fileId']}"
        ws_url = server_url.replace("http://", "ws://", 1)
        self.ws = websocket.create_connection(
            f"{ws_url}/api/collaboration/room/{room}?sessionId={session['sessionId']}",
            header=[f"Authorization: token {token}"],
            timeout=30,
        )
        self.doc = Doc()
        self.notebook = YNotebook(self.doc)
        self._subscription = self.doc.observe(self._send_update)
        self.ws.send_binary(create_sync_message(self.doc))

    def _send_update(self, event: Any) -> None:
        self.ws.send_binary(create_update_message(event.update))

    def pump(self, seconds: float = 0.2) -> None:
        """Handle what the server sent within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                message = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                return
            if isinstance(message, bytes) and message and message[0] == YMessageType.SYNC:
                reply = handle_sync_message(message[1:], self.doc)
                if reply is not None:
                    self.ws.send_binary(reply)

    def wait_for(self, predicate, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.2)
            try:
                if predicate(self):
                    return True
            except (IndexError, KeyError):
                pass
        return False

    def cell_source(self, index: int) -> str:
        return str(self.notebook.ycells[index]["source"])

    def close(self) -> None:
        self.ws.close()
