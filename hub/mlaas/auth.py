"""The AAI authenticator: OpenID Connect claims to a JupyterHub user, groups and admin flag.

Builds on oauthenticator's GenericOAuthenticator. Groups come from two claims an institute AAI
may send: a plain list (INDIGO IAM, Keycloak: `groups`) and EGI Check-in style entitlements
(`eduperson_entitlement`: `urn:mace:egi.eu:group:<vo>[:<subgroup>…]:role=<role>#<authority>`).

The hub user name comes from `username_claim` (readable, e.g. `preferred_username`), but who a
person *is* comes from `identity_claim` (`sub`: stable and unique per issuer in OpenID Connect).
The first identity that signs in under a name keeps it (`AccountRegistry.bind_identity`): another
IdP account whose name maps to the same hub user (JupyterHub lowercases names: `Alice` ->
`alice`; or a name that was reused) is refused, never let into the first one's servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from tornado.httpclient import HTTPClientError
from traitlets import List, Unicode, default

from .accounts import NameTaken, registry_at
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
    identity_claim = Unicode(
        "sub", config=True,
        help="Claim that identifies a person for good (unique and never reassigned by the issuer): `sub`.",
    )
    identity_issuer = Unicode(
        "", config=True, help="The issuer the identities belong to (default: the authorize URL's origin)."
    )
    accounts_db = Unicode(
        "", config=True,
        help="Registry binding hub user names to identities (mlaas.accounts.AccountRegistry); empty: no binding.",
    )

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

    @property
    def issuer(self) -> str:
        if self.identity_issuer:
            return self.identity_issuer
        u = urlparse(self.authorize_url)
        return f"{u.scheme}://{u.netloc}"

    async def authenticate(self, handler, data=None, **kwargs):
        try:
            model = await super().authenticate(handler, data, **kwargs)
        except (OSError, asyncio.TimeoutError) as e:
            self.log.error("The identity provider cannot be reached: %s", type(e).__name__)
            raise web.HTTPError(503, self._unreachable()) from None
        except HTTPClientError as e:
            if e.code == 599 or e.code >= 500:
                self.log.error("The identity provider answered the sign-in with HTTP %s", e.code)
                raise web.HTTPError(503, self._unreachable()) from None
            raise
        except ValueError:  # oauthenticator: the claim that names the user is missing
            raise web.HTTPError(
                403, f"Your identity provider did not send the {self.username_claim!r} claim that names you on this "
                "hub, so you cannot sign in. Ask the platform admins (the hub may need more scopes).",
            ) from None
        if not model:
            return model
        return await asyncio.to_thread(self._bind, model)

    def _unreachable(self) -> str:
        return (
            f"The identity provider ({self.issuer}) cannot be reached right now, so your sign-in could not be "
            "completed. Please try again in a few minutes; if it keeps failing, tell the platform admins."
        )

    def _bind(self, model: dict[str, Any]) -> dict[str, Any]:
        """Give the hub user name of this identity, refusing a name that belongs to another one."""
        raw = str(model["name"])
        name = self.normalize_username(raw)
        if not self.validate_username(name):
            self.log.warning("Refused a sign-in with an invalid user name %r", raw)
            raise web.HTTPError(
                403,
                f"Your identity provider gives you the user name {raw!r}, which this hub cannot use as a user "
                "name. Ask the platform admins.",
            )
        if not self.accounts_db:
            return model
        claims = (model.get("auth_state") or {}).get(self.user_auth_state_key) or {}
        subject = claims.get(self.identity_claim)
        if not isinstance(subject, str) or not subject:
            raise web.HTTPError(
                403, f"Your identity provider did not send the {self.identity_claim!r} claim that identifies you; "
                "ask the platform admins.",
            )
        try:
            bound = registry_at(self.accounts_db).bind_identity(self.issuer, subject, name)
        except NameTaken:
            self.log.warning("Refused %r: hub user %s belongs to another identity of %s", raw, name, self.issuer)
            raise web.HTTPError(
                403,
                f"The hub user name {name!r} (from your account {raw!r}) already belongs to a different account "
                "of your identity provider, so you cannot sign in with it. Ask the platform admins.",
            ) from None
        if bound != name:
            self.log.info("Identity of %r signs in as %s, the name it was first given", raw, bound)
        model["name"] = bound
        return model

    async def check_allowed(self, username: str, auth_model: dict[str, Any]) -> bool:
        if is_project_user(username):  # names of group projects' hub users are not people
            self.log.warning("Refused a login as %s: names starting with %s are reserved", username, PROJECT_USER_PREFIX)
            raise web.HTTPError(
                403, f"The name {username!r} is reserved for group projects; ask the platform admins."
            )
        return await super().check_allowed(username, auth_model)
