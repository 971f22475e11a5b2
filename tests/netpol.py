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
