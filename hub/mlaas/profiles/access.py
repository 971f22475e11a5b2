"""Who may use which profile: a user's groups against a profile's `groups`."""

from __future__ import annotations

from collections.abc import Iterable

from .loader import ProfileSet
from .model import Profile


def may_use(profile: Profile, groups: Iterable[str]) -> bool:
    """Whether these groups may start the profile (a disabled profile: nobody)."""
    return profile.enabled and (profile.for_everyone or bool(set(profile.groups) & set(groups)))


def allowed_profiles(pset: ProfileSet, groups: Iterable[str]) -> list[Profile]:
    groups = set(groups)
    return [p for p in pset.profiles if may_use(p, groups)]


def preselected(allowed: list[Profile]) -> Profile | None:
    """The profile the form preselects and an empty spawn request gets."""
    return next((p for p in allowed if p.default), allowed[0] if allowed else None)


def refusal(profile: Profile, groups: Iterable[str]) -> str:
    if not profile.enabled:
        return f"Profile {profile.slug!r} is disabled by the platform admins; choose another profile."
    mine = ", ".join(sorted(groups)) or "no groups"
    return (
        f"Profile {profile.slug!r} is reserved for the groups {', '.join(profile.groups)}; "
        f"you are in: {mine}."
    )
