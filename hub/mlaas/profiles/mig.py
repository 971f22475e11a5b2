"""The GPU catalogue: NVIDIA GPU models, their names as each system spells them, their MIG profiles.

One model, several names: the catalogue key of site files (`gpu_model: A100-SXM4-40GB`), the
name NVML reports on a node (`NVIDIA H100 80GB HBM3`), the node label NVIDIA's GPU feature
discovery writes from it (spaces to dashes: `nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3`, and
`…-MIG-3g.40gb` under the MIG "single" strategy), and the family users know (`H100`). A profile's
`gpu.model` means the same on one machine (NVML names) and on Kubernetes (GFD labels): see
`models_matching`. Counts are the most instances of one MIG profile a single GPU can hold
(NVIDIA's MIG user guide).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    name: str  # the catalogue key (site files, MIG layouts)
    memory_gb: int
    mig_profiles: dict[str, int]  # profile name -> max instances on one GPU
    nvml: str = ""  # the product name NVML reports
    family: str = ""  # what users call it: A100, H100
    display: str = ""  # how the form names it
    aliases: tuple[str, ...] = ()

    @property
    def gfd_product(self) -> str:
        """GPU feature discovery's `nvidia.com/gpu.product` value: the NVML name, spaces as dashes."""
        return self.nvml.replace(" ", "-")

    def names(self) -> set[str]:
        """Every spelling a profile's `gpu.model` may use for exactly this model (lower-case)."""
        short = self.nvml.removeprefix("NVIDIA ")
        return {n.lower() for n in (self.name, self.nvml, short, self.gfd_product, *self.aliases) if n}


_A100_40 = {"1g.5gb": 7, "1g.5gb+me": 1, "1g.10gb": 4, "2g.10gb": 3, "3g.20gb": 2, "4g.20gb": 1, "7g.40gb": 1}
_X100_80 = {"1g.10gb": 7, "1g.10gb+me": 1, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2, "4g.40gb": 1, "7g.80gb": 1}

GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel("A100-SXM4-40GB", 40, _A100_40, "NVIDIA A100-SXM4-40GB", "A100", "NVIDIA A100 40GB (SXM4)"),
    GpuModel("A100-PCIE-40GB", 40, _A100_40, "NVIDIA A100-PCIE-40GB", "A100", "NVIDIA A100 40GB (PCIe)"),
    GpuModel("A100-SXM4-80GB", 80, _X100_80, "NVIDIA A100-SXM4-80GB", "A100", "NVIDIA A100 80GB (SXM4)"),
    GpuModel("A100-PCIE-80GB", 80, _X100_80, "NVIDIA A100 80GB PCIe", "A100", "NVIDIA A100 80GB (PCIe)"),
    GpuModel("A30", 24, {"1g.6gb": 4, "1g.6gb+me": 1, "2g.12gb": 2, "2g.12gb+me": 1, "4g.24gb": 1},
             "NVIDIA A30", "A30", "NVIDIA A30 24GB"),
    GpuModel("H100-SXM5-80GB", 80, _X100_80, "NVIDIA H100 80GB HBM3", "H100", "NVIDIA H100 80GB (SXM5)"),
    GpuModel("H100-PCIe-80GB", 80, _X100_80, "NVIDIA H100 PCIe", "H100", "NVIDIA H100 80GB (PCIe)"),
    GpuModel(
        "H100-NVL-94GB",
        94,
        {"1g.12gb": 7, "1g.12gb+me": 1, "1g.24gb": 4, "2g.24gb": 3, "3g.47gb": 2, "4g.47gb": 1, "7g.94gb": 1},
        "NVIDIA H100 NVL", "H100", "NVIDIA H100 NVL 94GB",
    ),
    GpuModel(
        "H200-141GB",
        141,
        {"1g.18gb": 7, "1g.18gb+me": 1, "1g.35gb": 4, "2g.35gb": 3, "3g.71gb": 2, "4g.71gb": 1, "7g.141gb": 1},
        "NVIDIA H200", "H200", "NVIDIA H200 141GB",
    ),
)
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(m.family for m in GPU_MODELS))


def models_matching(wanted: str | None) -> list[GpuModel]:
    """The catalogue models a profile's `gpu.model` means: a family (`H100`: every H100), or one
    model by any of its names (catalogue key, NVML name with or without `NVIDIA `, GFD label);
    case does not matter. None: every model."""
    if not wanted:
        return list(GPU_MODELS)
    w = wanted.strip().lower()
    return [m for m in GPU_MODELS if w == m.family.lower() or w in m.names()]


def is_product_name(wanted: str) -> bool:
    """A full product name as NVML or GFD spells it ('NVIDIA L40S', 'NVIDIA-L40S'): usable for GPUs
    the catalogue does not know, matched exactly."""
    return wanted.strip().lower().startswith(("nvidia ", "nvidia-")) and len(wanted.strip()) > len("nvidia-")


def product_labels(wanted: str | None) -> list[str]:
    """The GFD `nvidia.com/gpu.product` values a profile's `gpu.model` means (all models if None)."""
    models = models_matching(wanted)
    if models or not wanted:
        return [m.gfd_product for m in models]
    return [wanted.strip().replace(" ", "-")] if is_product_name(wanted) else []


def model_of_device(nvml_name: str) -> GpuModel | None:
    """The catalogue model of a GPU (or MIG device: 'NVIDIA A100-SXM4-40GB MIG 3g.20gb') by its NVML name."""
    base = nvml_name.split(" MIG ", 1)[0].strip().lower()
    return next((m for m in GPU_MODELS if base in (m.nvml.lower(), m.gfd_product.lower())), None)


def device_matches(wanted: str | None, nvml_name: str) -> bool:
    """Whether a device NVML names `nvml_name` is what a profile's `gpu.model` asks for."""
    if not wanted:
        return True
    model = model_of_device(nvml_name)
    if model is not None:
        return model in models_matching(wanted)
    w = wanted.strip().lower()  # a GPU the catalogue does not know: its own names only
    return w in (nvml_name.lower(), nvml_name.lower().removeprefix("nvidia "), nvml_name.replace(" ", "-").lower())

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
