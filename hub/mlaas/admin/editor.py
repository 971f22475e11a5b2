"""Change profiles and quotas in their YAML source: validated like `mlaas profiles check`, written
back keeping comments and layout, checked for concurrent edits, and recorded in the history.

Every item has a `version` (a hash of its content). A change names the version it was made
from; if the item changed since (another admin, or a hand edit of the file), the change is
refused with `Conflict` and nothing is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from ..profiles.loader import ProfileError, ProfileErrors, load_profile_texts, load_yaml_bounded
from ..profiles.model import GroupQuota, Profile
from .history import Change, ChangeLog
from .source import ProfileSource

KINDS: dict[str, tuple[str, type]] = {"profiles": ("slug", Profile), "quotas": ("group", GroupQuota)}
# fields left out of the file when they hold their default and the file did not have them
DEFAULTS: dict[str, Any] = {"description": "", "default": False, "enabled": True, "env": {}, "mig": {}, "dask": {}}


class EditError(Exception):
    status = 400


class NotFound(EditError):
    status = 404


class Conflict(EditError):
    """The item changed since the version the change was made from (or already exists)."""

    status = 409

    def __init__(self, message: str, current: dict[str, Any] | None = None):
        super().__init__(message)
        self.current = current


@dataclass(frozen=True)
class FieldError:
    field: str  # e.g. "memory.limit"; "" for the item as a whole
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class Invalid(EditError):
    status = 422

    def __init__(self, errors: list[FieldError]):
        super().__init__("; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors))
        self.errors = errors


def plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def version_of(item: dict[str, Any] | None) -> str | None:
    if item is None:
        return None
    return hashlib.sha256(json.dumps(plain(item), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


@dataclass
class _Located:
    file: str
    doc: CommentedMap
    seq: CommentedSeq
    index: int

    @property
    def node(self) -> CommentedMap:
        return self.seq[self.index]


class ProfileEditor:
    def __init__(self, source: ProfileSource, history: ChangeLog):
        self.source = source
        self.history = history

    # --- reading -----------------------------------------------------------------------------
    def items(self, kind: str) -> list[dict[str, Any]]:
        key_field, _ = self._kind(kind)
        out = []
        for name in self.source.names():
            doc = self._load(name)
            for node in (doc or {}).get(kind) or []:
                if isinstance(node, dict):
                    item = plain(node)
                    out.append({"key": str(item.get(key_field, "")), "file": name, "version": version_of(item), "item": item})
        return out

    def get(self, kind: str, key: str) -> dict[str, Any]:
        found = next((i for i in self.items(kind) if i["key"] == key), None)
        if found is None:
            raise NotFound(f"There is no {kind[:-1]} {key!r}.")
        return found

    def files(self) -> list[str]:
        return self.source.names()

    # --- changing ------------------------------------------------------------------------------
    def create(self, kind: str, item: dict[str, Any], who: str, file: str | None = None) -> Change:
        _require_mapping(kind, item)
        return self._change(kind, str(item.get(self._kind(kind)[0], "")), who, item, None, create_in=file or "")

    def update(self, kind: str, key: str, item: dict[str, Any], version: str | None, who: str) -> Change:
        _require_mapping(kind, item)  # None here would mean "delete": only delete() deletes
        return self._change(kind, key, who, item, version)

    def patch(self, kind: str, key: str, fields: dict[str, Any], version: str | None, who: str) -> Change:
        current = self.get(kind, key)
        merged = {**current["item"], **fields}
        for name, value in fields.items():
            if value is None:
                merged.pop(name, None)
        return self._change(kind, key, who, merged, version)

    def delete(self, kind: str, key: str, version: str | None, who: str) -> Change:
        return self._change(kind, key, who, None, version)

    def restore(self, change_id: int, who: str) -> Change:
        """Bring back the item as it was before change `change_id` (deleting it if it did not exist)."""
        old = self.history.get(change_id)
        if old is None:
            raise NotFound(f"There is no change #{change_id}.")
        if old.kind not in ("profiles", "quotas"):  # e.g. a deploy of the site's files
            raise EditError(f"Change #{change_id} ({old.action} of {old.key}) is not an edit of a profile or quota.")
        with self.source.lock():
            located = self._locate(old.kind, old.key)
            current_version = version_of(plain(located.node)) if located else None
        if old.before is None and located is None:
            raise Conflict(f"{old.kind[:-1]} {old.key!r} does not exist: nothing to restore to before change #{change_id}.")
        return self._change(
            old.kind, old.key, who, old.before, current_version,
            create_in=old.file, action="restore", restored_from=change_id, allow_create=True,
        )

    # --- the one write path ------------------------------------------------------------------------
    def _change(
        self,
        kind: str,
        key: str,
        who: str,
        new: dict[str, Any] | None,
        version: str | None,
        create_in: str | None = None,
        action: str | None = None,
        restored_from: int | None = None,
        allow_create: bool = False,
    ) -> Change:
        key_field, _ = self._kind(kind)
        if new is not None:
            if not isinstance(new, dict):
                raise Invalid([FieldError("", f"a {kind[:-1]} must be a mapping of fields")])
            new_key = new.get(key_field)
            if create_in is None and new_key != key:
                raise Invalid([FieldError(key_field, f"cannot be changed ({key!r}); create a new {kind[:-1]} instead")])
        with self.source.lock():
            located = self._locate(kind, key)
            if located is None:
                if create_in is None or (new is None and not allow_create):
                    raise NotFound(f"There is no {kind[:-1]} {key!r}.")
                return self._create(kind, key, who, new, create_in, action or "create", restored_from)
            before = plain(located.node)
            if create_in is not None and action is None:
                raise Conflict(f"A {kind[:-1]} {key!r} already exists ({located.file}).", before)
            if version != version_of(before):
                raise self._conflict(kind, key, before)
            if new is None:
                del located.seq[located.index]
            else:
                merge_into(located.node, self._tidy(new, before))
            self._validate_and_write(kind, located.file, located.doc, located.index if new is not None else None)
            after = plain(located.node) if new is not None else None
            return self.history.record(
                who=who, action=action or ("update" if new is not None else "delete"), kind=kind, key=key,
                file=located.file, before=before, after=after, restored_from=restored_from,
            )

    def _create(self, kind, key, who, new, file, action, restored_from) -> Change:
        key_field, _ = self._kind(kind)
        if not key:
            raise Invalid([FieldError(key_field, "is required")])
        file = file or self._default_file(kind)
        doc = self._load(file) if file in self.source.names() else CommentedMap()
        if doc is None:
            doc = CommentedMap()
        seq = doc.get(kind)
        if seq is None:
            seq = doc[kind] = CommentedSeq()
        item = CommentedMap()
        merge_into(item, self._tidy(new, None))
        seq.append(item)
        self._validate_and_write(kind, file, doc, len(seq) - 1)
        return self.history.record(
            who=who, action=action, kind=kind, key=key, file=file, before=None, after=plain(item),
            restored_from=restored_from,
        )

    def _validate_and_write(self, kind: str, file: str, doc: CommentedMap, index: int | None) -> None:
        text = self._dump(doc)
        texts = {name: self.source.read(name) for name in self.source.names()}
        before_errors = _errors(list(texts.items()))
        texts[file] = text
        new_errors = [e for e in _errors(list(texts.items())) if _sans_line(e) not in {_sans_line(b) for b in before_errors}]
        if new_errors:
            raise Invalid([to_field_error(e, kind, file, index) for e in new_errors])
        self.source.write(file, text)

    # --- helpers ---------------------------------------------------------------------------------
    def _conflict(self, kind: str, key: str, current: dict[str, Any]) -> Conflict:
        last = self.history.last(kind, key)
        by = f" by {last.who} (change #{last.id})" if last else " (in the file)"
        return Conflict(
            f"{kind[:-1].capitalize()} {key!r} was changed{by} since you loaded it; "
            "reload it, check the change and make yours again.",
            current,
        )

    def _locate(self, kind: str, key: str) -> _Located | None:
        key_field, _ = self._kind(kind)
        for name in self.source.names():
            doc = self._load(name)
            seq = (doc or {}).get(kind)
            if isinstance(seq, CommentedSeq):
                for i, node in enumerate(seq):
                    if isinstance(node, dict) and str(node.get(key_field)) == key:
                        return _Located(name, doc, seq, i)
        return None

    def _load(self, name: str) -> Any:
        try:
            text = self.source.read(name)
            load_yaml_bounded(text)  # refuses alias bombs and oversized files before anything walks them
            return _yaml().load(text)
        except Exception:
            return None  # a broken file: the checker reports it; nothing in it can be edited here

    def _dump(self, doc: CommentedMap) -> str:
        out = io.StringIO()
        _yaml().dump(doc, out)
        return out.getvalue()

    def _default_file(self, kind: str) -> str:
        for name in self.source.names():
            doc = self._load(name)
            if isinstance(doc, dict) and doc.get(kind):
                return name
        return f"{kind}.yaml"

    @staticmethod
    def _kind(kind: str) -> tuple[str, type]:
        if kind not in KINDS:
            raise NotFound(f"Unknown kind {kind!r}; use profiles or quotas.")
        return KINDS[kind]

    @staticmethod
    def _tidy(new: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
        """Leave out fields that hold their default and that the file did not have."""
        had = set(before or {})
        return {
            k: v for k, v in new.items()
            if v is not None and (k in had or not (k in DEFAULTS and v == DEFAULTS[k]))
        }


def _require_mapping(kind: str, item: Any) -> None:
    if not isinstance(item, dict):
        raise Invalid([FieldError("", f"a {kind[:-1]} must be a mapping of fields, not {type(item).__name__}")])


def merge_into(node: CommentedMap, new: dict[str, Any]) -> None:
    """Update a YAML mapping in place: unchanged keys keep their comments and flow style."""
    for key in [k for k in node if k not in new]:
        del node[key]
    for key, value in new.items():
        old = node.get(key)
        if isinstance(value, dict) and isinstance(old, CommentedMap):
            merge_into(old, value)
        elif isinstance(value, list) and isinstance(old, CommentedSeq):
            if plain(old) != value:
                old.clear()
                old.extend(value)
        elif key not in node or plain(old) != value:
            node[key] = _styled(value)


def _styled(value: Any) -> Any:
    """New small mappings and lists in flow style, like the shipped files: `cpu: {limit: 2}`."""
    if isinstance(value, dict):
        node = CommentedMap((k, _styled(v)) for k, v in value.items())
        if all(not isinstance(v, (dict, list)) for v in value.values()) and len(value) <= 4:
            node.fa.set_flow_style()
        return node
    if isinstance(value, list):
        seq = CommentedSeq(_styled(v) for v in value)
        if all(not isinstance(v, (dict, list)) for v in value):
            seq.fa.set_flow_style()
        return seq
    return value


def _errors(texts: list[tuple[str, str]]) -> list[ProfileError]:
    try:
        load_profile_texts(texts)
    except ProfileErrors as e:
        return e.errors
    return []


def _sans_line(e: ProfileError) -> tuple[str, str, str]:
    return (e.file, e.where, e.message)


def to_field_error(e: ProfileError, kind: str, file: str, index: int | None) -> FieldError:
    """An error of the checker as one of the edited item's fields, where it is about it."""
    where = e.where
    if index is not None and e.file == file:
        m = re.match(rf"^{kind}\[{index}\](?: \([^)]*\))?\.?(.*)$", where)
        if m:
            return FieldError(m.group(1), e.message)
    if where.startswith("slug "):
        return FieldError("slug", e.message)
    if where.startswith("profile '") and where.endswith(" default"):
        return FieldError("default", e.message)
    if where.startswith("quota for group "):
        return FieldError("group", e.message)
    return FieldError("", str(e))
