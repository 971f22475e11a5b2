"""`mlaas backup` and `mlaas restore` of a platform state with 100 users: each with a hub user,
an account record and a home of a few files (the sizes of a small research group after a
semester's notebooks), the database as the hub keeps it. Prints seconds for each step, and the
archive's size."""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))

from mlaas.accounts import AccountRegistry  # noqa: E402
from mlaas.backup import backup, restore  # noqa: E402
from mlaas.settings import REPO_ROOT, Settings, prepare_state  # noqa: E402

USERS = 100
FILES = {"analysis.ipynb": 200_000, "notes.md": 4_000, "data/histograms.parquet": 2_000_000}


def make_state(root: Path) -> Settings:
    s = Settings(state_dir=root / "state", profiles_dir=root / "profiles")
    shutil.copytree(REPO_ROOT / "spawner_profiles", s.profiles_dir)
    prepare_state(s)
    db = sqlite3.connect(s.hub_dir / "jupyterhub.sqlite")  # a hub's users table, filled
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT UNIQUE, admin BOOLEAN, state TEXT)")
    db.executemany("INSERT INTO users (name, admin, state) VALUES (?, 0, ?)",
                   [(f"user{i:03d}", "{}" * 200) for i in range(USERS)])
    db.commit()
    db.close()
    registry = AccountRegistry(s.accounts_db)
    for i in range(USERS):
        account = registry.account_for(f"user{i:03d}")
        for name, size in FILES.items():
            path = s.homes_dir / account / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size // 4) * 4)
    for name in ("jupyterhub-cookie-secret", "oidc-client-secret"):
        (s.secrets_dir / name).write_text("x" * 64)
    return s


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mlaas-backup-bench-") as tmp:
        root = Path(tmp)
        source = make_state(root / "a")
        archive = root / "backup.tar.gz"
        size = sum(FILES.values()) * USERS
        print(f"Backup and restore of {USERS} users' state ({size / 1e6:.0f} MB of homes):")
        started = time.perf_counter()
        backup(source, archive, homes=False)
        print(f"  backup without homes : {time.perf_counter() - started:6.2f} s  ({archive.stat().st_size / 1e6:.2f} MB)")
        started = time.perf_counter()
        backup(source, archive, homes=True)
        took = time.perf_counter() - started
        print(f"  backup with homes    : {took:6.2f} s  ({archive.stat().st_size / 1e6:.1f} MB, {size / 1e6 / took:.0f} MB/s)")
        target = Settings(state_dir=root / "b" / "state", profiles_dir=root / "b" / "profiles")
        started = time.perf_counter()
        restore(target, archive, give_homes=False)  # making 100 system accounts is not a benchmark's business
        took = time.perf_counter() - started
        print(f"  restore with homes   : {took:6.2f} s  (without making the 100 system accounts)")
        assert len(list(target.homes_dir.iterdir())) == USERS
    return 0


if __name__ == "__main__":
    sys.exit(main())
