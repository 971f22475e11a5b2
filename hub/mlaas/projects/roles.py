"""The JupyterHub role that lets a group's members use their project's servers.

The same role definitions are loaded at hub start (`load_roles`) and kept in step with the
profile files while the hub runs (`mlaas.projects.sync`).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..profiles.model import Project
from .names import project_slug, project_user

ROLE_PREFIX = "mlaas-project-"


def role_name(group: str) -> str:
    return ROLE_PREFIX + project_slug(group)


def member_scopes(group: str) -> list[str]:
    """Start, stop and open the project's servers; read only its name and servers; nothing else."""
    owner = project_user(group)
    return [
        f"servers!user={owner}",  # start and stop (JupyterHub's spawn page and REST API)
        f"access:servers!user={owner}",  # open it: pages, contents, kernels, terminals
        f"read:users:name!user={owner}",
        f"read:users:activity!user={owner}",
    ]


def project_role_specs(projects: Iterable[Project]) -> list[dict]:
    return [
        {
            "name": role_name(p.group),
            "description": f"Members of {p.group} use the project servers of {p.title}",
            "scopes": member_scopes(p.group),
            "groups": [p.group],
        }
        for p in projects
    ]


def is_project_role(name: str) -> bool:
    return name.startswith(ROLE_PREFIX)
