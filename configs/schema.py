"""Typed configuration: dataclass schemas loaded from YAML with dotted ``key=value`` overrides.

Every config section in the project is a plain ``@dataclass`` whose fields carry a type and a one-line
attribute docstring, and whose ``__post_init__`` refuses bad values with :class:`ConfigError`. This module
turns nested dicts (YAML, command-line overrides, MLflow params, export files) into those dataclasses and
back, refusing unknown keys and wrongly typed values with the dotted name of the field.

A dataclass-typed field also accepts a preset name: ``encoder: small`` (or ``{preset: small, depth: 4}``)
is looked up in the class's ``PRESETS`` dict, so recipes and overrides can say ``model.encoder=base``.

A field that picks a builder (``quantizer.kind``, ``arch``) is a plain ``str`` that its ``__post_init__`` resolves
with :func:`lookup` in the model module's registry table: the allowed values are that table's keys, not a second
``Literal`` list that could disagree with it.

Used by ``trainer.config`` (the job schema) and by ``models.tokenizer`` (loading exported weights);
it imports nothing but the standard library and PyYAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is refused at load: names the field, the value and what to change."""

    def __init__(self, field: str, value: Any, hint: str):
        self.field, self.value, self.hint = field, value, hint
        super().__init__(f"config field '{field}' = {value!r}: {hint}")


class ConfigFileError(ConfigError):
    """A recipe file that cannot be read as a config (not YAML, not a mapping): names the file, where, and the fix."""

    def __init__(self, path: str | Path, hint: str):
        self.field, self.value, self.hint = "config", str(path), hint
        ValueError.__init__(self, f"config file {path}: {hint}")


def check(cond: bool, field: str, value: Any, hint: str) -> None:
    """Raise :class:`ConfigError` unless ``cond``; the one-liner used by every ``__post_init__``."""
    if not cond:
        raise ConfigError(field, value, hint)


def lookup(table: Mapping[str, T], key: Any, field: str, what: str) -> T:
    """``table[key]`` for a registry (kind -> builder), else a :class:`ConfigError` naming ``field``, the value and
    the known keys, sorted. Config ``__post_init__`` and builders both resolve a kind here, so the allowed values
    are the table's keys and an unknown kind cannot fall through to some other model (issue 19)."""
    if not isinstance(key, str) or key not in table:
        raise ConfigError(field, key, f"not a {what}; known: {', '.join(sorted(table))}")
    return table[key]


def _prefix_error(err: ConfigError, prefix: str) -> ConfigError:
    return ConfigError(f"{prefix}.{err.field}" if prefix else err.field, err.value, err.hint)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, value, f"must not be null (expected {tp})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(e.hint)
        raise ConfigError(path, value, f"does not match {tp}: " + "; ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(path, value, f"must be one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, f"must be a list ({tp})")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(path, value, f"must have exactly {len(args)} items")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, "must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, value, "must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(path, value, "must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "must be a string")
    raise ConfigError(path, value, f"unsupported field type {tp}")


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict (or a preset name), validating every field."""
    presets = getattr(cls, "PRESETS", None)
    if isinstance(data, str):
        if not presets or data not in presets:
            raise ConfigError(path, data, f"unknown preset; choose one of {sorted(presets or {})}")
        return dataclasses.replace(presets[data])
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(path, data, f"must be a mapping of {cls.__name__} fields")
    data = dict(data)
    base: dict[str, Any] = {}
    if "preset" in data and "preset" not in {f.name for f in dataclasses.fields(cls)}:
        name = data.pop("preset")
        if not presets or name not in presets:
            raise ConfigError(f"{path}.preset" if path else "preset", name,
                              f"unknown preset; choose one of {sorted(presets or {})}")
        base = {f.name: getattr(presets[name], f.name) for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(where, data[unknown[0]], f"unknown key; {cls.__name__} has {sorted(names)}")
    kwargs = dict(base)
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        sub = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict) and "preset" not in value:
            # A partial section refines what the field would otherwise be: the preset's value, else the field's own
            # default (``train: TrainConfig = field(default_factory=lambda: TrainConfig(experiment="x"))``), not
            # the section class's bare defaults, which would silently undo the outer default.
            start = base[name] if name in base else _field_default(defaults[name])
            if start is not None:
                value = {**to_dict(start), **value}
        kwargs[name] = _convert(hints[name], value, sub)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise _prefix_error(e, path) from None


def _field_default(f: dataclasses.Field) -> Any:
    """The field's default value, or None when it has none that validates on its own (``data`` needs shards)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        try:
            return f.default_factory()  # type: ignore[misc]
        except ConfigError:
            return None
    return None if f.default is dataclasses.MISSING else f.default


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-Python dict (tuples become lists) of a config dataclass."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """Flat ``{"model.encoder.width": 512, ...}`` view, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                walk(v, key + ".")
            else:
                out[key] = v
    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`: dotted keys back into a nested dict."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        set_dotted(nested, key, value)
    return nested


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.get(p)
        if isinstance(nxt, str):  # a preset name being refined by a nested override
            nxt = {"preset": nxt}
        elif not isinstance(nxt, dict):
            nxt = {}
        d[p] = nxt
        d = nxt
    d[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=100", "model.encoder=base"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(item, item, "overrides are written key=value with a dotted key, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(key.strip(), raw, f"not a YAML value ({_yaml_problem(e)}); quote it or fix the "
                                                f"brackets, e.g. {key.strip()}='[1, 2]'") from None
        set_dotted(nested, key.strip(), value)
    return nested


def _yaml_problem(e: Exception) -> str:
    """A YAML error in one line, at the file's line and column (1-based), without PyYAML's ``<unicode string>``."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e).strip()


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``over`` wins. A preset-name string in ``base`` refined by a dict keeps its name."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), str) and "preset" not in v:
            out[k] = {"preset": out[k], **v}
        else:
            out[k] = v
    return out


def load_data(path: str | Path | None = None, overrides: list[str] | None = None,
              values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The nested dict :func:`load` validates: the YAML file, then ``values`` (already parsed, e.g. command-line
    flags), then the dotted ``key=value`` overrides, each merged over the one before."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigFileError(path, f"not valid YAML at {_yaml_problem(e)}; fix the file") from None
        if not isinstance(data, dict):
            raise ConfigFileError(path, f"holds a YAML {type(data).__name__}, but a recipe is a mapping of sections "
                                        f"(model:, train:, ...)")
    data = merge(data, dict(values or {}))
    return merge(data, parse_overrides(list(overrides or [])))


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         values: Mapping[str, Any] | None = None) -> T:
    """Load ``cls`` from a YAML file plus ``values`` and ``key=value`` overrides; every value validated once, here."""
    return from_dict(cls, load_data(path, overrides, values))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), for ``--help`` output; fields
    inherited from dataclass bases keep their base's docstring unless the subclass gives its own."""
    import ast
    import inspect
    import textwrap
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = b.value.value.strip()
    return docs


__all__ = ["ConfigError", "check", "lookup", "from_dict", "to_dict", "flatten", "unflatten", "parse_overrides",
           "merge", "load", "load_data", "field_docs", "set_dotted"]
_ = typing  # keep `typing` importable for get_type_hints on modules using string annotations
