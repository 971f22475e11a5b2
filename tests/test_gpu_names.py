"""`gpu.model` means one thing on one machine (NVML product names) and on Kubernetes (the labels
NVIDIA's GPU feature discovery writes): checked against label sets as GFD writes them.

GFD's `nvidia.com/gpu.product` is the NVML product name with spaces turned into dashes, and under
the MIG "single" strategy it gets a `-MIG-<profile>` suffix. The NVML names below are the ones
these GPUs report (the H200 one read on a real H200 machine; docs/operations.md)."""

from __future__ import annotations

import pytest

from kube_objects import node
from mlaas.capacity.kube import KubeCapacity, gpu_products, mig_single_products
from mlaas.profiles.mig import GPU_MODELS, device_matches
from mlaas.profiles.model import Profile

# NVML product name -> the GFD label a node with that GPU carries
GFD = {
    "NVIDIA A100-SXM4-40GB": "NVIDIA-A100-SXM4-40GB",
    "NVIDIA A100-SXM4-80GB": "NVIDIA-A100-SXM4-80GB",
    "NVIDIA A100-PCIE-40GB": "NVIDIA-A100-PCIE-40GB",
    "NVIDIA A100 80GB PCIe": "NVIDIA-A100-80GB-PCIe",
    "NVIDIA A30": "NVIDIA-A30",
    "NVIDIA H100 80GB HBM3": "NVIDIA-H100-80GB-HBM3",
    "NVIDIA H100 PCIe": "NVIDIA-H100-PCIe",
    "NVIDIA H100 NVL": "NVIDIA-H100-NVL",
    "NVIDIA H200": "NVIDIA-H200",
}
SPELLINGS = ["A100", "a100", "H100", "H200", "A30", "A100-SXM4-80GB", "H100-SXM5-80GB", "NVIDIA H100 80GB HBM3",
             "NVIDIA-H100-80GB-HBM3", "H100 PCIe", "nvidia a100 80gb pcie", None]


def test_the_catalogue_knows_every_listed_gpu_by_its_nvml_name_and_gfd_label():
    assert {m.nvml for m in GPU_MODELS} == set(GFD)
    assert {m.nvml: m.gfd_product for m in GPU_MODELS} == GFD


@pytest.mark.parametrize("family, labels", [
    ("H100", {"NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"}),
    ("A100", {"NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-A100-80GB-PCIe"}),
    ("H200", {"NVIDIA-H200"}),
    ("A100-SXM4-80GB", {"NVIDIA-A100-SXM4-80GB"}),
    ("NVIDIA H100 80GB HBM3", {"NVIDIA-H100-80GB-HBM3"}),
    ("NVIDIA L40S", {"NVIDIA-L40S"}),  # a GPU the catalogue does not know, by its full product name
])
def test_a_profiles_model_selects_the_labels_gfd_writes(family, labels):
    assert set(gpu_products(family)) == labels


@pytest.mark.parametrize("wanted", SPELLINGS)
def test_one_machine_and_kubernetes_agree_for_every_gpu(wanted):
    for nvml_name, label in GFD.items():
        assert device_matches(wanted, nvml_name) == (label in gpu_products(wanted)), (wanted, nvml_name)


def test_mig_single_strategy_labels_carry_the_profile():
    assert "NVIDIA-A100-SXM4-40GB-MIG-3g.20gb" in mig_single_products("3g.20gb")
    assert "NVIDIA-H100-80GB-HBM3-MIG-3g.40gb" in mig_single_products("3g.40gb")
    assert "NVIDIA-H200-MIG-3g.71gb" in mig_single_products("3g.71gb")


def test_capacity_finds_h100_on_nodes_labelled_as_gfd_labels_them():
    """`gpu: {model: H100}` at a real site: nodes carry NVIDIA-H100-80GB-HBM3, not a catalogue key."""
    cache = KubeCapacity()
    taint = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    cache.replace("node", [
        node("h100", extended={"nvidia.com/gpu": "8"}, labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
             taints=taint),
        node("a100", extended={"nvidia.com/gpu": "4"}, labels={"nvidia.com/gpu.product": "NVIDIA-A100-80GB-PCIe"},
             taints=taint),
    ])
    cache.replace("pod", [])

    def gpu(model: str) -> Profile:
        return Profile.model_validate({"slug": "g", "display_name": "G", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
                                       "gpu": {"count": 1, "model": model}, "groups": ["*"]})

    assert cache.availability(gpu("H100")).free == 8
    assert cache.availability(gpu("A100")).free == 4
    assert cache.availability(gpu("A100-SXM4-40GB")).free == 0


def test_an_unknown_short_model_name_is_refused_with_the_families():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"'H10' is not a GPU model this platform knows: use a family \(A100, A30, H100, H200\)"):
        Profile.model_validate({"slug": "g", "display_name": "G", "cpu": {"limit": 1}, "memory": {"limit": "1Gi"},
                                "gpu": {"count": 1, "model": "H10"}, "groups": ["*"]})
