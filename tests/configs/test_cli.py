"""configs/cli.py: command lines derived from config dataclasses. One flag per field (spelling, type, choices,
help from the docstring), ``--config`` then flags then dotted overrides, validation by the dataclass, refusals that
exit with status 2 naming the flag as typed, the field, the value and the fix; subcommands; and every README command
of the job launchers parsed by the parser derived from its config."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional

import pytest

from vitvq.configs import ConfigError, check
from vitvq.configs.cli import ConfigParser, flag_of

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Inner:
    depth: int = 2
    """Blocks."""

    def __post_init__(self) -> None:
        check(self.depth >= 1, "depth", self.depth, "must be >= 1")


@dataclass
class Base:
    """Shared settings of the toy jobs."""

    top_k: int = 0
    """Keep the k most likely tokens (0 = all); 100% means nothing here."""
    cfg_scale: float = field(default=2.0, metadata={"flags": ("--cfg",)})
    """Guidance scale."""

    def __post_init__(self) -> None:
        check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = all tokens)")


@dataclass
class Toy(Base):
    """A toy job."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("out",)
    out: str = ""
    """Output file."""
    per_class: int = 50
    """Samples per class."""
    mode: Literal["fast", "exact"] = "fast"
    """How to run."""
    progress: bool = True
    """Show a progress bar."""
    limit: Optional[int] = None
    """At most this many."""
    classes: Optional[list[int]] = None
    """Class indices."""
    rate: float = 0.5
    """A rate."""
    inner: Inner = field(default_factory=Inner)
    """A nested section: dotted overrides only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.per_class >= 1, "per_class", self.per_class, "must be >= 1 when top_k is set")
        check(self.out.endswith(".npz"), "out", self.out, "must end in .npz")


def refused(parser: ConfigParser, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The error line of a refused command line, after checking argparse's exit status 2."""
    with pytest.raises(SystemExit) as e:
        parser.config(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_one_flag_per_field_with_its_docstring_type_and_default(capsys) -> None:
    p = ConfigParser(Toy, prog="toy")
    assert p.flags == {"top_k": ["--top-k"], "cfg_scale": ["--cfg-scale", "--cfg"], "out": ["--out"],
                       "per_class": ["--per-class"], "mode": ["--mode"], "progress": ["--progress"],
                       "limit": ["--limit"], "classes": ["--classes"], "rate": ["--rate"]}  # no flag for `inner`
    assert flag_of("gpus_per_worker") == "--gpus-per-worker"
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for doc in ("Keep the k most likely tokens (0 = all); 100% means nothing here. (default: 0)",
                "--cfg-scale CFG_SCALE, --cfg CFG_SCALE Guidance scale. (default: 2.0)",
                "Output file. (required)", "--mode {fast,exact}", "--progress, --no-progress",
                "--classes INT,...", "Shared settings of the toy jobs:"):  # the base's fields under its docstring
        assert doc in text, doc


def test_flags_are_typed_values_and_validated_by_the_dataclass(tmp_path: Path) -> None:
    p = ConfigParser(Toy)
    cfg = p.config(["--out", "a.npz", "--top-k", "5", "--cfg", "1.5", "--mode", "exact", "--no-progress",
                    "--limit", "3", "--classes", "0, 4,2", "--rate", "1"])
    assert cfg == Toy(top_k=5, cfg_scale=1.5, out="a.npz", mode="exact", progress=False, limit=3, classes=[0, 4, 2],
                      rate=1.0)
    assert isinstance(cfg.rate, float) and p.flag("cfg_scale") == "--cfg"  # the spelling that was typed
    assert p.config(["--out=b.npz", "--cfg-scale=3"]) == Toy(out="b.npz", cfg_scale=3.0)


def test_config_file_then_flags_then_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("out: y.npz\ntop_k: 7\nper_class: 3\ninner: {depth: 5}\n")
    p = ConfigParser(Toy)
    assert p.config(["--config", str(recipe)]) == Toy(out="y.npz", top_k=7, per_class=3, inner=Inner(5))
    # a flag wins over the file, a dotted override over both; overrides may come before, between or after flags
    cfg = p.config(["top_k=9", "--config", str(recipe), "--top-k", "8", "--per-class", "4", "inner.depth=6"])
    assert (cfg.top_k, cfg.per_class, cfg.inner.depth, cfg.out) == (9, 4, 6, "y.npz")
    assert p.config(["--out", "z.npz", "classes=[1,2]", "progress=false"]).classes == [1, 2]


def test_refusals_name_the_flag_as_typed_the_field_the_value_and_the_fix(capsys, tmp_path: Path) -> None:
    p = ConfigParser(Toy, prog="toy")
    assert refused(p, ["--out", "a.npz", "--top-k", "-1"], capsys) == \
        "toy: error: --top-k (top_k) = -1: must be >= 0 (0 = all tokens)"
    assert refused(p, ["--out", "a.npy"], capsys) == "toy: error: --out (out) = 'a.npy': must end in .npz"
    # a field's name in the hint is written as its flag (the one typed, here the alias)
    assert refused(p, ["--out", "a.npz", "--cfg", "2", "--per-class", "0"], capsys) == \
        "toy: error: --per-class (per_class) = 0: must be >= 1 when --top-k is set"
    # a value from an override or the YAML is still named by its flag; a nested field by its dotted name
    assert refused(p, ["--out", "a.npz", "top_k=-2"], capsys).endswith("--top-k (top_k) = -2: must be >= 0 "
                                                                        "(0 = all tokens)")
    assert refused(p, ["--out", "a.npz", "inner.depth=0"], capsys).endswith("error: inner.depth = 0: must be >= 1")
    assert "unknown key; Toy has" in refused(p, ["--out", "a.npz", "nope=1"], capsys)
    assert "--rate (rate) = 'x': must be a number" in refused(p, ["--out", "a.npz", "rate=x"], capsys)


def test_what_argparse_refuses_and_what_is_missing(capsys, tmp_path: Path) -> None:
    p = ConfigParser(Toy, prog="toy")
    assert "argument --mode: invalid choice: 'slow'" in refused(p, ["--out", "a.npz", "--mode", "slow"], capsys)
    assert "argument --top-k: invalid int value: '1.5'" in refused(p, ["--out", "a.npz", "--top-k", "1.5"], capsys)
    assert "argument --classes: expected comma-separated integers, got '1,a'" in \
        refused(p, ["--out", "a.npz", "--classes", "1,a"], capsys)
    assert "the following arguments are required: --out" in refused(p, ["--top-k", "1"], capsys)
    assert "unrecognized arguments: stray" in refused(p, ["--out", "a.npz", "stray"], capsys)
    assert "unrecognized arguments: --nope" in refused(p, ["--out", "a.npz", "--nope", "x=1"], capsys)
    assert "--config: " in refused(p, ["--config", str(tmp_path / "missing.yaml")], capsys)
    (tmp_path / "r.yaml").write_text("out: r.npz\n")
    assert p.config(["--config", str(tmp_path / "r.yaml")]).out == "r.npz"  # required, given by the file


def test_a_file_or_override_that_is_not_yaml_names_the_file_line_and_column(capsys, tmp_path: Path) -> None:
    """Not a PyYAML traceback naming ``<unicode string>``: the file (or the override's key), where, and the fix."""
    p = ConfigParser(Toy, prog="toy")
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: a.npz\nclasses: [1, 2\ntop_k: 3\n")
    line = refused(p, ["--config", str(bad)], capsys)
    assert f"--config: config file {bad}: not valid YAML at line 3, column 6" in line and "fix the file" in line
    assert "<unicode string>" not in line
    (tmp_path / "list.yaml").write_text("- out\n")
    assert "holds a YAML list, but a recipe is a mapping" in refused(p, ["--config", str(tmp_path / "list.yaml")],
                                                                      capsys)
    line = refused(p, ["--out", "a.npz", "classes=[1,"], capsys)
    assert "(classes) = '[1,': not a YAML value (line 1, column 4" in line and "<unicode string>" not in line


def test_a_job_refusal_names_the_flag_too(capsys) -> None:
    p = ConfigParser(Toy, prog="toy")
    cfg = p.config(["--out", "a.npz", "--cfg", "3"])
    with pytest.raises(SystemExit) as e, p.refusals():
        raise ConfigError("cfg_scale", cfg.cfg_scale, "the model is unconditional: set cfg_scale 1")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --cfg (cfg_scale) = 3.0: the model is unconditional: "
                                                    "set --cfg 1")
    with p.refusals():  # anything but a ConfigError passes through
        pass
    with pytest.raises(ValueError), p.refusals():
        raise ValueError("not a config problem")


@dataclass
class Other:
    """Another toy job."""

    per_class: int = 1
    """Samples per class."""

    def __post_init__(self) -> None:
        check(self.per_class >= 1, "per_class", self.per_class, "must be >= 1")


def test_subcommands_are_one_dataclass_each(capsys) -> None:
    p = ConfigParser(commands={"toy": Toy, "other": Other}, prog="cmd")
    assert p.command(["toy", "--out", "a.npz", "--top-k", "2"]) == ("toy", Toy(out="a.npz", top_k=2))
    assert p.command(["other", "per_class=3"]) == ("other", Other(per_class=3))
    with pytest.raises(SystemExit) as e:
        p.command(["other", "--per-class", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(
        "cmd other: error: --per-class (per_class) = 0: must be >= 1")
    with pytest.raises(SystemExit):
        p.command(["other", "--top-k", "1"])  # a flag of the other subcommand
    cfg = Other(2)
    with pytest.raises(SystemExit), p.refusals(cfg):
        raise ConfigError("per_class", 2, "too many")
    assert "cmd other: error: --per-class (per_class) = 2: too many" in capsys.readouterr().err


# -- the real launchers ---------------------------------------------------------------------------------------
def readme_commands() -> list[tuple[str, list[str]]]:
    """Every ``python launch/X.py ...`` command of the README (continuation lines joined, comments dropped),
    for the four job launchers: (script, its arguments)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"python (launch/(?:sample|evaluate|encode_tokens|export_tokenizer)\.py)([^#;`]*)", line):
            out.append((m.group(1), shlex.split(m.group(2))))
    return out


def launcher_parser(script: str) -> ConfigParser:
    if script == "launch/sample.py":
        from vitvq.evaluation.jobs import SampleConfig
        return ConfigParser(SampleConfig)
    if script == "launch/evaluate.py":
        from vitvq.launch.evaluate import COMMANDS
        return ConfigParser(commands=COMMANDS)
    if script == "launch/encode_tokens.py":
        from vitvq.data.encode import EncodeConfig
        return ConfigParser(EncodeConfig)
    from vitvq.trainer.export import ExportConfig
    return ConfigParser(ExportConfig)


def test_every_readme_command_of_a_job_launcher_parses() -> None:
    """Each flag the README uses is one the derived parser knows; the complete commands (no ``...`` or ``[...]``
    placeholders) load into a validated config."""
    commands = readme_commands()
    assert {s for s, _ in commands} == {"launch/sample.py", "launch/evaluate.py", "launch/encode_tokens.py",
                                        "launch/export_tokenizer.py"}
    complete = 0
    for script, args in commands:
        parser = launcher_parser(script)
        sub = parser.commands[args[0]] if parser.commands else parser
        known = {o for a in sub._actions for o in a.option_strings}
        flags = [a.strip("[]").split("=")[0] for a in args if a.strip("[]").startswith("--")]
        assert set(flags) <= known, (script, args, set(flags) - known)
        if "..." not in args and not any(a.startswith("[") or "<" in a for a in args):
            cfg = parser.command(args)[1] if parser.commands else parser.config(args)
            complete += 1
            for flag in flags:  # each given flag reached its field
                name = next(n for n, spellings in sub.flags.items() if flag in spellings)
                assert getattr(cfg, name) is not None, (script, flag)
    assert complete >= 8
