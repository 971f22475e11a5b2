"""What imports made of the zygote's environment, and how a forked server gets its own (see the
package doc): which variables imports looked up (`EnvironmentReads`), the stand-in values the
zygote imports with (`plant_stand_ins`), and where those ended up (`StandIns`)."""

from __future__ import annotations

import os
import sys
from pathlib import PurePath

HOME_VARIABLE = "HOME"
# Variables that differ from server to server and that imports may read. The zygote imports with a
# unique stand-in value for each (its home directory for HOME); where a stand-in ends up in module
# state, a forked server gets its own value instead, as its own import would have computed.
PER_SERVER = (
    "USER", "JUPYTERHUB_USER", "JUPYTERHUB_SERVER_NAME", "JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL",
    "JUPYTERHUB_BASE_URL", "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_HOST",
    "JUPYTERHUB_CLIENT_ID", "JUPYTERHUB_OAUTH_CALLBACK_URL", "JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_PUBLIC_HUB_URL",
    "JUPYTERHUB_DEFAULT_URL", "JUPYTERHUB_ROOT_DIR",
)
LOOKUPS = ("get", "__contains__", "getenv")  # how a lookup reaches os.environ (else: a listing)


class EnvironmentReads:
    """Which environment variables imports look up (os.environ[...], .get, `in`, os.getenv),
    with the value each had; a listing (items(), copy()) is not a lookup of each."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def __enter__(self) -> "EnvironmentReads":
        cls = type(os.environ)
        self._saved = cls.__getitem__, cls.__contains__
        getitem, contains = self._saved
        reads = self

        def looked_up(frame) -> bool:  # type: ignore[no-untyped-def]
            code = frame.f_code
            if "collections_abc" in code.co_filename or code.co_filename.endswith(("os.py", "<frozen os>")):
                return code.co_name in LOOKUPS
            return True

        def note(env, key) -> None:  # type: ignore[no-untyped-def]
            if env is os.environ:
                reads.keys.add(key)
            elif env is getattr(os, "environb", None):
                reads.keys.add(os.fsdecode(key))

        def __getitem__(env, key):  # type: ignore[no-untyped-def]
            if looked_up(sys._getframe(1)):
                note(env, key)
            return getitem(env, key)

        def __contains__(env, key):  # type: ignore[no-untyped-def]
            note(env, key)
            return contains(env, key)

        cls.__getitem__, cls.__contains__ = __getitem__, __contains__  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        cls = type(os.environ)
        cls.__getitem__, cls.__contains__ = self._saved  # type: ignore[method-assign]

    def snapshot(self) -> dict[str, str | None]:
        return {key: os.environ.get(key) for key in sorted(self.keys)}


def plant_stand_ins() -> dict[str, str]:
    """Give each PER_SERVER variable a unique stand-in value (HOME is the zygote's own home)."""
    tag = os.urandom(6).hex()
    planted = {name: f"mlaas-zygote-{name.lower()}-{tag}" for name in PER_SERVER}
    os.environ.update(planted)
    planted[HOME_VARIABLE] = os.environ[HOME_VARIABLE]
    return planted


class StandIns:
    """Where the stand-in values ended up in module state (a module's constants, a class's
    attributes and trait defaults, a module-level object's attributes: JupyterLab's settings
    directory, send2trash's trash, HubAuth's API URL, the kernel session's user name), so that a
    forked server can put its own values there."""

    def __init__(self, planted: dict[str, str], import_env: dict[str, str | None]):
        self.planted = planted
        self.import_env = import_env
        self.places: list[tuple[object, str]] = []  # (a namespace dict, a class or an object; name)
        self.traits: list[object] = []  # trait objects whose default_value holds one
        seen: set[int] = set()
        environments = (os.environ, getattr(os, "environb", None))
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict) or module.__name__ in ("os", "posix"):  # the environment itself
                continue
            for name, value in list(namespace.items()):
                if any(value is e for e in environments):
                    continue
                if self._holds(value):
                    self.places.append((namespace, name))
                if id(value) in seen or isinstance(value, (type(sys), int, float, str, bytes)):
                    continue
                seen.add(id(value))
                self._scan_object(value, module)
        self.consumed = sorted(k for k, v in planted.items() if k in import_env and not self._anywhere(v))

    def _scan_object(self, value: object, module: object) -> None:
        if isinstance(value, type):
            if value.__module__ != getattr(module, "__name__", None):
                return
            attributes = dict(vars(value))
        else:
            try:
                attributes = object.__getattribute__(value, "__dict__")
            except (AttributeError, TypeError):
                return
            if not isinstance(attributes, dict):
                return
        for name, attribute in list(attributes.items()):
            if self._holds(attribute):
                self.places.append((value, name))
            try:  # a trait's default, read without running any __getattr__ (lazy modules import)
                own = object.__getattribute__(attribute, "__dict__")
            except (AttributeError, TypeError):
                continue
            if isinstance(own, dict) and self._holds(own.get("default_value")):
                self.traits.append(attribute)

    def _anywhere(self, stand_in: str) -> bool:
        def has(value: object) -> bool:
            return stand_in in (os.fsdecode(value) if isinstance(value, bytes) else str(value))

        return any(has(self._value(owner, name)) for owner, name in self.places) or any(
            has(getattr(t, "default_value", "")) for t in self.traits)

    def _holds(self, value: object, depth: int = 2) -> bool:
        if isinstance(value, (list, tuple)):
            return depth > 0 and any(self._holds(v, depth - 1) for v in value)
        if isinstance(value, dict):  # e.g. traitlets' per-class cache of static defaults
            return depth > 0 and any(self._holds(v, depth - 1) for v in list(value.values()))
        if isinstance(value, bytes):
            return any(os.fsencode(v) in value for v in self.planted.values())
        return isinstance(value, (str, PurePath)) and any(v in str(value) for v in self.planted.values())

    @staticmethod
    def _value(owner: object, name: str) -> object:
        if isinstance(owner, dict):
            return owner[name]
        if isinstance(owner, type):
            return vars(owner)[name]
        return object.__getattribute__(owner, "__dict__")[name]

    @staticmethod
    def _store(owner: object, name: str, value: object) -> None:
        if isinstance(owner, dict):
            owner[name] = value
        elif isinstance(owner, type):
            setattr(owner, name, value)  # a class's namespace is read-only as a mapping
        else:
            object.__getattribute__(owner, "__dict__")[name] = value

    def _replaced(self, value: object, env: dict[str, str]) -> object:
        if isinstance(value, (list, tuple)):
            return type(value)(self._replaced(v, env) for v in value)
        if isinstance(value, dict):
            return {k: self._replaced(v, env) for k, v in value.items()}
        if isinstance(value, bytes):
            for name, stand_in in self.planted.items():
                value = value.replace(os.fsencode(stand_in), os.fsencode(env.get(name, "")))
            return value
        if isinstance(value, (str, PurePath)):
            text = str(value)
            for name, stand_in in self.planted.items():
                text = text.replace(stand_in, env.get(name, ""))
            return text if isinstance(value, str) else type(value)(text)
        return value

    def describe(self) -> list[str]:
        def where(owner: object) -> str:
            if isinstance(owner, dict):
                return str(owner.get("__name__", "?"))
            return owner.__qualname__ if isinstance(owner, type) else type(owner).__qualname__ + "()"

        return [f"{where(owner)}.{name}" for owner, name in self.places] + [
            f"trait {getattr(t, 'name', '?')}" for t in self.traits]

    def mismatch(self, env: dict[str, str]) -> list[str]:
        """The variables an import looked up whose value for this server would have given a
        different import (HOME and the planted ones are fine: their values are put in place)."""
        differ = [k for k in self.consumed if k in env]
        for key, value in self.import_env.items():
            if key in self.planted:
                continue
            expected = None if value is None else self._replaced(value, env)
            if env.get(key) != expected:
                differ.append(key)
        return differ

    def put_in_place(self, env: dict[str, str]) -> None:
        for owner, name in self.places:
            self._store(owner, name, self._replaced(self._value(owner, name), env))
        for trait in self.traits:
            trait.default_value = self._replaced(trait.default_value, env)  # type: ignore[attr-defined]
