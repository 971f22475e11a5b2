"""What the hub's home page shows about the project servers of the viewer's groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jupyterhub.utils import url_path_join

from ..profiles import ProfileStore
from .names import project_user


def project_servers(store: ProfileStore, user: Any) -> list[dict[str, Any]]:
    """One entry per project of the user's groups: its state and where to start, open or stop it."""
    if user is None or getattr(user, "kind", "user") != "user":
        return []
    users = user.settings.get("users")
    base_url = user.settings.get("base_url", "/")
    groups = {g.name for g in user.groups}
    entries = []
    for project in store.current().projects:
        if project.group not in groups:
            continue
        try:
            owner = users[project_user(project.group)]
        except KeyError:  # created within seconds by mlaas.projects.sync
            continue
        spawner = owner.spawner
        profile = getattr(spawner, "profile", None)
        if spawner.ready:
            status = f"running ({profile.display_name})" if profile else "running"
        elif spawner.pending:
            status = f"{spawner.pending}…"
        else:
            status = "stopped"
        entries.append(
            {
                "title": project.title,
                "description": project.description,
                "group": project.group,
                "user": owner.name,
                "status": status,
                "ready": spawner.ready,
                "active": spawner.active,
                "url": owner.url,
                "spawn_url": url_path_join(base_url, "hub", "spawn", owner.name),
            }
        )
    return entries


def template_var(store: ProfileStore) -> Callable[[Any], list[dict[str, Any]]]:
    return lambda user: project_servers(store, user)
