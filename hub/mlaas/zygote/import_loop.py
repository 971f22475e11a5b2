"""The asyncio event loop an import made (dask_labextension builds its cluster manager at import,
which makes the main thread's loop and queues a callback on it). A bare server runs that very
loop; a forked server must too, but not with the zygote's epoll instance and wake-up sockets:
those are kernel objects every forked server would share. `renew()` gives the loop its own.

(asyncio keeps these in private attributes, the same from Python 3.8 to 3.13; the zygote checks
them at start and, where they are not as expected, does not import what makes a loop.)
"""

from __future__ import annotations

import asyncio
import selectors


def current() -> asyncio.AbstractEventLoop | None:
    """The main thread's event loop if an import made one (without making one)."""
    policy = asyncio.get_event_loop_policy()
    local = getattr(policy, "_local", None)
    return getattr(local, "_loop", None)


def descriptors(loop: asyncio.AbstractEventLoop) -> set[int]:
    """The loop's own descriptors: its epoll instance and its self-pipe."""
    selector = getattr(loop, "_selector", None)
    ssock, csock = getattr(loop, "_ssock", None), getattr(loop, "_csock", None)
    if not isinstance(selector, selectors.BaseSelector) or ssock is None or csock is None:
        raise RuntimeError("this Python's event loop keeps its selector and self-pipe elsewhere")
    return {selector.fileno(), ssock.fileno(), csock.fileno()}  # type: ignore[attr-defined]


def renew(loop: asyncio.AbstractEventLoop) -> set[int]:
    """In a forked child: a new epoll instance and a new self-pipe for `loop`, and the old
    descriptors closed without touching the shared epoll instance (no unregistering). Returns the
    new descriptors."""
    old_selector = loop._selector  # type: ignore[attr-defined]
    if old_selector.get_map() and set(old_selector.get_map()) != {loop._ssock.fileno()}:  # type: ignore[attr-defined]
        raise RuntimeError("the import-time event loop watches more than its self-pipe")
    loop._selector = type(old_selector)()  # type: ignore[attr-defined]
    loop._ssock.close()  # type: ignore[attr-defined]
    loop._csock.close()  # type: ignore[attr-defined]
    loop._internal_fds -= 1  # type: ignore[attr-defined]
    loop._make_self_pipe()  # type: ignore[attr-defined]
    old_selector._selector.close()  # the epoll descriptor itself; the shared instance is not modified
    return descriptors(loop)
