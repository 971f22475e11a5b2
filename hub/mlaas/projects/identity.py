"""Whose rules and quotas apply to a hub identity, everywhere (spawns, Dask clusters, usage).

A person acts with their own groups. A group project's hub user (`project-<group>`) has no
groups of its own in JupyterHub: it acts as its group, so its servers and its token's Dask
clusters count against that group's profiles and quotas like any member's.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..profiles.model import Project
from .names import is_project_user, project_user


def acting_groups(username: str, groups: Iterable[str], projects: Iterable[Project]) -> list[str]:
    if is_project_user(username):
        return [p.group for p in projects if project_user(p.group) == username]
    return sorted(set(groups))
