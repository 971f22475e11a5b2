"""What happens to a user's things on one machine when an admin deletes the user (the admin
page's "Delete User", or `DELETE /hub/api/users/<name>`): JupyterHub stops their servers (and so
their Dask clusters), then calls each spawner's `delete_forever`; for the user's default server
the local spawner removes here:

- the system account (`userdel`; its user-private group goes with it, and so its membership of
  project groups);
- its home, moved whole to `state/removed/<account>-<UTC time>` (root only, 0700: a later
  account given the same numeric ID cannot reach it), so nothing is lost by a mistaken click; an
  admin deletes it when it is no longer needed (docs/operations.md "Removing a user");
- the account on record, so a new user of the same name starts with a new, empty home. The AAI
  identity stays bound to the name, so no other person can sign in as it.

Project storage belongs to the group and stays. On Kubernetes, KubeSpawner's own
`delete_forever` removes the user's home volume claim (its `delete_pvc`)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .accounts import AccountRegistry, admin_tool, system_account_of

log = logging.getLogger("JupyterHub.mlaas.removal")


@dataclass(frozen=True)
class Removed:
    account: str | None
    home_kept_at: Path | None


def removed_dir(homes_dir: Path) -> Path:
    """`state/removed`, beside `state/homes`: root only."""
    path = homes_dir.parent / "removed"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def remove_user_account(registry: AccountRegistry, username: str, homes_dir: Path) -> Removed:
    """Remove the hub user's system account and move their home aside (see the module doc).
    An account this platform did not make for this user is never touched."""
    account = registry.recorded_account(username)
    if account is None:
        return Removed(None, None)
    home = homes_dir / account
    kept = None
    if home.is_dir() and not home.is_symlink():
        kept = removed_dir(homes_dir) / f"{account}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        shutil.move(str(home), str(kept))
    if system_account_of(account, username):
        r = subprocess.run([admin_tool("userdel"), account], capture_output=True, text=True)
        if r.returncode != 0:  # e.g. processes still running under it: the record stays for a retry
            log.warning("Could not delete the account %s of removed user %s: %s", account, username, r.stderr.strip())
            return Removed(account, kept)
    registry.forget_account(username)
    log.info("Removed user %s: account %s deleted%s", username, account,
             f", home kept at {kept} (root only)" if kept else "")
    return Removed(account, kept)
