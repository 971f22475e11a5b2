"""The hub's periodic activity update from the proxy's routes, in batches.

JupyterHub (5 and 6) updates each user's and server's `last_activity` from the proxy's routes every
`last_activity_interval`: one user lookup per route, each after an autoflush of the previous
user's changes, all in one step of the event loop. At 200 running servers on the benchmark's hub
that held the loop for 0.25–0.95 s per update (mlaas.loop_watch), so every request in that moment
waited; at 1,000 servers it would be seconds.

`update_last_activity` does the same (the same timestamps, the same rule: never move one back,
then the same route check) with one query per 200 users that loads their servers with them,
no autoflush in between, one commit, and a turn of the event loop between batches. It replaces
JupyterHub's method when the hub loads its configuration (`install`), for the versions it was
checked against.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("JupyterHub.mlaas.activity")

BATCH = 200
CHECKED_MAJOR_VERSIONS = (5, 6)  # JupyterHub versions whose update_last_activity this one matches


def route_activity(routes: dict[str, dict[str, Any]]) -> dict[str, dict[str, datetime]]:
    """user name -> server name -> the last activity the proxy saw (naive UTC, as the hub stores)."""
    from dateutil.parser import parse as parse_date

    seen: dict[str, dict[str, datetime]] = {}
    for route in routes.values():
        data = route.get("data") or {}
        if "user" not in data or "server_name" not in data or "last_activity" not in data:
            continue
        when = parse_date(data["last_activity"])
        if when.tzinfo:
            when = when.astimezone(timezone.utc).replace(tzinfo=None)
        servers = seen.setdefault(data["user"], {})
        servers[data["server_name"]] = max(when, servers.get(data["server_name"], when))
    return seen


async def apply_activity(db: Any, seen: dict[str, dict[str, datetime]]) -> int:
    """Move users' and servers' last_activity forward to what the routes saw; returns how many
    users were found. Commits once."""
    from jupyterhub import orm
    from sqlalchemy.orm import selectinload

    found: set[str] = set()
    names = sorted(seen)
    for start in range(0, len(names), BATCH):
        batch = names[start:start + BATCH]
        with db.no_autoflush:
            users = (db.query(orm.User).filter(orm.User.name.in_(batch))
                     .options(selectinload(orm.User._orm_spawners).selectinload(orm.Spawner.oauth_client)).all())
            for user in users:
                found.add(user.name)
                spawners = user.orm_spawners
                for server_name, when in seen[user.name].items():
                    spawner = spawners.get(server_name)
                    if spawner is None:
                        log.warning("Found no server %r of user %s for a route", server_name, user.name)
                        continue
                    if user.last_activity is None or when > user.last_activity:
                        user.last_activity = when
                    if spawner.last_activity is None or when > spawner.last_activity:
                        spawner.last_activity = when
        if start + BATCH < len(names):
            await asyncio.sleep(0)  # let requests in between batches
    for missing in sorted(set(names) - found):
        log.warning("Found no user %s for a route", missing)
    db.commit()
    return len(found)


async def update_last_activity(self: Any) -> None:
    """JupyterHub.update_last_activity, batched (see the module's doc)."""
    from sqlalchemy.exc import SQLAlchemyError

    routes = await self.proxy.get_all_routes()
    try:
        await apply_activity(self.db, route_activity(routes))
    except SQLAlchemyError:
        log.exception("Rolling back session due to database error")
        self.db.rollback()
        return
    await self.proxy.check_routes(self.users, self._service_map, routes)


def install() -> bool:
    """Use the batched update in this hub process (JupyterHub binds its periodic callback at start,
    after the configuration is loaded). False, and JupyterHub's own stays, on other versions."""
    import jupyterhub
    from jupyterhub.app import JupyterHub

    if jupyterhub.version_info[0] not in CHECKED_MAJOR_VERSIONS:
        log.warning("JupyterHub %s: keeping its own activity update (checked: %s)", jupyterhub.__version__,
                    CHECKED_MAJOR_VERSIONS)
        return False
    JupyterHub.update_last_activity = update_last_activity  # type: ignore[method-assign]
    return True
