"""Group projects: project servers every member may start and open, and shared project storage.

Built on JupyterHub's own mechanisms: a project server is the server of a hub user
`project-<group>`; a role per project, granted to the group, gives its members the scopes to
start, stop and open that server (`servers!user=…`, `access:servers!user=…`). Nobody else holds
those scopes, so other users get 403/404 whatever URL or token they try.
"""

from .names import PROJECT_USER_PREFIX, is_project_user, project_slug, project_user, unix_group
from .roles import member_scopes, project_role_specs, role_name

__all__ = [
    "PROJECT_USER_PREFIX",
    "is_project_user",
    "member_scopes",
    "project_role_specs",
    "project_slug",
    "project_user",
    "role_name",
    "unix_group",
]
