"""A small NetworkPolicy evaluator for tests: does a policy's egress allow a connection?

The test clusters have no CNI that enforces NetworkPolicies, so the rendered policies are judged
here, by the rules of the Kubernetes API (a peer matches by pod labels in the policy's namespace,
by namespace and pod labels, or by an IP block minus its exceptions; a rule's ports must match).
It covers the fields our policies use, not the whole API."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Destination:
    ip: str
    port: int
    protocol: str = "TCP"
    pod_labels: dict = field(default_factory=dict)  # empty: not a pod (an address outside the cluster)
    namespace: str = ""
    namespace_labels: dict = field(default_factory=dict)


def _labels_match(selector: dict | None, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in ((selector or {}).get("matchLabels") or {}).items())


def _peer_allows(peer: dict, dest: Destination, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(dest.ip)
        if ip not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if not dest.pod_labels:
        return False
    if "namespaceSelector" in peer:
        if not _labels_match(peer["namespaceSelector"], dest.namespace_labels):
            return False
    elif dest.namespace != policy_namespace:
        return False
    return _labels_match(peer.get("podSelector"), dest.pod_labels)


def egress_allows(policy: dict, dest: Destination, policy_namespace: str = "mlaas") -> bool:
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("port") == dest.port and p.get("protocol", "TCP") == dest.protocol for p in ports):
            continue
        peers = rule.get("to")
        if not peers or any(_peer_allows(peer, dest, policy_namespace) for peer in peers):
            return True
    return False


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels, namespace) or, with empty labels, an address outside the cluster."""

    ip: str
    pod_labels: dict = field(default_factory=dict)
    namespace: str = ""
    namespace_labels: dict = field(default_factory=dict)


def _selects(policy: dict, pod: Endpoint) -> bool:
    """The policy is about this pod: same namespace, its podSelector (matchLabels and In
    expressions) matches."""
    if not pod.pod_labels or policy["metadata"].get("namespace", pod.namespace) != pod.namespace:
        return False
    selector = policy["spec"].get("podSelector") or {}
    if not _labels_match(selector, pod.pod_labels):
        return False
    for e in selector.get("matchExpressions") or []:
        if e["operator"] != "In" or pod.pod_labels.get(e["key"]) not in e["values"]:
            return False
    return True


def _ports_match(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports)


def connection_allowed(policies: list[dict], source: Endpoint, dest: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Does a connection from `source` to `dest`:`port` pass every NetworkPolicy that applies, as
    an enforcing CNI decides it: the source's egress (if a policy with Egress selects it) and the
    destination's ingress (if a policy with Ingress selects it) must each allow it."""
    def isolated(pod: Endpoint, kind: str) -> list[dict]:
        return [p for p in policies if kind in p["spec"].get("policyTypes", ["Ingress"]) and _selects(p, pod)]

    egress = isolated(source, "Egress")
    if egress and not any(egress_allows(p, Destination(dest.ip, port, protocol, dest.pod_labels, dest.namespace,
                                                       dest.namespace_labels), p["metadata"]["namespace"])
                          for p in egress):
        return False
    ingress = isolated(dest, "Ingress")
    peer = Destination(source.ip, port, protocol, source.pod_labels, source.namespace, source.namespace_labels)
    return not ingress or any(
        _ports_match(rule, port, protocol) and (not rule.get("from") or any(
            _peer_allows(f, peer, p["metadata"]["namespace"]) for f in rule["from"]))
        for p in ingress for rule in p["spec"].get("ingress", []))
