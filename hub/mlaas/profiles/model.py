"""The resource profile model: the single source of truth for every spawner, the chart and the docs.

A profile file (`spawner_profiles/*.yaml`) holds a mapping with a `profiles:` list. Every field
is validated here; positions in the file are attached by `mlaas.profiles.loader`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from .mig import ALL_MIG_PROFILES, FAMILIES, is_product_name, models_matching
from .quantities import format_bytes, format_cpu, parse_bytes, parse_cpu

MAX_CPU_CORES = 1024.0
MAX_MEMORY_BYTES = 64 * 2**40  # 64 TiB: more is a typo, not a node
MAX_GPUS = 16
MAX_MIG_SLICES = 7

SLUG_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
EVERYONE = "*"

# Variables the platform sets itself; a profile may not override them.
RESERVED_ENV = frozenset(
    {"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HOME", "USER", "SHELL", "PATH", "LD_PRELOAD"}
)


def _cores(value: Any) -> float:
    cores = parse_cpu(value)
    if cores > MAX_CPU_CORES:
        raise ValueError(f"{value!r} is more than {MAX_CPU_CORES:g} cores")
    return cores


def _bytes(value: Any) -> int:
    n = parse_bytes(value)
    if n > MAX_MEMORY_BYTES:
        raise ValueError(f"{value!r} is more than 64 TiB")
    return n


Cores = Annotated[float, BeforeValidator(_cores)]
Bytes = Annotated[int, BeforeValidator(_bytes)]


MAX_ENV_VARS = 64
MAX_ENV_NAME = 128
MAX_ENV_VALUE = 4096
MAX_LIST = 256  # groups, sites, choices: longer lists are a mistake or an attack


class _Strict(BaseModel):
    # NaN and infinities are refused for every number: `cpu: .nan` would pass `>`/`<` checks and a
    # NaN quota would never be exceeded
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CpuSpec(_Strict):
    """CPU cores: `guarantee` is reserved for the server, `limit` is the most it may use."""

    guarantee: Cores = 0.0
    limit: Cores

    @model_validator(mode="after")
    def _guarantee_within_limit(self) -> CpuSpec:
        if self.limit <= 0:
            raise ValueError("limit must be more than 0")
        if self.guarantee > self.limit:
            raise ValueError(f"guarantee {self.guarantee:g} is more than limit {self.limit:g}")
        return self


class MemorySpec(_Strict):
    """Memory in bytes (written 512Mi, 4Gi, 4G)."""

    guarantee: Bytes = 0
    limit: Bytes

    @model_validator(mode="after")
    def _guarantee_within_limit(self) -> MemorySpec:
        if self.limit < 64 * 2**20:
            raise ValueError("limit must be at least 64Mi (a JupyterLab server needs more)")
        if self.guarantee > self.limit:
            raise ValueError(
                f"guarantee {format_bytes(self.guarantee)} is more than limit {format_bytes(self.limit)}"
            )
        return self


class GpuRequest(_Strict):
    """Whole GPUs. `model` narrows the choice: a family ('A100', 'H100': any of them) or one model
    by any of its names ('A100-SXM4-80GB', 'NVIDIA H100 80GB HBM3', 'NVIDIA-H100-80GB-HBM3'); the
    same on one machine (NVML) and on Kubernetes (GPU feature discovery's labels)."""

    count: int = Field(1, ge=1, le=MAX_GPUS)
    model: str | None = Field(None, min_length=1, max_length=64)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None) -> str | None:
        if value is not None and not models_matching(value) and not is_product_name(value):
            raise ValueError(
                f"{value!r} is not a GPU model this platform knows: use a family ({', '.join(FAMILIES)}), a model "
                "such as 'A100-SXM4-80GB' or 'NVIDIA H100 80GB HBM3', or another GPU's full product name as NVML "
                "reports it ('NVIDIA L40S'); docs/profiles.md lists them"
            )
        return value


class MigRequest(_Strict):
    """A MIG slice, e.g. `mig: 3g.20gb` or `mig: {profile: 3g.20gb, count: 2}`."""

    profile: str
    count: int = Field(1, ge=1, le=MAX_MIG_SLICES)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"profile": value} if isinstance(value, str) else value

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in ALL_MIG_PROFILES:
            raise ValueError(
                f"{value!r} is not a MIG profile of any supported GPU "
                "(e.g. 1g.10gb, 3g.20gb, 7g.80gb; the full list is in docs/profiles.md)"
            )
        return value

    @property
    def resource_name(self) -> str:
        """The Kubernetes extended resource (GPU operator, mixed strategy)."""
        return f"nvidia.com/mig-{self.profile}"


