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

from .model import Profile, ProfileFile

PROFILE_SUFFIXES = (".yaml", ".yml")


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

    def get(self, slug: str) -> Profile | None:
        return next((p for p in self.profiles if p.slug == slug), None)

    @property
    def slugs(self) -> list[str]:
        return [p.slug for p in self.profiles]


def profile_files(directory: Path) -> list[Path]:
    """The profile files of a directory, in the order they are read (by name)."""
    return sorted(p for p in directory.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file())


def load_profile_dir(directory: str | Path) -> ProfileSet:
    directory = Path(directory)
    if not directory.is_dir():
        raise ProfileErrors([ProfileError(str(directory), None, "", "is not a directory of profile files")])
    return load_profile_files(profile_files(directory))


def load_profile_files(paths: Iterable[Path]) -> ProfileSet:
    errors: list[ProfileError] = []
    loaded: list[tuple[Profile, str]] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            errors.append(ProfileError(str(path), None, "", f"cannot be read: {e}"))
            continue
        file_profiles, file_errors = parse_profile_text(text, str(path))
        errors.extend(file_errors)
        loaded.extend(file_profiles)
    errors.extend(_cross_file_errors(loaded))
    if errors:
        raise ProfileErrors(errors)
    return ProfileSet(tuple(p for p, _ in loaded), {p.slug: where for p, where in loaded})


def parse_profile_text(text: str, filename: str) -> tuple[list[tuple[Profile, str]], list[ProfileError]]:
    """Validate one file's text; return its profiles (with 'file:line') or its errors."""
    try:
        raw = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = e.problem or e.context or "YAML syntax error"
        return [], [ProfileError(filename, line, "", f"YAML syntax error: {problem}")]
    except Exception as e:  # ruamel raises a few unmarked errors (duplicate keys, bad tags)
        return [], [ProfileError(filename, None, "", f"YAML error: {e}")]
    if raw is None:
        return [], []
    if not isinstance(raw, dict):
        return [], [ProfileError(filename, 1, "", "must be a mapping with a 'profiles:' list")]
    try:
        parsed = ProfileFile.model_validate(_plain(raw))
    except ValidationError as e:
        return [], [_to_profile_error(err, raw, filename) for err in e.errors()]
    items = raw.get("profiles") or []
    return [(p, f"{filename}:{_item_line(items, i)}") for i, p in enumerate(parsed.profiles)], []


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


def _cross_file_errors(loaded: list[tuple[Profile, str]]) -> list[ProfileError]:
    errors: list[ProfileError] = []
    seen: dict[str, str] = {}
    for profile, where in loaded:
        file, _, line = where.rpartition(":")
        if profile.slug in seen:
            errors.append(
                ProfileError(
                    file,
                    int(line) if line.isdigit() else None,
                    f"slug {profile.slug!r}",
                    f"duplicate: already defined at {seen[profile.slug]}",
                )
            )
        else:
            seen[profile.slug] = where
    defaults = [(p, where) for p, where in loaded if p.default]
    if len(defaults) > 1:
        first = defaults[0][1]
        for p, where in defaults[1:]:
            file, _, line = where.rpartition(":")
            errors.append(
                ProfileError(
                    file,
                    int(line) if line.isdigit() else None,
                    f"profile {p.slug!r} default",
                    f"only one profile can be the default; {defaults[0][0].slug!r} already is ({first})",
                )
            )
    return errors
