"""Several clusters (sites) behind one hub, seen as one capacity source.

Each site has its own watch cache (`KubeCapacity`). A profile may name the sites it runs at
(`sites:`); the form adds up what those sites have free, says which of them cannot be reached,
and a spawn goes to the allowed site with the most room for it (ties: the order of the sites
in the hub's settings). A hub with one cluster has one unnamed site and behaves as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..profiles.model import Profile
from .base import Availability
from .kube import KubeCapacity


@dataclass(frozen=True)
class SiteAvailability:
    site: str
    availability: Availability
    unreachable: str | None  # why the site's API server cannot be reached, if so


class Federation:
    def __init__(self, sites: dict[str, KubeCapacity]):
        if not sites:
            raise ValueError("a federation needs at least one site")
        self.sites = sites  # in the order of the settings: it breaks ties

    @property
    def federated(self) -> bool:
        return len(self.sites) > 1 or "" not in self.sites

    def allowed(self, profile: Profile) -> list[str]:
        """The configured sites a profile may run at (all of them on a single unnamed cluster)."""
        if not self.federated or profile.sites is None:
            return list(self.sites)
        return [name for name in self.sites if name in profile.sites]

    def unreachable(self) -> dict[str, str]:
        """Sites whose API server cannot be reached now, with the error."""
        return {name: cache.unreachable for name, cache in self.sites.items() if cache.unreachable}

    def forbidden(self) -> dict[str, str]:
        """Sites whose API server answers but refuses the hub (RBAC), with the refusal. Also seen for
        a few seconds after an API server restarts, until its RBAC caches are filled."""
        return {name: cache.forbidden for name, cache in self.sites.items() if cache.forbidden}

    def breakdown(self, profile: Profile, exact: bool = False) -> list[SiteAvailability]:
        return [SiteAvailability(name, self.sites[name].availability(profile, exact), self.sites[name].unreachable)
                for name in self.allowed(profile)]

    def availability(self, profile: Profile, exact: bool = False) -> Availability:
        """Summed over the allowed sites, with the per-site detail in `where` (one pass over the sites).
        `exact`: computed now rather than the sites' views (KubeCapacity.availability)."""
        if not self.federated:
            return next(iter(self.sites.values())).availability(profile, exact)
        per_site = self.breakdown(profile, exact)
        if not per_site:
            wanted = ", ".join(profile.sites or [])
            return Availability(0, 0, f"it runs only at {wanted}, which this hub does not serve")
        free = sum(s.availability.free for s in per_site)
        total = sum(s.availability.total for s in per_site)
        reason = None
        if free == 0:
            reason = "; ".join(f"site {s.site} is unreachable" if s.unreachable else f"at {s.site}: {s.availability.reason}"
                               for s in per_site)
        return Availability(free, total, reason, _where(per_site))

    def where(self, profile: Profile) -> str | None:
        """Per-site detail for the form: 'at site-a 1 free, site-b 2 free; site-c cannot be reached'."""
        return self.availability(profile).where

    def place(self, profile: Profile) -> str | None:
        """The allowed, reachable site with the most room for one more server of the profile."""
        best, best_free = None, 0
        for s in self.breakdown(profile, exact=True):
            if not s.unreachable and s.availability.free > best_free:
                best, best_free = s.site, s.availability.free
        return best


def _where(per_site: list[SiteAvailability]) -> str | None:
    up = [f"{s.site} {s.availability.free} free" for s in per_site if not s.unreachable]
    down = [s.site for s in per_site if s.unreachable]
    text = "at " + ", ".join(up) if up else ""
    if down:
        text += ("; " if text else "") + ", ".join(down) + " cannot be reached"
    return text or None
