"""Chart values generated from the profile model (`mlaas chart-values`).

The chart cannot read `spawner_profiles/` (Helm sees only its own directory), and it should not
re-implement the model. So the values that come from the profiles are generated here, after the
same validation as `mlaas profiles check`: the profile files themselves (the ConfigMap the hub
watches), the group projects' volume claims, and the site's MIG layout for the GPU operator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .mig_layout import SiteInventory, mig_parted_config
from .profiles.loader import load_profile_dir, profile_files
from .projects.names import project_claim, project_slug


def chart_values(profiles_dir: str | Path, inventory: SiteInventory | None = None) -> tuple[dict[str, Any], list[str]]:
    """Values for charts/mlaas-hub, and warnings (e.g. a MIG profile no GPU of the site offers)."""
    directory = Path(profiles_dir)
    pset = load_profile_dir(directory)  # raises ProfileErrors: nothing invalid reaches a cluster
    values: dict[str, Any] = {
        "profiles": {"files": {p.name: p.read_text(encoding="utf-8") for p in profile_files(directory)}},
        "projects": {
            "claims": [{"group": p.group, "name": project_claim(p.group), "slug": project_slug(p.group)} for p in pset.projects]
        },
    }
    warnings: list[str] = []
    if inventory is not None:
        layout = mig_parted_config(inventory, pset.profiles)
        values["migManager"] = {"config": layout.config}
        warnings = layout.warnings
    return values, warnings
