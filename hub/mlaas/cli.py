"""`mlaas` — the platform's command line.

    mlaas profiles check [PATH]   validate profile files, print them as a table or the errors
    mlaas gpus                    the GPU/MIG inventory this machine offers (NVML)
    mlaas mig-layout INVENTORY    a site's mig-parted configuration (GPU operator), checked
    mlaas chart-values            values for charts/mlaas-hub from the profiles (and a site's GPUs)
    mlaas deploy SITE_DIR         helm upgrade --install of a site (our chart + pinned upstream charts)
    mlaas up                      start the one-machine platform (IdP, hub, proxy) until Ctrl-C
    mlaas down                    stop a platform started by `mlaas up`
    mlaas backup FILE [--homes]   back up the platform (running or not) into one archive
    mlaas restore FILE            restore a backup into the configured, empty state directory
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from .profiles import ProfileErrors, load_profile_dir, load_profile_files
from .profiles.quantities import format_bytes
from .settings import REPO_ROOT, SettingsError, load_settings, settings_file


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_profiles_check(path: str | None) -> int:
    target = Path(path) if path else load_settings().profiles_dir
    try:
        pset = load_profile_files([target]) if target.is_file() else load_profile_dir(target)
    except ProfileErrors as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        print(f"{len(e.errors)} error(s) in {target}", file=sys.stderr)
        return 1
    rows = []
    for p in pset.profiles:
        accel = "-"
        if p.gpu:
            accel = f"{p.gpu.count}x GPU" + (f" {p.gpu.model}" if p.gpu.model else "")
        elif p.mig:
            accel = f"{p.mig.count}x MIG {p.mig.profile}"
        rows.append(
            [
                p.slug + (" *" if p.default else "") + ("" if p.enabled else " (disabled)"),
                p.display_name,
                f"{p.cpu.guarantee:g}-{p.cpu.limit:g}",
                f"{format_bytes(p.memory.guarantee)}-{format_bytes(p.memory.limit)}",
                accel,
                ", ".join(p.groups),
            ]
        )
    print(_table(rows, ["SLUG (* default)", "NAME", "CPU", "MEMORY", "ACCELERATOR", "GROUPS"]))
    extras = [f"{len(pset.quotas)} group quota(s)"] if pset.quotas else []
    if pset.projects:
        extras.append(f"{len(pset.projects)} project(s): " + ", ".join(p.group for p in pset.projects))
    print(f"\n{len(pset.profiles)} profile(s) OK in {target}" + (f"; {'; '.join(extras)}" if extras else ""))
    return 0


def cmd_gpus(spec: str, as_json: bool) -> int:
    from .capacity import inventory_source

    inv = inventory_source(spec).inventory()
    if as_json:
        print(json.dumps(inv.as_dict(), indent=2))
        return 0
    print(f"source: {inv.source}")
    if inv.unavailable_reason:
        print(f"no assignable devices: {inv.unavailable_reason}")
    rows = [[d.index, d.kind, d.mig_profile or "-", d.model, format_bytes(d.memory_bytes), d.uuid] for d in inv.devices]
    if rows:
        print(_table(rows, ["INDEX", "KIND", "MIG", "MODEL", "MEMORY", "UUID"]))
    for uuid in inv.mig_enabled_gpus:
        print(f"{uuid}: MIG mode on (assignable as its instances only)")
    return 0


def _pid_file() -> Path:
    return load_settings().state_dir / "mlaas-up.pid"


def _demo_logins(users_file: Path, passwords_file: Path) -> list[str]:
    """The demo users with this installation's generated passwords (see mlaas.dev_idp)."""
    from .dev_idp import demo_users, ensure_passwords

    try:
        passwords = ensure_passwords(users_file, passwords_file)
        users = demo_users(users_file)
    except OSError:
        return []
    return [f"{u['username']} / {passwords.get(u['username'], '?')}  ({', '.join(u.get('groups') or ['entitlements'])})"
            for u in users]


