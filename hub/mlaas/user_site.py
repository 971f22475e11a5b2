"""Personal packages on one machine: each user's own `~/.local` site-packages, in their kernels,
terminals and Dask workers, never in anyone else's.

The platform's environment is a shared virtual environment, read-only to users, and Python turns
the user site off in a virtual environment ("User site-packages are not visible in this
virtualenv"). So a one-line `.pth` in that environment (`mlaas-user-site.pth`, written by
`make install` and at each `mlaas up`) calls `activate()` at every interpreter start:

- for an account other than root, with a `~/.local/lib/pythonX.Y/site-packages` it owns, that
  directory goes before the shared site-packages, as Python's own user site would;
- not in the JupyterLab server process itself (`jupyterhub-singleuser`): a package a user
  installs can break a kernel of theirs, never their server, so they can always fix it;
- servers get `PIP_PREFIX=~/.local` (mlaas.spawners.local), so `pip install <pkg>` and `%pip
  install <pkg>` install there, and `~/.local/bin` is on their PATH.

Kernels of their own (`python -m ipykernel install --user`, or a kernel of a venv or conda
environment in their home) land in `~/.local/share/jupyter/kernels`, which JupyterLab reads.
In the user images (Kubernetes) Python is not a virtual environment: its own user site does the
same, with `PIP_USER=1` set by the image.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PTH_NAME = "mlaas-user-site.pth"
PTH_LINE = "import mlaas.user_site as _mlaas_user_site; _mlaas_user_site.activate()\n"
NOT_FOR = ("jupyterhub-singleuser",)  # programs that never see personal packages


def user_site_dir(home: str | Path) -> Path:
    return Path(home) / ".local" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def activate() -> None:
    """Put the account's own site-packages before the shared ones (see the module doc)."""
    try:
        if os.getuid() == 0 or sys.prefix == sys.base_prefix:  # root never; outside a venv Python does it
            return
        program = os.path.basename(sys.orig_argv[1]) if len(sys.orig_argv) > 1 else ""
        if program in NOT_FOR:
            return
        home = os.environ.get("HOME")
        if not home:
            return
        path = str(user_site_dir(home))
        if os.stat(path).st_uid != os.getuid() or path in sys.path:
            return
    except (OSError, AttributeError):
        return
    import site

    before = list(sys.path)
    site.addsitedir(path)  # its .pth files too
    added = [p for p in sys.path if p not in before]
    rest = [p for p in sys.path if p in before]
    first_site = next((i for i, p in enumerate(rest) if p.endswith("site-packages")), len(rest))
    sys.path[:] = rest[:first_site] + added + rest[first_site:]


def install_hook(site_packages: str | Path | None = None) -> Path | None:
    """Write the `.pth` into the platform's environment (if it is a virtual environment and the
    file is missing or stale); returns its path, or None where there is nothing to do."""
    if sys.prefix == sys.base_prefix:
        return None
    if site_packages is None:
        import sysconfig

        site_packages = sysconfig.get_paths()["purelib"]
    path = Path(site_packages) / PTH_NAME
    try:
        if not path.exists() or path.read_text() != PTH_LINE:
            path.write_text(PTH_LINE)
    except OSError:
        return None
    return path


if __name__ == "__main__":
    print(install_hook() or "not a virtual environment: nothing to install")
