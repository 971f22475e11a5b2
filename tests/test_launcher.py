"""The launcher after a hub crash: nothing of the platform keeps running (the proxy and the
hub's managed services, such as the Dask Gateway and the admin service, live in processes of
their own that outlive a hub killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from helpers import start_platform
from mlaas.launcher import _processes_of

pytestmark = pytest.mark.platform


def test_stopping_after_a_hub_crash_leaves_no_process_behind():
    hub = start_platform("crash", data={"enabled": False})
    platform = hub.platform
    left = _processes_of(platform.config_file)
    assert len(left) >= 3  # the hub, its proxy, the gateway and the admin service (and the dev IdP)
    os.kill(platform.hub.pid, signal.SIGKILL)
    platform.hub.wait(10)
    time.sleep(1)
    orphans = _processes_of(platform.config_file)
    assert orphans, "nothing outlived the hub: this test no longer shows the case it is about"
    platform.stop()
    assert _processes_of(platform.config_file) == []