def cmd_up() -> int:
    from .launcher import LaunchError, Platform

    settings = load_settings()
    try:
        load_profile_dir(settings.profiles_dir)
    except ProfileErrors as e:
        print(
            f"WARNING: the profile files have errors; the hub keeps the last good profiles it has:\n{e}",
            file=sys.stderr,
        )
    platform = Platform(settings, settings_file())  # the hub and its services read the same file
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("Starting MLaaS Hub on this machine…", flush=True)
    try:
        platform.start()
    except LaunchError as e:
        print(f"Could not start the platform: {e}", file=sys.stderr)
        return 1
    pid_file = _pid_file()
    pid_file.write_text(str(os.getpid()))
    from .limits import KIND_SUMMARY, backend_kind

    mode = "per-user accounts" if os.geteuid() == 0 and settings.isolation != "single-account" else "single-account (development)"
    limits = KIND_SUMMARY[backend_kind()]
    print("\n" + "=" * 72)
    print(f" MLaaS Hub is up:  {platform.url}/")
    print(f" Isolation: {mode}.  State: {settings.state_dir}")
    print(f" Limits: {limits}")
    print(f" Admin page (hub admins): {platform.url}/services/mlaas-admin/")
    from .tracking.hub_config import why_off

    tracking_off = why_off(settings)
    print(f" Experiment tracking (MLflow, per group): {platform.url}/services/mlflow/" if tracking_off is None
          else f" Experiment tracking: off ({tracking_off})")
    for notice in platform.notices:
        print(f" {notice}")
    if settings.dev_idp.enabled:
        print(" Demo logins (development identity provider):")
        print(f"   (generated for this installation, kept in {settings.dev_idp_passwords_file}, mode 0600)")
        for line in _demo_logins(settings.dev_idp.users_file, settings.dev_idp_passwords_file):
            print(f"   {line}")
    print(" Stop with Ctrl-C or `make down`.")
    print("=" * 72, flush=True)
    try:
        while not stopping:
            if platform.hub and platform.hub.poll() is not None:
                print(f"JupyterHub exited with status {platform.hub.returncode}", file=sys.stderr)
                break
            time.sleep(0.5)
    except OSError:
        pass
    finally:
        try:
            print("Stopping MLaaS Hub…", flush=True)
        except OSError:  # the terminal or pipe is gone (e.g. `| tee` got the same Ctrl-C): stop anyway
            pass
        platform.stop()
        pid_file.unlink(missing_ok=True)
    return 0


