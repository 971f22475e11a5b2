"""Load profile files into one validated `ProfileSet`, with errors that name file, line and field.

    spawner_profiles/gpu.yaml:14 profiles[2].mig: '3g.21gb' is not a MIG profile
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from .model import DaskPolicy, GroupQuota, Profile, ProfileFile, Project

PROFILE_SUFFIXES = (".yaml", ".yml")
# Bounds on what one file may cost to read. A file of YAML aliases that refer to each other
# doubles with every level: 444 bytes expanded to millions of values and blocked the profile API
# for a minute. Real profile files are a few KiB with a few hundred values.
MAX_FILE_BYTES = 256 * 1024
MAX_VALUES = 20_000


class YAMLTooLarge(ValueError):
    """A document over the size or expansion bounds (see docs/profiles.md, "Limits")."""


def expanded_size_check(node: Any, limit: int = MAX_VALUES) -> None:
    """Raise YAMLTooLarge when `node` expands (aliases followed) to more than `limit` values.

    Counts while walking and stops at the limit, so the check itself costs at most `limit` steps."""
    budget = limit
    stack = [node]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise YAMLTooLarge(
                f"expands to more than {limit:,} values (YAML aliases that repeat each other?); "
                "a profile file may hold at most that many"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_yaml_bounded(text: str) -> Any:
    """Parse a profile file's text (ruamel round-trip) within the size and expansion bounds."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_FILE_BYTES:
        raise YAMLTooLarge(f"is {size:,} bytes; a profile file may be at most {MAX_FILE_BYTES:,} bytes")
    raw = YAML(typ="rt").load(text)
    expanded_size_check(raw)
    return raw


@dataclass(frozen=True)
class ProfileError:
    file: str
    line: int | None
    where: str  # e.g. "profiles[2].mig"; empty for file-level errors
    message: str

    def __str__(self) -> str:
        pos = f"{self.file}:{self.line}" if self.line else self.file
        return f"{pos} {self.where}: {self.message}" if self.where else f"{pos}: {self.message}"


