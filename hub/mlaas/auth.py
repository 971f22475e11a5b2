"""The AAI authenticator: OpenID Connect claims to a JupyterHub user, groups and admin flag.

Builds on oauthenticator's GenericOAuthenticator. Groups come from two claims an institute AAI
may send: a plain list (INDIGO IAM, Keycloak: `groups`) and EGI Check-in style entitlements
(`eduperson_entitlement`: `urn:mace:egi.eu:group:<vo>[:<subgroup>…]:role=<role>#<authority>`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets import List, Unicode, default

from .projects.names import PROJECT_USER_PREFIX, is_project_user


def groups_from_entitlements(
    entitlements: Iterable[str], prefixes: Iterable[str], roles: Iterable[str]
) -> list[str]:
    """Map entitlement URNs to group names.

    `urn:mace:egi.eu:group:vo.example.eu:atlas-ml:role=member#aai.egi.eu` -> `vo.example.eu:atlas-ml`;
    a VO without subgroup maps to the VO's name. Only the listed roles count; other URNs are ignored.
    """
    groups: list[str] = []
    roles = set(roles)
    for urn in entitlements:
        if not isinstance(urn, str):
            continue
        prefix = next((p for p in prefixes if urn.startswith(p)), None)
        if prefix is None:
            continue
        body = urn[len(prefix) :].split("#", 1)[0]
        parts = body.split(":")
        role = None
        if parts and parts[-1].startswith("role="):
            role = parts.pop()[len("role=") :]
        if role is not None and role not in roles:
            continue
        name = ":".join(p for p in parts if p)
        if name and name not in groups:
            groups.append(name)
    return groups


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


class MLaaSAuthenticator(GenericOAuthenticator):
    """GenericOAuthenticator that reads groups from a plain claim and from entitlement URNs."""

    groups_claim = Unicode("groups", config=True, help="Userinfo claim with a plain list of group names.")
    entitlements_claim = Unicode(
        "eduperson_entitlement", config=True, help="Userinfo claim with entitlement URNs (EGI Check-in)."
    )
    entitlement_prefixes = List(
        Unicode(), ["urn:mace:egi.eu:group:"], config=True, help="URN prefixes that denote group membership."
    )
    entitlement_roles = List(Unicode(), ["member"], config=True, help="Entitlement roles that count as membership.")

    @default("auth_state_groups_key")
    def _groups_from_claims(self):
        return self.groups_of

    @default("custom_403_message")
    def _readable_refusal(self) -> str:
        allowed = ", ".join(sorted(self.allowed_groups)) or "none configured"
        return (
            "Your account signed in, but it is not a member of a group that may use this MLaaS Hub "
            f"(allowed groups: {allowed}). Ask your group's manager to add you, or contact the platform admins."
        )

    def groups_of(self, auth_state: dict[str, Any]) -> list[str]:
        claims = auth_state.get(self.user_auth_state_key) or {}
        groups = _as_list(claims.get(self.groups_claim))
        for name in groups_from_entitlements(
            _as_list(claims.get(self.entitlements_claim)), self.entitlement_prefixes, self.entitlement_roles
        ):
            if name not in groups:
                groups.append(name)
        return groups

    async def check_allowed(self, username: str, auth_model: dict[str, Any]) -> bool:
        if is_project_user(username):  # names of group projects' hub users are not people
            self.log.warning("Refused a login as %s: names starting with %s are reserved", username, PROJECT_USER_PREFIX)
            raise web.HTTPError(
                403, f"The name {username!r} is reserved for group projects; ask the platform admins."
            )
        return await super().check_allowed(username, auth_model)