def cmd_backup_restore(args) -> int:
    from .backup import BackupError, backup, restore

    settings = load_settings()
    step = lambda what: print(f"  {what}", flush=True)  # noqa: E731 - progress, one line per part
    try:
        if args.command == "backup":
            print(f"Backing up {settings.state_dir} to {args.target}…", flush=True)
            manifest = backup(settings, Path(args.target), homes=args.homes, progress=step)
            print(f"Done: {', '.join(f'{k} ({v})' for k, v in manifest['contents'].items())}.")
        else:
            print(f"Restoring {args.source} into {settings.state_dir}…", flush=True)
            manifest = restore(settings, Path(args.source), progress=step)
            print(f"Done: the backup of {manifest['created']} from {manifest['state_dir']}. Start it with `mlaas up`.")
    except BackupError as e:
        print(f"{args.command} failed: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_down() -> int:
    """Stop the platform `mlaas up` started: its launcher stops everything it started; if that
    launcher is gone (killed, crashed), what its launch left running is stopped here. Only
    processes of that launch are touched (mlaas.launcher.reap_launch), never this command or
    the shell running it."""
    from .launcher import LaunchError, reap_launch

    pid_file = _pid_file()
    pid = int(pid_file.read_text()) if pid_file.exists() and pid_file.read_text().strip().isdigit() else None
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid = None
    if pid is not None:
        for _ in range(600):
            if not pid_file.exists():
                print("MLaaS Hub stopped.")
                return 0
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    try:
        left = reap_launch(load_settings())
    except LaunchError as e:  # its launcher is still running and did not stop within a minute
        print(f"MLaaS Hub did not stop: {e}", file=sys.stderr)
        return 1
    if left:
        print(f"Stopped {left} process(es) a platform that did not stop cleanly left behind.")
    elif pid is None:
        print("MLaaS Hub is not running.")
    return 0


def cmd_mig_layout(inventory: str, profiles: str | None, output: str | None) -> int:
    import yaml

    from .mig_layout import InventoryError, load_inventory, mig_parted_config

    try:
        site = load_inventory(inventory)
    except InventoryError as e:
        print(e, file=sys.stderr)
        return 1
    pset = load_profile_dir(profiles) if profiles else None
    layout = mig_parted_config(site, pset.profiles if pset else ())
    for warning in layout.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    text = yaml.safe_dump(layout.config, sort_keys=False)
    if output:
        Path(output).write_text(text)
        print(f"Wrote {output}: {len(layout.config['mig-configs']) - 1} node pool config(s) for {site.site}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_chart_values(profiles: list[str] | None, inventory: str | None, site_dir: str | None, output: str | None) -> int:
    import yaml

    from .deploy import chart_values, site_values
    from .mig_layout import InventoryError, load_inventory

    try:
        if site_dir:
            values, warnings = site_values(site_dir)
        else:
            site = load_inventory(inventory) if inventory else None
            values, warnings = chart_values(profiles or [load_settings().profiles_dir], site)
    except InventoryError as e:
        print(e, file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    text = "# Generated by `mlaas chart-values` from the profile files; do not edit.\n" + yaml.safe_dump(values, sort_keys=False)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlaas", description="MLaaS Hub command line")
    sub = parser.add_subparsers(dest="command", required=True)
    profiles = sub.add_parser("profiles", help="work with resource profiles")
    psub = profiles.add_subparsers(dest="action", required=True)
    check = psub.add_parser("check", help="validate profile files")
    check.add_argument("path", nargs="?", help=f"file or directory (default: {REPO_ROOT / 'spawner_profiles'})")
    gpus = sub.add_parser("gpus", help="show the GPU/MIG inventory")
    gpus.add_argument("--inventory", default="nvml", help="'nvml' or a simulated inventory file")
    gpus.add_argument("--json", action="store_true")
    mig = sub.add_parser("mig-layout", help="a site's MIG layout as mig-parted configuration")
    mig.add_argument("inventory", help="the site's GPU inventory YAML (node pools and their MIG splits)")
    mig.add_argument("--profiles", help="profile directory whose MIG needs to check against the layout")
    mig.add_argument("-o", "--output", help="write to this file instead of stdout")
    values = sub.add_parser("chart-values", help="values for charts/mlaas-hub generated from the profiles")
    values.add_argument("--profiles", action="append", help="profile file or directory (repeatable; default: the platform's)")
    values.add_argument("--inventory", help="the site's GPU inventory YAML, for the MIG layout ConfigMap")
    values.add_argument("--site", help="a site directory (charts/sites/<site>): its profiles and GPUs")
    values.add_argument("-o", "--output", help="write to this file instead of stdout")
    dep = sub.add_parser("deploy", help="install a site with Helm: our chart and the pinned upstream charts")
    dep.add_argument("site", help="the site directory, e.g. charts/sites/site-a")
    dep.add_argument("--dry-run", action="store_true", help="print the helm commands, run nothing")
    dep.add_argument("--charts-dir", type=Path, default=os.environ.get("MLAAS_CHARTS_DIR") or None,
                     help="where the pinned upstream charts lie as `helm pull` archives (<chart>-<version>.tgz), "
                     "for sites without access to the chart repositories (default: $MLAAS_CHARTS_DIR)")
    bk = sub.add_parser("backup", help="back up the platform (consistent while it runs)")
    bk.add_argument("target", help="the archive to write (.tar.gz, mode 0600: it holds the secrets)")
    bk.add_argument("--homes", action="store_true", help="users' homes and project storage too")
    rs = sub.add_parser("restore", help="restore a backup into the configured, empty state directory")
    rs.add_argument("source", help="an archive written by `mlaas backup`")
    sub.add_parser("up", help="start the platform on this machine")
    sub.add_parser("down", help="stop the platform started by `mlaas up`")
    args = parser.parse_args(argv)
    try:
        if args.command == "profiles":
            return cmd_profiles_check(args.path)
        if args.command == "gpus":
            return cmd_gpus(args.inventory, args.json)
        if args.command == "mig-layout":
            return cmd_mig_layout(args.inventory, args.profiles, args.output)
        if args.command == "chart-values":
            return cmd_chart_values(args.profiles, args.inventory, args.site, args.output)
        if args.command == "deploy":
            from .deploy import deploy

            site = Path(args.site)
            return deploy(site, load_settings().state_dir / "deploy" / site.name / "generated.yaml", args.dry_run,
                          args.charts_dir)
        if args.command in ("backup", "restore"):
            return cmd_backup_restore(args)
        if args.command == "up":
            return cmd_up()
        return cmd_down()
    except SettingsError as e:
        print(f"Settings error: {e}", file=sys.stderr)
        return 2
    except ProfileErrors as e:
        for err in e.errors:
            print(err, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
