"""Kubernetes Node and Pod objects for tests, each validated against the real Kubernetes schema.

No API server runs here (the real-cluster tests come later); these objects are exactly what the
capacity cache would receive from one, and `kubernetes-validate` rejects any that could not.
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate

KUBERNETES_VERSION = "1.33.0"  # the pinned schema version for every check


def validated(obj: dict[str, Any]) -> dict[str, Any]:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    return obj


def node(
    name: str,
    cpu: str = "64",
    memory: str = "512Gi",
    extended: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    ready: bool = True,
    unschedulable: bool = False,
    validate: bool = True,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    allocatable = {"cpu": cpu, "memory": memory, "pods": "110", **(extended or {})}
    return (validated if validate else dict)(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": spec,
            "status": {
                "capacity": dict(allocatable),
                "allocatable": allocatable,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            },
        }
    )


def pod(
    name: str,
    node_name: str | None,
    requests: dict[str, str],
    phase: str = "Running",
    namespace: str = "jupyter",
    validate: bool = True,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {"name": "notebook", "image": "jupyter/base:1", "resources": {"requests": requests, "limits": requests}}
        ]
    }
    if node_name:
        spec["nodeName"] = node_name
    return (validated if validate else dict)(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
            "status": {"phase": phase},
        }
    )
