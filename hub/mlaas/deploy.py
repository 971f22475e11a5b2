"""Deploying on Kubernetes: chart values generated from the profile model (`mlaas chart-values`)
and the Helm commands of a site (`mlaas deploy`).

The chart cannot read `spawner_profiles/` (Helm sees only its own directory), and it should not
re-implement the model. So the values that come from the profiles are generated here, after the
same validation as `mlaas profiles check`: the profile files themselves (the ConfigMap the hub
watches), the group projects' volume claims, and the site's MIG layout for the GPU operator.

A site is a directory (`charts/sites/<site>/`) with `site.yaml` (which profile files it
offers, its GPU inventory), `values.yaml` (our chart), `jupyterhub.yaml` and
`dask-gateway.yaml` (the upstream charts, pinned in `charts/upstream.yaml`).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .mig_layout import SiteInventory, load_inventory, mig_parted_config
from .profiles.loader import ProfileError, ProfileErrors, load_profile_files, profile_files
from .projects.names import project_claim, project_slug
from .settings import REPO_ROOT
from .tracking.sync import workspace_name

CHART = REPO_ROOT / "charts" / "mlaas-hub"
UPSTREAM = REPO_ROOT / "charts" / "upstream.yaml"


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Profile files from files and directories, refusing two files of the same name."""
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(profile_files(path) if path.is_dir() else [path])
    seen: dict[str, Path] = {}
    for f in files:
        if f.name in seen:
            raise ProfileErrors([ProfileError(str(f), None, "", f"has the same name as {seen[f.name]} (ConfigMap keys must differ)")])
        seen[f.name] = f
    return files


def chart_values(
    profiles: Iterable[str | Path], inventory: SiteInventory | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Values for charts/mlaas-hub, and warnings (e.g. a MIG profile no GPU of the site offers)."""
    files = expand(profiles)
    pset = load_profile_files(files)  # raises ProfileErrors: nothing invalid reaches a cluster
    values: dict[str, Any] = {
        "profiles": {"files": {f.name: f.read_text(encoding="utf-8") for f in files}},
        "projects": {
            "claims": [
                {"group": p.group, "name": project_claim(p.group), "slug": project_slug(p.group),
                 "workspace": workspace_name(p.group)} for p in pset.projects
            ]
        },
    }
    warnings: list[str] = []
    if inventory is not None:
        layout = mig_parted_config(inventory, pset.profiles)
        values["migManager"] = {"config": layout.config}
        warnings = layout.warnings
    return values, warnings


class Site(BaseModel):
    """`charts/sites/<site>/site.yaml`."""

    model_config = ConfigDict(extra="forbid")

    profiles: list[str] = Field(min_length=1, description="Profile files or directories, relative to the repository.")
    gpus: str | None = Field(None, description="The site's GPU inventory (node pools, MIG splits), relative to the site.")
    namespace: str = "mlaas"


def load_site(directory: str | Path) -> tuple[Site, SiteInventory | None]:
    directory = Path(directory)
    site = Site.model_validate(yaml.safe_load((directory / "site.yaml").read_text()))
    inventory = load_inventory(directory / site.gpus) if site.gpus else None
    return site, inventory


def site_values(directory: str | Path) -> tuple[dict[str, Any], list[str]]:
    site, inventory = load_site(directory)
    return chart_values([REPO_ROOT / p for p in site.profiles], inventory)


def upstream_archive(charts_dir: Path | None, chart: str, version: str) -> Path | None:
    """A pinned upstream chart as a local archive (`helm pull` output: <chart>-<version>.tgz), for
    sites without access to the chart repositories."""
    if charts_dir is None:
        return None
    archive = Path(charts_dir) / f"{chart}-{version}.tgz"
    return archive if archive.is_file() else None


def helm_commands(directory: str | Path, generated: Path, charts_dir: Path | None = None) -> list[list[str]]:
    """The `helm upgrade --install` commands for a site: our chart, then the pinned upstream charts
    (from `charts_dir` where it holds their archives, else from their repositories)."""
    directory = Path(directory)
    site, _ = load_site(directory)
    upstream = yaml.safe_load(UPSTREAM.read_text())
    ns = ["--namespace", site.namespace, "--create-namespace"]
    commands = [
        ["helm", "upgrade", "--install", "mlaas-hub", str(CHART), *ns,
         "-f", str(directory / "values.yaml"), "-f", str(generated)],
    ]
    for release, pin in upstream["charts"].items():
        site_file = directory / f"{release}.yaml"
        archive = upstream_archive(charts_dir, pin["chart"], str(pin["version"]))
        source = [str(archive)] if archive else [pin["chart"], "--repo", pin["repository"], "--version", str(pin["version"])]
        commands.append(
            ["helm", "upgrade", "--install", release, *source,
             *ns, "-f", str(REPO_ROOT / pin["values"]), *(["-f", str(site_file)] if site_file.exists() else [])]
        )
    return commands


def deploy(directory: str | Path, generated: Path, dry_run: bool = False, charts_dir: Path | None = None) -> int:
    values, warnings = site_values(directory)
    for warning in warnings:
        print(f"warning: {warning}")
    generated.parent.mkdir(parents=True, exist_ok=True)
    generated.write_text("# Generated by `mlaas deploy` from the profile files; do not edit.\n" + yaml.safe_dump(values, sort_keys=False))
    for command in helm_commands(directory, generated, charts_dir):
        print("$ " + shlex.join(command))
        if not dry_run:
            result = subprocess.run(command)
            if result.returncode != 0:
                return result.returncode
    return 0
