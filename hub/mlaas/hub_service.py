"""Run a Python module as a hub-managed service process that ends with the hub:

    python -m mlaas.hub_service MODULE [ARGS...]

- SIGINT and SIGTERM end it at once, also when the hub was started with SIGINT ignored (as a
  background job of a non-interactive shell is; a child inherits that) or the module's event loop
  swallows KeyboardInterrupt (jupyterhub-idle-culler's does): JupyterHub stops services with
  SIGINT first, so such a service held the hub's shutdown for its whole timeout. Only for
  services with nothing to save (the cullers);
- it gets SIGTERM when the hub process dies (Linux PR_SET_PDEATHSIG), so a hub that is killed
  leaves no service behind.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m mlaas.hub_service MODULE [ARGS...]")
    def end(signum: int, frame: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGINT, end)
    signal.signal(signal.SIGTERM, end)
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the hub stops its services itself
        pass
    if os.getppid() != parent:  # the hub died before the request took effect
        sys.exit(0)
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
