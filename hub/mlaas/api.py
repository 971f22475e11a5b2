"""`GET /hub/api/mlaas/profiles`: the profiles the calling user may start, with availability.

The same data the spawn form shows, for scripts and clients (token or browser session).
"""

from __future__ import annotations

import json

from jupyterhub.apihandlers.base import APIHandler
from tornado import web


class ProfilesAPIHandler(APIHandler):
    async def get(self) -> None:
        user = self.current_user
        if user is None or getattr(user, "kind", "user") != "user":
            raise web.HTTPError(403, "Only users have profiles; sign in or use a user's token.")
        spawner = user.get_spawner("", replace_failed=True)
        entries = spawner.form_entries()
        self.set_header("Content-Type", "application/json")
        self.write(
            json.dumps(
                {
                    "user": user.name,
                    "groups": spawner.user_groups(),
                    "profiles": [
                        {
                            "slug": e.profile.slug,
                            "display_name": e.profile.display_name,
                            "summary": e.profile.summary(),
                            "default": e.profile.default,
                            "available": e.unavailable is None,
                            "unavailable_reason": e.unavailable,
                            "capacity": e.capacity,
                        }
                        for e in entries
                    ],
                }
            )
        )
