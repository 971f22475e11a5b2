"""API clients of the sites of a federation, one per site and event loop.

KubeSpawner keeps one client built from the process-wide configuration ($KUBECONFIG or the
in-cluster account). A federated hub talks to several API servers, so each site gets a client
of its own, built from the site's kubeconfig. The unnamed site "" is KubeSpawner's own client.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

IN_CLUSTER = "in-cluster"  # a site's "kubeconfig" when it is the cluster the hub runs in
_clients: dict[tuple[int, str], Any] = {}


def _load_configuration(kubeconfig: str) -> Any:
    """A client configuration from a kubeconfig file (kubernetes_asyncio loads it with a coroutine;
    this runs it to completion in a thread so a property can call it)."""
    from kubernetes_asyncio import config
    from kubernetes_asyncio.client import Configuration

    configuration = Configuration()
    if kubeconfig == IN_CLUSTER:
        config.load_incluster_config(client_configuration=configuration)
        return configuration

    def load() -> None:
        asyncio.run(config.load_kube_config(config_file=kubeconfig, client_configuration=configuration,
                                            persist_config=False))

    with ThreadPoolExecutor(1) as pool:
        pool.submit(load).result()
    return configuration


def site_api_client(kubeconfig: str) -> Any:
    """The ApiClient for a site's kubeconfig in the running event loop (made on first use)."""
    from kubernetes_asyncio.client import ApiClient

    key = (id(asyncio.get_running_loop()), kubeconfig)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = ApiClient(configuration=_load_configuration(kubeconfig))
    return client


def site_core_api(kubeconfig: str) -> Any:
    from kubernetes_asyncio.client import CoreV1Api

    return CoreV1Api(site_api_client(kubeconfig))


def bound_reflector(base: type, kubeconfig: str) -> type:
    """A KubeSpawner reflector class that lists and watches through a site's client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self.api = site_core_api(kubeconfig)

    return type(base.__name__, (base,), {"__init__": __init__})
