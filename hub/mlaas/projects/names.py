"""Names derived from a group's name: the project's hub user, role, Unix group and directory.

Group names may hold characters that user names, role names and Unix group names may not
(`vo.example.eu:atlas-ml`); those names get a short hash so two groups never share one.
"""

from __future__ import annotations

import hashlib
import re

PROJECT_USER_PREFIX = "project-"
UNIX_GROUP_PREFIX = "mlaas-p-"
MAX_UNIX_NAME = 32  # groupadd's limit


def project_slug(group: str, max_len: int = 40) -> str:
    """A lower-case DNS-label form of the group name, unique per group."""
    simple = re.sub(r"[^a-z0-9-]+", "-", group.lower()).strip("-") or "group"
    if simple == group and len(simple) <= max_len:
        return simple
    digest = hashlib.sha256(group.encode()).hexdigest()[:8]
    return f"{simple[: max_len - 9].rstrip('-')}-{digest}"


def project_user(group: str) -> str:
    """The hub user that owns the group's project servers."""
    return PROJECT_USER_PREFIX + project_slug(group)


def is_project_user(username: str) -> bool:
    """Names with the project prefix are reserved: nobody may log in as one."""
    return username.startswith(PROJECT_USER_PREFIX)


def unix_group(group: str) -> str:
    """The Unix group whose members may read and write the project's storage (one machine)."""
    return UNIX_GROUP_PREFIX + project_slug(group, MAX_UNIX_NAME - len(UNIX_GROUP_PREFIX))


def project_claim(group: str) -> str:
    """The ReadWriteMany PersistentVolumeClaim of a group's project storage on Kubernetes (the chart makes it)."""
    return f"mlaas-project-{project_slug(group)}"