class Profile(_Strict):
    slug: str = Field(description="Short unique name, a DNS label: used in URLs, APIs and pod labels.")
    display_name: str = Field(min_length=1, max_length=80)
    description: str = Field("", max_length=500)
    image: str | None = Field(
        None, max_length=256, description="Container image on Kubernetes; on one machine the platform's environment."
    )
    cpu: CpuSpec
    memory: MemorySpec
    gpu: GpuRequest | None = None
    mig: MigRequest | None = None
    groups: list[str] = Field(
        min_length=1, max_length=MAX_LIST, description="Groups that may use the profile; ['*'] for everyone."
    )
    node_pool: str | None = Field(
        None,
        description="Kubernetes: run only on nodes labelled mlaas.io/node-pool=<pool>, tolerating that pool's taint "
        "(how a group's reserved nodes are kept for its profiles). Ignored on one machine.",
    )
    sites: list[str] | None = Field(
        None,
        max_length=MAX_LIST,
        description="Kubernetes federation: the sites (clusters) this profile may run at, by the names in the hub's "
        "`kubernetes.sites`; every site if left out. Ignored on one machine.",
    )
    gpu_idle_timeout: int | None = Field(
        None, ge=30, le=7 * 86400,
        description="Seconds a server's GPUs (or MIG slices) may stay unused before the server is warned and then "
        "stopped, even while a browser tab keeps it active. Only for profiles with `gpu` or `mig`.",
    )
    default: bool = False
    enabled: bool = Field(
        True, description="false: kept in the file but offered to nobody and refused on start (set by admins)."
    )
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid slug (lower-case letters, digits and '-', at most 63, e.g. 'gpu-a100')"
            )
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        for name in value:
            if name == EVERYONE:
                continue
            if "*" in name or not GROUP_RE.match(name):
                raise ValueError(
                    f"{name!r} is not a group name ('*' alone means everyone; names use letters, digits and ._:@/+-)"
                )
        if EVERYONE in value and len(value) > 1:
            raise ValueError("'*' already means everyone: list it alone")
        if len(set(value)) != len(value):
            raise ValueError("a group is listed twice")
        return value

    @field_validator("node_pool")
    @classmethod
    def _node_pool(cls, value: str | None) -> str | None:
        if value is not None and not SLUG_RE.match(value):
            raise ValueError(f"{value!r} is not a node pool name (a label value: lower-case letters, digits, '-')")
        return value

    @field_validator("sites")
    @classmethod
    def _sites(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("an empty list would let the profile run nowhere: leave `sites` out for every site")
        for name in value:
            if not SLUG_RE.match(name):
                raise ValueError(f"{name!r} is not a site name (lower-case letters, digits and '-', e.g. 'site-a')")
        if len(set(value)) != len(value):
            raise ValueError("a site is listed twice")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ENV_VARS:
            raise ValueError(f"{len(value)} variables; a profile may set at most {MAX_ENV_VARS}")
        for key, text in value.items():
            if len(key) > MAX_ENV_NAME or len(text) > MAX_ENV_VALUE:
                raise ValueError(
                    f"{key[:40]!r}: names may be {MAX_ENV_NAME} and values {MAX_ENV_VALUE} characters long at most"
                )
            if "\0" in text:
                raise ValueError(f"{key!r}: a value cannot hold a NUL character")
            if not ENV_NAME_RE.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
            if key in RESERVED_ENV:
                raise ValueError(f"{key!r} is set by the platform and cannot be overridden")
        return value

    @model_validator(mode="after")
    def _one_accelerator_kind(self) -> Profile:
        if self.gpu and self.mig:
            raise ValueError("a profile asks for whole GPUs (gpu) or MIG slices (mig), not both")
        if self.gpu_idle_timeout is not None and not (self.gpu or self.mig):
            raise ValueError("gpu_idle_timeout is for profiles with GPUs (gpu) or MIG slices (mig)")
        return self

    # --- derived, for forms, logs and spawners -------------------------------------------
    @property
    def for_everyone(self) -> bool:
        return EVERYONE in self.groups

    @property
    def needs_accelerator(self) -> bool:
        return self.gpu is not None or self.mig is not None

    def summary(self) -> str:
        """'2 CPUs, 8 GiB, 1 GPU (A100)' — what a user reads in the form."""
        parts = [format_cpu(self.cpu.limit), format_bytes(self.memory.limit)]
        if self.gpu:
            gpu = f"{self.gpu.count} GPU" + ("s" if self.gpu.count > 1 else "")
            parts.append(f"{gpu} ({self.gpu.model})" if self.gpu.model else gpu)
        if self.mig:
            parts.append(f"{self.mig.count} × MIG {self.mig.profile}")
        return ", ".join(parts)


class DaskLimits(_Strict):
    """Limits on Dask clusters, summed over all clusters of a user (or of a group's members)."""

    clusters: int | None = Field(None, ge=0, le=1000)
    cores: Cores | None = None  # worker cores (workers x cores per worker)
    memory: Bytes | None = None  # worker memory
    gpus: int | None = Field(None, ge=0, le=10_000)


class DaskPolicy(_Strict):
    """What Dask Gateway offers: worker sizes to choose from and limits per cluster and per user."""

    worker_cores: list[int] = Field(default_factory=lambda: [1, 2], min_length=1, max_length=MAX_LIST)
    worker_memory: list[Bytes] = Field(default_factory=lambda: [2 * 2**30, 4 * 2**30], min_length=1, max_length=MAX_LIST)
    worker_gpus: list[int] = Field(default_factory=lambda: [0, 1], min_length=1, max_length=MAX_LIST)
    cluster_max_workers: int = Field(8, ge=1, le=10_000)
    cluster_max_cores: Cores = 16.0
    cluster_max_memory: Bytes = 64 * 2**30
    idle_timeout: int = Field(1800, ge=0, description="Seconds without work before a cluster is shut down (0: never).")
    per_user: DaskLimits = DaskLimits(clusters=2, cores=16.0, memory=64 * 2**30)

    @field_validator("worker_cores")
    @classmethod
    def _cores(cls, value: list[int]) -> list[int]:
        if any(v < 1 or v > 256 for v in value):
            raise ValueError("cores per worker must be whole numbers between 1 and 256")
        return value

    @field_validator("worker_gpus")
    @classmethod
    def _gpus(cls, value: list[int]) -> list[int]:
        if any(v < 0 or v > MAX_GPUS for v in value):
            raise ValueError(f"GPUs per worker must be between 0 and {MAX_GPUS}")
        return value


class GroupQuota(_Strict):
    """What the members of a group may use together, counted from running servers.

    CPU and memory count the profiles' limits. Every group of a user that has a quota counts
    that user's servers, so each group's quota bounds what its members use together.
    """

    group: str
    gpus: int | None = Field(None, ge=0, le=100_000, description="Whole GPUs.")
    mig: dict[str, int] = Field(
        default_factory=dict, max_length=MAX_LIST, description="MIG slices by profile, e.g. {3g.20gb: 2}."
    )
    cpu: Cores | None = Field(None, description="CPU cores (sum of limits).")
    memory: Bytes | None = Field(None, description="Memory (sum of limits).")
    servers_per_user: int | None = Field(None, ge=0, le=1000, description="Running servers of one member.")
    dask: DaskLimits = Field(default_factory=DaskLimits, description="Dask clusters of all members together.")
    tracking_artifacts: Bytes | None = Field(
        None, description="Experiment tracking: the size of the group's MLflow artifacts (models, files) together; "
        "an upload past it is refused.")

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not GROUP_RE.match(value):
            raise ValueError(f"{value!r} is not a group name (letters, digits and ._:@/+-)")
        return value

    @field_validator("mig")
    @classmethod
    def _mig(cls, value: dict[str, int]) -> dict[str, int]:
        for name, count in value.items():
            if name not in ALL_MIG_PROFILES:
                raise ValueError(f"{name!r} is not a MIG profile of any supported GPU")
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{name}: {count!r} is not a count of slices")
        return value


class Project(_Strict):
    """A group's project: shared storage, and project servers that every member may start and open.

    A project server runs with the group's profiles and counts against the group's quota.
    """

    group: str
    display_name: str = Field("", max_length=80, description="Shown on the hub's home page; the group's name if empty.")
    description: str = Field("", max_length=500)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if value == EVERYONE or not GROUP_RE.match(value):
            raise ValueError(f"{value!r} is not a group name (letters, digits and ._:@/+-)")
        return value

    @property
    def title(self) -> str:
        return self.display_name or self.group


class ProfileFile(_Strict):
    """One file of `spawner_profiles/`: profiles, group quotas, projects, or any mix."""

    profiles: list[Profile] = Field(default_factory=list)
    quotas: list[GroupQuota] = Field(default_factory=list)
    projects: list[Project] = Field(default_factory=list)
    dask: DaskPolicy | None = None
