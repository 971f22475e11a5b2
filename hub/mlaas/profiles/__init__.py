"""Resource profiles: the model, loading with precise errors, the live store and access rules."""

from .access import allowed_profiles, may_use, preselected, refusal
from .loader import ProfileError, ProfileErrors, ProfileSet, load_profile_dir, load_profile_files
from .model import CpuSpec, GpuRequest, MemorySpec, MigRequest, Profile
from .store import ProfileStore

__all__ = [
    "CpuSpec",
    "GpuRequest",
    "MemorySpec",
    "MigRequest",
    "Profile",
    "ProfileError",
    "ProfileErrors",
    "ProfileSet",
    "ProfileStore",
    "allowed_profiles",
    "load_profile_dir",
    "load_profile_files",
    "may_use",
    "preselected",
    "refusal",
]
