"""The MIG profiles NVIDIA GPUs offer, by GPU model.

The catalogue validates the `mig:` field of profiles and, later, MIG layouts. Counts are the
most instances of one profile a single GPU can hold (NVIDIA's MIG user guide).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    name: str  # as NVML and the GPU operator's product label spell it, without the vendor
    memory_gb: int
    mig_profiles: dict[str, int]  # profile name -> max instances on one GPU


_A100_40 = {"1g.5gb": 7, "1g.5gb+me": 1, "1g.10gb": 4, "2g.10gb": 3, "3g.20gb": 2, "4g.20gb": 1, "7g.40gb": 1}
_X100_80 = {"1g.10gb": 7, "1g.10gb+me": 1, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2, "4g.40gb": 1, "7g.80gb": 1}

GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel("A100-SXM4-40GB", 40, _A100_40),
    GpuModel("A100-PCIE-40GB", 40, _A100_40),
    GpuModel("A100-SXM4-80GB", 80, _X100_80),
    GpuModel("A100-PCIE-80GB", 80, _X100_80),
    GpuModel("A30", 24, {"1g.6gb": 4, "1g.6gb+me": 1, "2g.12gb": 2, "2g.12gb+me": 1, "4g.24gb": 1}),
    GpuModel("H100-SXM5-80GB", 80, _X100_80),
    GpuModel("H100-PCIe-80GB", 80, _X100_80),
    GpuModel(
        "H100-NVL-94GB",
        94,
        {"1g.12gb": 7, "1g.12gb+me": 1, "1g.24gb": 4, "2g.24gb": 3, "3g.47gb": 2, "4g.47gb": 1, "7g.94gb": 1},
    ),
    GpuModel(
        "H200-141GB",
        141,
        {"1g.18gb": 7, "1g.18gb+me": 1, "1g.35gb": 4, "2g.35gb": 3, "3g.71gb": 2, "4g.71gb": 1, "7g.141gb": 1},
    ),
)

ALL_MIG_PROFILES: frozenset[str] = frozenset(p for m in GPU_MODELS for p in m.mig_profiles)


def models_offering(profile: str) -> list[str]:
    """GPU models on which a MIG profile exists."""
    return [m.name for m in GPU_MODELS if profile in m.mig_profiles]


def mig_profile_from_device_name(name: str) -> str | None:
    """NVML names MIG devices like 'NVIDIA A100-SXM4-40GB MIG 3g.20gb'; return '3g.20gb'."""
    marker = " MIG "
    if marker not in name:
        return None
    candidate = name.rsplit(marker, 1)[1].strip()
    return candidate or None
