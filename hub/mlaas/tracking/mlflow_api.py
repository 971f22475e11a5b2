"""The MLflow server's admin REST API, as far as `mlaas.tracking.sync` needs it (async, tornado).

Every call is made as MLflow's admin (basic auth); errors become `MLflowError` with MLflow's own
error code and message."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlencode

from tornado import httpclient


class MLflowError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class MLflowAdmin:
    def __init__(self, base_url: str, username: str, password: str):
        self.base_url = base_url.rstrip("/")  # the server's address with its static prefix
        self.auth = basic_auth(username, password)
        self.client = httpclient.AsyncHTTPClient()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   params: dict[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}" + (f"?{urlencode(params)}" if params else "")
        request = httpclient.HTTPRequest(
            url, method=method, headers={"Authorization": self.auth, "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else None, allow_nonstandard_methods=True,
            request_timeout=30)
        try:
            response = await self.client.fetch(request, raise_error=False)
        except OSError as e:  # not listening (yet, or any more)
            raise MLflowError(599, "UNREACHABLE", str(e)) from None
        if response.code == 599:
            raise MLflowError(599, "UNREACHABLE", str(response.error))
        try:
            data = json.loads(response.body or b"{}")
        except ValueError:
            data = {"message": (response.body or b"")[:200].decode(errors="replace")}
        if response.code >= 400:
            raise MLflowError(response.code, str(data.get("error_code", "")), str(data.get("message", "")))
        return data

    # --- users ---------------------------------------------------------------------------------
    async def user(self, username: str) -> dict[str, Any] | None:
        try:
            return (await self.call("GET", "/api/2.0/mlflow/users/get", params={"username": username}))["user"]
        except MLflowError as e:
            if e.code == "RESOURCE_DOES_NOT_EXIST" or e.status == 404:
                return None
            raise

    async def create_user(self, username: str, password: str) -> None:
        await self.call("POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})

    async def set_password(self, username: str, password: str) -> None:
        await self.call("PATCH", "/api/2.0/mlflow/users/update-password", {"username": username, "password": password})

    async def set_admin(self, username: str, is_admin: bool) -> None:
        await self.call("PATCH", "/api/2.0/mlflow/users/update-admin", {"username": username, "is_admin": is_admin})

    # --- workspaces and roles ------------------------------------------------------------------
    async def workspaces(self) -> set[str]:
        data = await self.call("GET", "/api/3.0/mlflow/workspaces")
        return {w["name"] for w in data.get("workspaces", [])}

    async def create_workspace(self, name: str, description: str) -> None:
        await self.call("POST", "/api/3.0/mlflow/workspaces", {"name": name, "description": description})

    async def roles(self, workspace: str) -> list[dict[str, Any]]:
        return (await self.call("GET", "/api/3.0/mlflow/roles/list", params={"workspace": workspace})).get("roles", [])

    async def create_role(self, workspace: str, name: str, description: str) -> dict[str, Any]:
        return (await self.call("POST", "/api/3.0/mlflow/roles/create",
                                {"workspace": workspace, "name": name, "description": description}))["role"]

    async def add_role_permission(self, role_id: int, resource_type: str, permission: str) -> None:
        await self.call("POST", "/api/3.0/mlflow/roles/permissions/add", {
            "role_id": role_id, "resource_type": resource_type, "resource_pattern": "*", "permission": permission})

    async def user_roles(self, username: str) -> list[dict[str, Any]]:
        return (await self.call("GET", "/api/3.0/mlflow/users/roles/list", params={"username": username})).get("roles", [])

    async def assign(self, username: str, role_id: int) -> None:
        await self.call("POST", "/api/3.0/mlflow/roles/assign", {"username": username, "role_id": role_id})

    async def unassign(self, username: str, role_id: int) -> None:
        await self.call("DELETE", "/api/3.0/mlflow/roles/unassign", {"username": username, "role_id": role_id})
