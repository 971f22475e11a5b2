"""The hub's groups as MLflow's own permission model (see the package doc).

One MLflow workspace per hub group (`workspace_name`), with one role in it, `members`, that may
use the workspace (create experiments and models in it) and edit its experiments and models
(log runs, read everyone's). A user holds the `members` role of exactly the groups the hub says
they act for; the sync adds and removes assignments to match, and makes hub admins MLflow admins.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from ..projects.names import project_slug
from .mlflow_api import MLflowAdmin, MLflowError

log = logging.getLogger("mlaas.tracking")

ROLE = "members"
ROLE_PERMISSIONS = (("workspace", "USE"), ("experiment", "EDIT"), ("registered_model", "EDIT"))
DEFAULT_EXPERIMENT = "Default"  # each workspace's experiment for runs started with none chosen (servers' environment)
RESERVED = {"workspaces", "api", "ajax-api", "static-files", "default"}  # MLflow's, and its default workspace


def workspace_name(group: str) -> str:
    """The group's MLflow workspace: a DNS label (MLflow's rule), distinct for distinct groups."""
    slug = project_slug(group, max_len=63)
    if slug in RESERVED or len(slug) < 2:
        slug = f"{slug}-{hashlib.sha256(group.encode()).hexdigest()[:8]}"
    return slug


@dataclass(frozen=True)
class Identity:
    """Who the hub says is asking: their name, admin flag and the groups they act for."""
    name: str
    admin: bool
    groups: tuple[str, ...]

    @property
    def workspaces(self) -> dict[str, str]:
        return {workspace_name(g): g for g in self.groups}


class GroupSync:
    def __init__(self, admin: MLflowAdmin):
        self.admin = admin
        self.roles: dict[str, int] = {}  # workspace -> the id of its members role
        self.synced: dict[str, Identity] = {}  # the last identity each user was synced to

    async def ensure_workspace(self, workspace: str, group: str) -> int:
        """The group's workspace and its members role (made once); returns the role's id."""
        if workspace in self.roles:
            return self.roles[workspace]
        if workspace not in await self.admin.workspaces():
            try:
                await self.admin.create_workspace(workspace, f"Hub group {group}")
                log.info("Workspace %s made for the hub group %s", workspace, group)
            except MLflowError as e:
                if e.code != "RESOURCE_ALREADY_EXISTS":
                    raise
        role = next((r for r in await self.admin.roles(workspace) if r["name"] == ROLE), None)
        if role is None:
            role = await self.admin.create_role(workspace, ROLE, f"Members of the hub group {group}")
            for resource_type, permission in ROLE_PERMISSIONS:
                await self.admin.add_role_permission(int(role["id"]), resource_type, permission)
        self.roles[workspace] = int(role["id"])
        return self.roles[workspace]

    async def sync(self, who: Identity, password: str, new_password: bool) -> None:
        """Make MLflow's view of `who` match the hub's (only when it changed since last time)."""
        if self.synced.get(who.name) == who and not new_password:
            return
        user = await self.admin.user(who.name)
        if user is None:
            await self.admin.create_user(who.name, password)
            log.info("MLflow user %s made", who.name)
        elif new_password:
            await self.admin.set_password(who.name, password)
        if user is None or bool(user.get("is_admin")) != who.admin:
            await self.admin.set_admin(who.name, who.admin)
        wanted = {await self.ensure_workspace(ws, group) for ws, group in who.workspaces.items()}
        held = {int(r["id"]) for r in await self.admin.user_roles(who.name) if r.get("name") == ROLE}
        for role_id in sorted(wanted - held):
            await self.admin.assign(who.name, role_id)
        for role_id in sorted(held - wanted):
            await self.admin.unassign(who.name, role_id)
        if wanted != held:
            log.info("%s: member of the workspaces %s", who.name, ", ".join(sorted(who.workspaces)) or "(none)")
        self.synced[who.name] = who
