"""GPU use of users' pods on Kubernetes: NVIDIA's DCGM exporter (installed by the GPU operator)
labels each GPU's series with the pod using it; the site's Prometheus scrapes it, and the hub
asks Prometheus (its HTTP query API) which server's pod uses its GPU how much.

- whole GPUs: `DCGM_FI_DEV_GPU_UTIL` (percent);
- MIG instances (series with a `GPU_I_ID` label): `DCGM_FI_PROF_GR_ENGINE_ACTIVE` (a ratio; the
  exporter's default counters include it), as DCGM has no per-instance GPU_UTIL;
- memory: `DCGM_FI_DEV_FB_USED` (MiB).
The pod labels are `namespace`/`pod`, or `exported_namespace`/`exported_pod` where Prometheus
renamed them (a scrape job without honor_labels)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

QUERIES = {
    "util": "DCGM_FI_DEV_GPU_UTIL",
    "engine": "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "memory": "DCGM_FI_DEV_FB_USED",
}


def _pod_of(labels: dict[str, str]) -> str | None:
    namespace = labels.get("namespace") or labels.get("exported_namespace")
    pod = labels.get("pod") or labels.get("exported_pod")
    return f"{namespace}/{pod}" if namespace and pod else None


class DcgmUsage:
    def __init__(self, prometheus_url: str, timeout: float = 5.0):
        self.url, self.timeout = prometheus_url.rstrip("/"), timeout

    def _query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=self.timeout) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {expr}: {body.get('error')}")
        return body["data"]["result"]

    def by_pod(self) -> dict[str, list[dict]]:
        """"namespace/pod" -> its devices: {uuid, mig_profile, utilization (%), memory_used (bytes)}.
        Blocking: call it off the event loop."""
        devices: dict[tuple[str, str, str], dict] = {}
        for kind, metric in QUERIES.items():
            for series in self._query(metric):
                labels, value = series["metric"], float(series["value"][1])
                pod = _pod_of(labels)
                if pod is None:
                    continue
                instance = labels.get("GPU_I_ID", "")
                key = (pod, labels.get("UUID", labels.get("gpu", "")), instance)
                d = devices.setdefault(key, {"uuid": key[1], "model": labels.get("modelName", ""),
                                             "mig_profile": labels.get("GPU_I_PROFILE") or None,
                                             "utilization": None, "memory_used": 0})
                if kind == "util" and not instance:
                    d["utilization"] = round(value)
                elif kind == "engine" and instance:
                    d["utilization"] = round(100 * value)
                elif kind == "memory":
                    d["memory_used"] = int(value * 2**20)
        out: dict[str, list[dict]] = {}
        for (pod, _, _), d in sorted(devices.items()):
            out.setdefault(pod, []).append(d)
        return out
