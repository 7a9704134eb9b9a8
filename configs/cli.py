"""Command lines derived from config dataclasses: every launcher takes ``--config FILE`` and/or flags, plus dotted
``key=value`` overrides, and the dataclass itself validates them (``load``), as litgpt derives its CLI.

    parser = ConfigParser(SampleConfig, prog="launch/sample.py", description=__doc__)
    cfg = parser.config(argv)        # the YAML, then the flags, then the key=value overrides; one validated config
    with parser.refusals():          # a ConfigError raised by the job itself names the flag too
        result = sample(cfg)

One flag per top-level field: ``per_class`` -> ``--per-class``, its help the field's docstring (``field_docs``);
``bool`` -> ``--x/--no-x``, ``Literal`` -> choices, ``Optional[T]`` -> ``T``, ``list[int]`` -> ``0,1,2``;
``field(metadata={"flags": ("--cfg",)})`` adds spellings. A dataclass-typed field takes dotted overrides only.
``REQUIRED`` (a ClassVar of the config) lists the fields a command line must give, by flag, YAML or override.
A refused value exits with status 2, naming the flag as it was typed, the field and what to change:
``error: --top-k (top_k) = -1: must be >= 0 (0 = all tokens)``. Subcommands (``launch/evaluate.py``) are one
dataclass each: ``ConfigParser(commands={"gfid": GfidConfig, ...})`` and ``parser.command(argv)``.

Standard library only (plus ``configs.schema``): the lowest layer, importable by every launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import types
from typing import Any, Callable, Iterator, Literal, Mapping, NoReturn, Optional, Union, get_args, get_origin, \
    get_type_hints

from vitvq.configs.schema import ConfigError, ConfigFileError, field_docs, from_dict, load_data

_FIELD = "field:"  # namespace prefix of the field flags (a field may be called `config` or `overrides`)
_USED = "_flags_used"  # namespace attribute: field -> the spelling typed on the command line


def flag_of(name: str) -> str:
    """The derived flag of a field: ``per_class`` -> ``--per-class``."""
    return "--" + name.replace("_", "-")


def _record(namespace: argparse.Namespace, dest: str, option: Optional[str]) -> None:
    used = dict(getattr(namespace, _USED, None) or {})
    used[dest[len(_FIELD):]] = option
    setattr(namespace, _USED, used)


class _Store(argparse.Action):
    """Store the value and remember which spelling gave it (``--cfg`` or ``--cfg-scale``), for error messages."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, values)
        _record(namespace, self.dest, option_string)


class _Bool(argparse.BooleanOptionalAction):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _record(namespace, self.dest, option_string)


_ITEMS = {int: "integers", float: "numbers", str: "strings"}


