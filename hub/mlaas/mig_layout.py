"""MIG layouts for a site: from its GPU inventory and the profiles' MIG needs to the mig-parted
configuration that the NVIDIA GPU operator's mig-manager applies (`mlaas mig-layout`).

A site describes its GPU node pools and how each pool's GPUs are split:

    site: site-a
    node_pools:
      - name: a100-mig
        gpu_model: A100-SXM4-40GB
        nodes: 4
        gpus_per_node: 8
        mig:                               # GPUs not listed stay whole
          - gpus: [0, 1, 2, 3]
            layout: {1g.5gb: 7}
          - gpus: [4, 5, 6, 7]
            layout: {3g.20gb: 1, 4g.20gb: 1}

A layout is refused when the GPU model cannot hold it: a MIG profile the model does not offer,
more instances of a profile than the model allows, or more compute or memory slices than the
GPU has (7 compute and 8 memory slices on A100/H100/H200; 4 and 4 on A30).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .profiles.mig import GPU_MODELS, GpuModel
from .profiles.model import Profile, SLUG_RE

CONFIG_PREFIX = "mlaas-"
NODE_LABEL = "nvidia.com/mig.config"  # the GPU operator applies the config a node is labelled with


def model_named(name: str) -> GpuModel | None:
    return next((m for m in GPU_MODELS if m.name.lower() == name.lower()), None)


def slices(model: GpuModel, profile: str) -> tuple[int, int]:
    """(compute, memory) slices a MIG profile takes on this GPU model."""
    m = re.match(r"^(\d+)g\.(\d+)gb", profile)
    if not m:
        raise ValueError(f"{profile!r} is not a MIG profile name")
    compute, memory_gb = int(m.group(1)), int(m.group(2))
    total_memory_slices = memory_slices(model)
    return compute, max(1, round(memory_gb / (model.memory_gb / total_memory_slices)))


def compute_slices(model: GpuModel) -> int:
    return 4 if model.name.startswith("A30") else 7


def memory_slices(model: GpuModel) -> int:
    return 4 if model.name.startswith("A30") else 8


class MigGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: list[int] = Field(min_length=1)
    layout: dict[str, int] = Field(min_length=1)

    @field_validator("gpus")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(g < 0 for g in value):
            raise ValueError("GPU indexes must be distinct and not negative")
        return value


class NodePool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    gpu_model: str
    nodes: int = Field(1, ge=1, le=10_000)
    gpus_per_node: int = Field(ge=1, le=16)
    mig: list[MigGroup] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SLUG_RE.match(value):
            raise ValueError(f"{value!r} is not a node pool name (lower-case letters, digits, '-')")
        return value

    @field_validator("gpu_model")
    @classmethod
    def _model(cls, value: str) -> str:
        if model_named(value) is None:
            raise ValueError(f"{value!r} is not a known GPU model ({', '.join(m.name for m in GPU_MODELS)})")
        return value

    @model_validator(mode="after")
    def _layouts_fit(self) -> NodePool:
        model = model_named(self.gpu_model)
        assert model is not None
        seen: set[int] = set()
        for i, group in enumerate(self.mig):
            for gpu in group.gpus:
                if gpu >= self.gpus_per_node:
                    raise ValueError(f"mig[{i}]: GPU {gpu} does not exist (nodes have {self.gpus_per_node} GPUs: 0-{self.gpus_per_node - 1})")
                if gpu in seen:
                    raise ValueError(f"mig[{i}]: GPU {gpu} is in two layouts")
                seen.add(gpu)
            problem = layout_problem(model, group.layout)
            if problem:
                raise ValueError(f"mig[{i}]: {problem}")
        return self

    @property
    def config_name(self) -> str:
        return CONFIG_PREFIX + self.name


class SiteInventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str
    node_pools: list[NodePool] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> SiteInventory:
        names = [p.name for p in self.node_pools]
        if len(set(names)) != len(names):
            raise ValueError("node pool names must be unique")
        return self

    def offered(self) -> dict[str, int]:
        """MIG slices of the whole site, by profile."""
        out: dict[str, int] = {}
        for pool in self.node_pools:
            for group in pool.mig:
                for profile, count in group.layout.items():
                    out[profile] = out.get(profile, 0) + count * len(group.gpus) * pool.nodes
        return out


def layout_problem(model: GpuModel, layout: dict[str, int]) -> str | None:
    """Why one GPU of this model cannot be split like this, or None."""
    compute = memory = 0
    for profile, count in layout.items():
        if profile not in model.mig_profiles:
            return f"{model.name} has no MIG profile {profile!r} (it offers {', '.join(model.mig_profiles)})"
        if not isinstance(count, int) or count < 1:
            return f"{profile}: {count!r} is not a number of instances"
        if count > model.mig_profiles[profile]:
            return f"{model.name} holds at most {model.mig_profiles[profile]} × {profile}, not {count}"
        c, m = slices(model, profile)
        compute += c * count
        memory += m * count
    parts = " + ".join(f"{n} × {p}" for p, n in layout.items())
    if compute > compute_slices(model):
        return f"{parts} needs {compute} compute slices; {model.name} has {compute_slices(model)}"
    if memory > memory_slices(model):
        return f"{parts} needs {memory} memory slices; {model.name} has {memory_slices(model)}"
    return None


@dataclass(frozen=True)
class Layout:
    config: dict[str, Any]  # the mig-parted file
    warnings: list[str]


def mig_parted_config(site: SiteInventory, profiles: Iterable[Profile] = ()) -> Layout:
    configs: dict[str, Any] = {"all-disabled": [{"devices": "all", "mig-enabled": False}]}
    for pool in site.node_pools:
        entries: list[dict[str, Any]] = [
            {"devices": sorted(g.gpus), "mig-enabled": True, "mig-devices": dict(g.layout)} for g in pool.mig
        ]
        whole = sorted(set(range(pool.gpus_per_node)) - {gpu for g in pool.mig for gpu in g.gpus})
        if whole:
            entries.append({"devices": whole, "mig-enabled": False})
        configs[pool.config_name] = entries
    offered = site.offered()
    warnings = [
        f"profile {p.slug!r} asks for MIG {p.mig.profile}, which no node pool of {site.site} provides"
        for p in profiles
        if p.mig and p.mig.profile not in offered
    ]
    return Layout({"version": "v1", "mig-configs": configs}, warnings)


class InventoryError(Exception):
    pass


def load_inventory(path: str | Path) -> SiteInventory:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
        return SiteInventory.model_validate(data)
    except OSError as e:
        raise InventoryError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise InventoryError(f"{path}: YAML error: {e}") from e
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{path} {where}: {msg}" if where else f"{path}: {msg}")
        raise InventoryError("\n".join(lines)) from e
