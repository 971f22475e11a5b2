"""The GPU fence of local servers: a server can open only the GPUs and MIG instances it was given.

`CUDA_VISIBLE_DEVICES` is a request to CUDA, not a boundary: a user can unset it. What the driver
checks is the device node. Each server therefore starts in a private mount namespace in which
every NVIDIA device node it was not given is replaced by /dev/null (a bind mount, made as root
before the server drops to its account, which cannot undo it):
- a whole GPU: its `/dev/nvidia<minor>`; a server without GPUs (a CPU profile) has none left;
- a MIG instance: its parent GPU's node, plus the two capability nodes of its GPU instance and
  compute instance (`/dev/nvidia-caps/nvidia-cap<N>`, the minors the driver lists under
  /proc/driver/nvidia/capabilities, NVIDIA's MIG user guide "Device Nodes and Capabilities");
  every other capability node is hidden, so the server cannot open another instance of the same
  GPU, nor the MIG config and monitor capabilities.
`/dev/nvidiactl` and `/dev/nvidia-uvm` stay: they give nothing without a GPU node.

Measured on an NVIDIA H200 (issue #15): with /dev/nvidia0 bound to /dev/null in a private mount
namespace, torch saw 0 devices and nvidia-smi none, also with CUDA_VISIBLE_DEVICES unset;
`chmod 0660` did not fence. Without root or mount namespaces there is no fence, and the hub's
startup line says so.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from .capacity.base import Device

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
GPU_NODE = re.compile(r"^nvidia(\d+)$")
CAP_NODE = re.compile(r"^nvidia-cap(\d+)$")
CAPS_PROC = Path("/proc/driver/nvidia/capabilities")


def mig_capability_minors(gpu_minor: int, gpu_instance: int, compute_instance: int,
                          proc_root: Path = CAPS_PROC) -> tuple[int, ...]:
    """The capability nodes a MIG instance needs: its GPU instance's and its compute instance's
    `access` files name them ("DeviceFileMinor: N")."""
    base = proc_root / f"gpu{gpu_minor}" / "mig" / f"gi{gpu_instance}"
    minors = []
    for access in (base / "access", base / f"ci{compute_instance}" / "access"):
        try:
            found = re.search(r"DeviceFileMinor:\s*(\d+)", access.read_text())
        except OSError:
            found = None
        if found:
            minors.append(int(found.group(1)))
    return tuple(minors)


def hidden_nodes(dev_root: Path, given: Iterable[Device]) -> list[str]:
    """The device nodes under `dev_root` a server given `given` must not open."""
    given = list(given)
    keep_gpus = {d.minor for d in given if d.minor is not None}
    keep_caps = {c for d in given for c in d.caps}
    hide = []
    for node in sorted(dev_root.glob("nvidia*")):
        m = GPU_NODE.match(node.name)
        if m and int(m.group(1)) not in keep_gpus:
            hide.append(str(node))
    for node in sorted((dev_root / "nvidia-caps").glob("nvidia-cap*")):
        m = CAP_NODE.match(node.name)
        if m and int(m.group(1)) not in keep_caps:
            hide.append(str(node))
    return hide


class GpuFence:
    """Decides (in the hub) and applies (between fork and exec of a server) the fence."""

    def __init__(self, dev_root: Path = Path("/dev")):
        self.dev_root = dev_root
        self.unavailable = self._why_not()

    def _why_not(self) -> str | None:
        if os.geteuid() != 0:
            return "the hub is not root, so it cannot give servers mount namespaces of their own"
        try:
            r = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"mount namespaces cannot be made here ({e})"
        if r.returncode != 0:
            return f"mount namespaces cannot be made here ({r.stderr.strip() or r.returncode})"
        return None

    def describe(self) -> str:
        if self.unavailable:
            return (f"no GPU fence: {self.unavailable}; servers are steered by CUDA_VISIBLE_DEVICES only "
                    f"and could open every GPU of the machine")
        return (f"GPU fence: each server's own mount namespace hides the NVIDIA device nodes under {self.dev_root} "
                f"it was not given")

    def plan(self, given: Sequence[Device]) -> list[bytes]:
        """What the server's child process hides (empty without a fence)."""
        if self.unavailable:
            return []
        return [os.fsencode(p) for p in hidden_nodes(self.dev_root, given)]

    def apply(self, hide: list[bytes]) -> None:
        """In the child, as root, before it drops to the user's account (see `hide_nodes`)."""
        if self.unavailable:
            return
        hide_nodes(hide)


def hide_nodes(hide: list[bytes]) -> None:
    """A private mount namespace for the calling process with /dev/null over each of `hide`.
    Raises (and so fails the server's start) if any step fails. Root only."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) for the GPU fence")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making the server's mounts private for the GPU fence")
    for path in hide:
        if libc.mount(b"/dev/null", path, None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), f"hiding {os.fsdecode(path)} for the GPU fence")