def _comma_list(item: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [item(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {_ITEMS[item]}, got {text!r}") from None
    parse.__name__ = f"list of {_ITEMS[item]}"
    return parse


def _argument(tp: Any) -> Optional[dict[str, Any]]:
    """``add_argument`` keywords for a field of type ``tp``; None for a field left to dotted overrides (a
    dataclass section, a mapping)."""
    if get_origin(tp) in (Union, types.UnionType):  # Optional[T]: the flag takes a T
        args = [a for a in get_args(tp) if a is not type(None)]
        return _argument(args[0]) if len(args) == 1 else {"type": str}
    if tp is bool:
        return {"action": _Bool}
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        return {"type": type(choices[0]), "choices": choices}
    if tp in (int, float, str):
        return {"type": tp}
    if get_origin(tp) in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if len(set(args)) == 1 and args[0] in _ITEMS:
            return {"type": _comma_list(args[0]), "metavar": f"{args[0].__name__.upper()},..."}
    if dataclasses.is_dataclass(tp) or get_origin(tp) is dict:
        return None
    raise TypeError(f"configs.cli: no flag for a field of type {tp}; give it dotted overrides only")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _title(klass: type) -> str:
    """A flag group's title: the first line of the declaring class's own docstring."""
    doc = (klass.__dict__.get("__doc__") or "").strip()
    if not doc or doc.startswith(f"{klass.__name__}("):  # dataclass's generated signature
        return klass.__name__
    return doc.splitlines()[0].rstrip(".:")


class ConfigParser(argparse.ArgumentParser):
    """An ``argparse`` parser derived from a config dataclass ``cls``, or one subcommand per dataclass."""

    def __init__(self, cls: Optional[type] = None, *, commands: Optional[Mapping[str, type]] = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)
        self.cls: Optional[type] = None
        self.flags: dict[str, list[str]] = {}  # field -> its spellings, the derived one first
        self.commands: dict[str, ConfigParser] = {}
        self._used: dict[str, Optional[str]] = {}
        if cls is not None:
            self.bind(cls)
        if commands:
            sub = self.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ConfigParser)
            for name, ccls in commands.items():
                doc = (ccls.__doc__ or "").strip()
                self.commands[name] = sub.add_parser(name, help=doc.splitlines()[0] if doc else None,
                                                     description=doc or None)
                self.commands[name].bind(ccls)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(getattr(self.cls, "REQUIRED", ()))

    def bind(self, cls: type) -> None:
        """Add ``--config``, one flag per top-level field (grouped by the dataclass that declares it) and the
        positional overrides."""
        self.cls = cls
        self.add_argument("--config", dest="config_file", metavar="FILE",
                          help="YAML mapping of these fields; the flags and KEY=VALUE overrides apply over it")
        hints, docs = get_type_hints(cls), field_docs(cls)
        groups: dict[type, Any] = {cls: self}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            kw = _argument(hints[f.name])
            if kw is None:
                continue
            owner = next(k for k in reversed(cls.__mro__) if f.name in k.__dict__.get("__annotations__", {}))
            if owner not in groups:
                groups[owner] = self.add_argument_group(_title(owner))
            spellings = [flag_of(f.name), *f.metadata.get("flags", ())]
            self.flags[f.name] = spellings
            default = _default(f)
            notes = ["required"] if f.name in self.required else []
            if default is not dataclasses.MISSING and default is not None and f.name not in self.required:
                notes.append(f"default: {_shown(default)}")
            text = docs.get(f.name, "") + (f" ({'; '.join(notes)})" if notes else "")
            kw = {"action": _Store, **kw}
            if kw["action"] is _Store and "choices" not in kw:
                kw.setdefault("metavar", f.name.upper())
            groups[owner].add_argument(*spellings, dest=_FIELD + f.name, default=argparse.SUPPRESS,
                                       help=text.replace("%", "%%"), **kw)
        self.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                          help="dotted overrides of the fields, applied last (e.g. batch_size=8)")

    # -- parsing --------------------------------------------------------------------------------------------
    def config(self, argv: Optional[list[str]] = None) -> Any:
        """Parse ``argv`` into one validated config of ``cls``; a refused value exits with status 2 (``refuse``)."""
        ns, extra = self.parse_known_args(argv)
        return self._config(ns, extra)

    def command(self, argv: Optional[list[str]] = None) -> tuple[str, Any]:
        """Parse ``argv`` of a parser with subcommands: (the command, its validated config)."""
        ns, extra = self.parse_known_args(argv)
        return ns.command, self.commands[ns.command]._config(ns, extra)

    def _config(self, ns: argparse.Namespace, extra: list[str]) -> Any:
        unknown = [a for a in extra if a.startswith("-")]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        overrides = list(ns.overrides) + extra  # parse_known_args leaves overrides after a flag in `extra`
        stray = [a for a in overrides if "=" not in a]
        if stray:
            self.error(f"unrecognized arguments: {' '.join(stray)} (overrides are written key=value)")
        values = {k[len(_FIELD):]: v for k, v in vars(ns).items() if k.startswith(_FIELD)}
        self._used = dict(getattr(ns, _USED, None) or {})
        try:
            data = load_data(ns.config_file, overrides, values)
            missing = [n for n in self.required if n not in data]
            if missing:
                self.error(f"the following arguments are required: {', '.join(self.flags[n][-1] for n in missing)} "
                           f"(or the fields {', '.join(missing)} in --config)")
            return from_dict(self.cls, data)
        except ConfigFileError as e:
            self.error(f"--config: {e}")
        except ConfigError as e:
            self.refuse(e)
        except OSError as e:
            self.error(f"--config: {e}")

    # -- refusals -------------------------------------------------------------------------------------------
    def flag(self, name: str) -> Optional[str]:
        """The spelling of field ``name`` typed on the command line, else its derived flag (None: no flag)."""
        return self._used.get(name) or (self.flags[name][0] if name in self.flags else None)

    def message(self, err: ConfigError) -> str:
        """``--top-k (top_k) = -1: must be >= 0``: the flag, the field, the value and the hint, whose field names
        (those with an underscore: never an ordinary word) are written as flags."""
        def as_flag(m: re.Match) -> str:
            return self.flag(m.group(0)) or m.group(0)
        flag = self.flag(re.split(r"[.\[]", err.field, maxsplit=1)[0])
        hint = re.sub(r"\b[a-z]+(?:_[a-z0-9]+)+\b", as_flag, err.hint)
        return f"{flag + ' (' + err.field + ')' if flag else err.field} = {err.value!r}: {hint}"

    def refuse(self, err: ConfigError) -> NoReturn:
        """Exit with status 2 and the usage, naming the flag (argparse's own error path)."""
        self.error(self.message(err))

    @contextlib.contextmanager
    def refusals(self, cfg: Any = None) -> Iterator[None]:
        """A ``ConfigError`` raised inside (by the job, e.g. a value that does not fit the model file) exits as a
        refused flag would; with subcommands, ``cfg`` picks the subcommand's parser."""
        parser = self
        if self.commands and cfg is not None:
            parser = next(p for p in self.commands.values() if p.cls is type(cfg))
        try:
            yield
        except ConfigError as e:
            parser.refuse(e)


__all__ = ["ConfigParser", "flag_of"]
