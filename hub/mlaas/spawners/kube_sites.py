"""The sites of a federation: how the hub reaches each, and API clients, one per site and event loop.

KubeSpawner keeps one client built from the process-wide configuration ($KUBECONFIG or the
in-cluster account). A federated hub talks to several API servers, so each site gets a client
of its own, built from the site's kubeconfig. The unnamed site "" is KubeSpawner's own client.

A site other than the hub's own cluster is usually another network: its pods' addresses are not
routed to the hub, and the hub's in-cluster name means nothing there. `SiteConnection` says what
such a site exposes: `servers_url`, the address of its ingress controller, through which the hub
and its proxy reach each server (an Ingress per server, at the server's path), and `hub_url`,
where its pods reach the hub (default: the hub's public URL).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

IN_CLUSTER = "in-cluster"  # a site's "kubeconfig" when it is the cluster the hub runs in
_clients: dict[tuple[int, str], Any] = {}


class SiteConnection(BaseModel):
    """How the hub reaches one site (fields in snake_case in the platform file, camelCase in chart values)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel, frozen=True)

    kubeconfig: str = Field(description="Credentials for the site's API server (a file), or `in-cluster` for the "
                                        "cluster the hub runs in.")
    servers_url: AnyHttpUrl | None = Field(
        None, description="The site's ingress controller, as the hub and its proxy reach it (e.g. "
        "`https://jupyter.site-b.example.org`): each server gets a Service and an Ingress at its path there. "
        "Unset: servers are reached at their pod IPs (a routed pod network between the sites).")
    ingress_class_name: str | None = Field(None, description="The IngressClass of the site's ingress controller "
                                                             "(unset: the site's default class).")
    hub_url: AnyHttpUrl | None = Field(
        None, description="Where the site's pods reach the hub's API (default: the hub's public URL, "
        "`hub.config.JupyterHub.public_url`).")

    @property
    def remote(self) -> bool:
        return self.kubeconfig != IN_CLUSTER

    @property
    def servers_origin(self) -> str | None:
        return str(self.servers_url).rstrip("/") if self.servers_url else None


def site_connections(raw: dict[str, Any]) -> dict[str, SiteConnection]:
    """Site name -> its connection, from the hub's settings or a site's values: a kubeconfig path
    (or `in-cluster`) alone, or the fields of `SiteConnection`. A wrong field is named with its site."""
    out: dict[str, SiteConnection] = {}
    for name, value in raw.items():
        if isinstance(value, SiteConnection):
            out[name] = value
            continue
        try:
            out[name] = SiteConnection.model_validate({"kubeconfig": str(value)} if not isinstance(value, dict) else value)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"site {name}: {problems}") from None
    return out


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
