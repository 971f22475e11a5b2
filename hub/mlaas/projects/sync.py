"""Keep the hub's project roles and project users in step with the profile files, while it runs.

At start the hub loads the project roles from `load_roles` (see `mlaas.hubconfig`). When an
admin adds or removes a project later, this task creates or deletes the role and creates the
project's hub user, through JupyterHub's own role functions, within seconds and without a
restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from jupyterhub import orm, roles

from ..profiles.model import Project
from .names import project_user
from .roles import is_project_role, project_role_specs

log = logging.getLogger("JupyterHub.mlaas.projects")


def sync_projects(db, projects: Iterable[Project]) -> list[str]:
    """Make the database hold exactly these projects' roles, groups and users; return what changed."""
    changes: list[str] = []
    specs = project_role_specs(projects)
    wanted = {spec["name"] for spec in specs}
    for spec in specs:
        existing = orm.Role.find(db, spec["name"])
        role = roles.create_role(db, {k: spec[k] for k in ("name", "description", "scopes")}, commit=False)
        if existing is None:
            changes.append(f"added role {spec['name']}")
        for group_name in spec["groups"]:
            group = orm.Group.find(db, group_name)
            if group is None:
                group = orm.Group(name=group_name)
                db.add(group)
            if role not in group.roles:
                group.roles.append(role)
        changes.extend(ensure_project_user(db, project_user(spec["groups"][0])))
    for role in db.query(orm.Role).all():
        if is_project_role(role.name) and role.name not in wanted:
            db.delete(role)
            changes.append(f"removed role {role.name}")
    db.commit()
    return changes


def ensure_project_user(db, name: str) -> list[str]:
    if orm.User.find(db, name) is not None:
        return []
    user = orm.User(name=name)
    db.add(user)
    db.flush()
    roles.assign_default_roles(db, entity=user)
    return [f"added project user {name}"]


async def keep_in_sync(app_getter: Callable[[], object], projects: Callable[[], Iterable[Project]],
                       interval: float = 2.0) -> None:
    """Run in the hub's event loop: wait for the hub to start, then follow the profile files."""
    last: tuple[Project, ...] | None = None
    while True:
        await asyncio.sleep(interval)
        app = app_getter()
        if app is None or getattr(app, "io_loop", None) is None:  # the hub has not started yet
            continue
        try:
            current = tuple(projects())
            if current != last:
                for change in sync_projects(app.db, current):
                    log.info("Projects: %s", change)
                last = current
        except Exception:  # the hub must outlive any surprise here
            log.exception("Could not bring the project roles in step with the profile files")
            app.db.rollback()
