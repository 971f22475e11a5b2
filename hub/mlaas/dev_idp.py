"""The development identity provider's per-installation secrets and its safety checks.

The demo accounts (hub/dev_idp/users.yaml) have no passwords in the repository: every
installation generates its own into `<state>/secrets/dev-idp-passwords.yaml` (mode 0600, in a
0700 directory), and `make up` prints them. The provider refuses to serve a hub whose public
URL is not a loopback address unless an operator forces it (`dev_idp.allow_public: true`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import yaml

from .netaddr import is_loopback_url

__all__ = ["demo_users", "ensure_passwords", "is_loopback_url", "public_refusal", "public_warning"]


def demo_users(users_file: Path) -> list[dict]:
    return list((yaml.safe_load(users_file.read_text()) or {}).get("users") or [])


def ensure_passwords(users_file: Path, passwords_file: Path) -> dict[str, str]:
    """The installation's demo passwords, one per demo user, created on first use (0600)."""
    passwords: dict[str, str] = {}
    if passwords_file.exists():
        passwords = dict((yaml.safe_load(passwords_file.read_text()) or {}).get("passwords") or {})
    missing = [u["username"] for u in demo_users(users_file) if u.get("username") not in passwords]
    if missing or not passwords_file.exists():
        for name in missing:
            passwords[name] = secrets.token_urlsafe(12)
        passwords_file.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(passwords_file.parent, 0o700)
        tmp = passwords_file.with_name(passwords_file.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# Demo passwords of this installation's development identity provider.\n")
            yaml.safe_dump({"passwords": passwords}, f)
        os.replace(tmp, passwords_file)
    return passwords


def public_refusal(public_url: str) -> str:
    return (
        f"The development identity provider will not serve a hub at {public_url}, an address other "
        "machines can reach: anyone there could sign in with its demo accounts. Configure your "
        "institute's AAI under `oidc:` and set `dev_idp.enabled: false`, or, for a demonstration "
        "only, set `dev_idp.allow_public: true`."
    )


def public_warning(public_url: str) -> str:
    return (
        f"WARNING: this development identity provider serves a hub at {public_url}, reachable from other "
        "machines. Its demo accounts are not protected like real ones: do not use it for real work."
    )