class ProfileErrors(Exception):
    """Raised when profile files are invalid; `errors` lists every problem found."""

    def __init__(self, errors: Sequence[ProfileError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True)
class ProfileSet:
    """A validated, consistent set of profiles, in file order, with where each came from."""

    profiles: tuple[Profile, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)  # slug -> "file:line"
    quotas: tuple[GroupQuota, ...] = ()
    dask: DaskPolicy = field(default_factory=DaskPolicy)
    projects: tuple[Project, ...] = ()

    def project_of(self, group: str) -> Project | None:
        return next((p for p in self.projects if p.group == group), None)

    def quota_of(self, group: str) -> GroupQuota | None:
        return next((q for q in self.quotas if q.group == group), None)

    def get(self, slug: str) -> Profile | None:
        return next((p for p in self.profiles if p.slug == slug), None)

    @property
    def slugs(self) -> list[str]:
        return [p.slug for p in self.profiles]


def profile_entries(directory: Path) -> list[Path]:
    """Everything in a directory named like a profile file, regular file or not, by name."""
    return sorted(p for p in directory.iterdir() if p.suffix in PROFILE_SUFFIXES)


def profile_files(directory: Path) -> list[Path]:
    """The profile files of a directory, in the order they are read (by name)."""
    return [p for p in profile_entries(directory) if p.is_file()]


def not_regular_files(directory: Path) -> list[ProfileError]:
    """Entries named like profile files that cannot be read as one (a directory, a device, a
    dangling link): reported, never silently skipped."""
    errors = []
    for p in profile_entries(directory):
        if not p.is_file():
            what = "a directory" if p.is_dir() else "a dangling link" if not p.exists() else "not a regular file"
            errors.append(ProfileError(str(p), None, "", f"is {what}, not a profile file"))
    return errors


def load_profile_dir(directory: str | Path) -> ProfileSet:
    directory = Path(directory)
    if not directory.is_dir():
        raise ProfileErrors([ProfileError(str(directory), None, "", "is not a directory of profile files")])
    return load_profile_files(profile_files(directory))


def load_profile_files(paths: Iterable[Path]) -> ProfileSet:
    texts: list[tuple[str, str]] = []
    unreadable: list[ProfileError] = []
    for path in paths:
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:  # not even read: the bound is the point
                unreadable.append(ProfileError(
                    str(path), None, "", f"is {size:,} bytes; a profile file may be at most {MAX_FILE_BYTES:,} bytes"
                ))
                continue
            texts.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            unreadable.append(ProfileError(str(path), None, "", f"cannot be read: {e}"))
    return load_profile_texts(texts, unreadable)


def load_profile_texts(texts: Iterable[tuple[str, str]], errors: list[ProfileError] | None = None) -> ProfileSet:
    """Validate files given as (name, text), together: what the admin API checks before it writes."""
    errors = list(errors or [])
    loaded: list[tuple[Profile, str]] = []
    quotas: list[tuple[GroupQuota, str]] = []
    dask: list[tuple[DaskPolicy, str]] = []
    projects: list[tuple[Project, str]] = []
    for name, text in texts:
        parsed, file_errors = parse_file(text, name)
        errors.extend(file_errors)
        loaded.extend(parsed.profiles)
        quotas.extend(parsed.quotas)
        dask.extend(parsed.dask)
        projects.extend(parsed.projects)
    errors.extend(_cross_file_errors(loaded))
    errors.extend(_duplicates([(q.group, where) for q, where in quotas], "quota for group"))
    errors.extend(_duplicates([("dask", where) for _, where in dask], "section"))
    errors.extend(_duplicates([(p.group, where) for p, where in projects], "project of group"))
    errors.extend(_project_name_collisions(projects))
    if errors:
        raise ProfileErrors(errors)
    return ProfileSet(
        tuple(p for p, _ in loaded),
        {p.slug: where for p, where in loaded},
        tuple(q for q, _ in quotas),
        dask[0][0] if dask else DaskPolicy(),
        tuple(p for p, _ in projects),
    )


@dataclass
class ParsedFile:
    profiles: list[tuple[Profile, str]] = field(default_factory=list)  # with "file:line"
    quotas: list[tuple[GroupQuota, str]] = field(default_factory=list)
    dask: list[tuple[DaskPolicy, str]] = field(default_factory=list)
    projects: list[tuple[Project, str]] = field(default_factory=list)


def parse_profile_text(text: str, filename: str) -> tuple[list[tuple[Profile, str]], list[ProfileError]]:
    """Validate one file's text; return its profiles (with 'file:line') or its errors."""
    parsed, errors = parse_file(text, filename)
    return parsed.profiles, errors


def parse_file(text: str, filename: str) -> tuple[ParsedFile, list[ProfileError]]:
    """Validate one file's text; return its profiles and quotas (with 'file:line') or its errors."""
    try:
        raw = load_yaml_bounded(text)
    except YAMLTooLarge as e:
        return ParsedFile(), [ProfileError(filename, None, "", str(e))]
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = e.problem or e.context or "YAML syntax error"
        return ParsedFile(), [ProfileError(filename, line, "", f"YAML syntax error: {problem}")]
    except Exception as e:  # ruamel raises a few unmarked errors (duplicate keys, bad tags)
        return ParsedFile(), [ProfileError(filename, None, "", f"YAML error: {e}")]
    if raw is None:
        return ParsedFile(), []
    if not isinstance(raw, dict):
        return ParsedFile(), [ProfileError(filename, 1, "", "must be a mapping with 'profiles:', 'quotas:' or 'projects:' lists")]
    try:
        parsed = ProfileFile.model_validate(_plain(raw))
    except ValidationError as e:
        return ParsedFile(), [_to_profile_error(err, raw, filename) for err in e.errors()]
    items, quota_items, project_items = raw.get("profiles") or [], raw.get("quotas") or [], raw.get("projects") or []
    dask_line = raw.lc.key("dask")[0] + 1 if parsed.dask is not None else None
    return (
        ParsedFile(
            [(p, f"{filename}:{_item_line(items, i)}") for i, p in enumerate(parsed.profiles)],
            [(q, f"{filename}:{_item_line(quota_items, i)}") for i, q in enumerate(parsed.quotas)],
            [(parsed.dask, f"{filename}:{dask_line}")] if parsed.dask is not None else [],
            [(p, f"{filename}:{_item_line(project_items, i)}") for i, p in enumerate(parsed.projects)],
        ),
        [],
    )


def _plain(node: Any) -> Any:
    """ruamel's commented containers as plain dicts and lists."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _item_line(seq: Any, index: int) -> int | None:
    if isinstance(seq, CommentedSeq) and index < len(seq):
        return seq.lc.item(index)[0] + 1
    return None


def _to_profile_error(err: dict[str, Any], raw: CommentedMap, filename: str) -> ProfileError:
    """Walk the error's location through the YAML tree to the deepest node that exists there."""
    node: Any = raw
    line: int | None = None
    where = ""
    consumed = 0
    for part in err["loc"]:
        consumed += 1
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            where = f"{where}.{part}" if where else str(part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            where = f"{where}[{part}]"
            node = node[part]
        else:
            consumed -= 1
            break
    message = _message(err)
    if isinstance(node, CommentedMap) and "slug" in node and where.endswith("]"):
        where = f"{where} ({node['slug']})"  # which profile, when the error is about the whole item
    if err["type"] in {"missing", "extra_forbidden"} and consumed < len(err["loc"]):
        field_name = err["loc"][-1]
        where = f"{where}.{field_name}" if where else str(field_name)
    return ProfileError(filename, line, where, message)


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field (see docs/profiles.md for the fields a profile takes)"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if kind in {"string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type"}:
        return f"{msg} (got {err.get('input')!r})"
    return msg


def _position(where: str) -> tuple[str, int | None]:
    file, _, line = where.rpartition(":")
    return file, int(line) if line.isdigit() else None


def _duplicates(named: list[tuple[str, str]], what: str) -> list[ProfileError]:
    """Errors for names defined twice; `named` holds (name, "file:line") in reading order."""
    errors: list[ProfileError] = []
    seen: dict[str, str] = {}
    for name, where in named:
        if name in seen:
            errors.append(ProfileError(*_position(where), f"{what} {name!r}", f"duplicate: already defined at {seen[name]}"))
        else:
            seen[name] = where
    return errors


def _cross_file_errors(loaded: list[tuple[Profile, str]]) -> list[ProfileError]:
    errors = _duplicates([(p.slug, where) for p, where in loaded], "slug")
    defaults = [(p, where) for p, where in loaded if p.default]
    for p, where in defaults[1:]:
        errors.append(
            ProfileError(
                *_position(where),
                f"profile {p.slug!r} default",
                f"only one profile can be the default; {defaults[0][0].slug!r} already is ({defaults[0][1]})",
            )
        )
    return errors


def _project_name_collisions(projects: list[tuple[Project, str]]) -> list[ProfileError]:
    """Two groups whose projects would share a hub user, a directory, a Unix group or a volume.

    Names derived from a group get a hash when the group's name needs changing (`x.y` ->
    `x-y-<hash>`), so a group literally called `x-y-<hash>` would land on the same names and
    share the first group's storage. Refused here, where the admin writes them."""
    from ..projects.names import project_claim, project_slug, project_user, unix_group

    errors: list[ProfileError] = []
    seen: dict[str, tuple[str, str]] = {}
    for project, where in projects:
        for kind, name in (("directory", project_slug(project.group)), ("hub user", project_user(project.group)),
                           ("Unix group", unix_group(project.group)), ("volume", project_claim(project.group))):
            other = seen.get(f"{kind}:{name}")
            if other and other[0] != project.group:
                errors.append(ProfileError(
                    *_position(where), f"project of group {project.group!r}",
                    f"its {kind} would be {name!r}, the same as the project of group {other[0]!r} ({other[1]}); "
                    "rename one of the groups",
                ))
                break
            seen[f"{kind}:{name}"] = (project.group, where)
    return errors
