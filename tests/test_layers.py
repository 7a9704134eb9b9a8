"""Layers only look down: every ``vitvq`` import in the package folders, parsed (module level and inside functions,
relative imports resolved), must name a layer at or below the importing module's own.

    configs < models < data < evaluation < trainer < launch.orchestration < launch (the command-line scripts)

``configs`` is the typed-config machinery every layer uses; ``models`` are pure torch modules; ``data`` reads and
writes shards; ``evaluation`` measures; ``trainer`` runs one job (loop, tasks, engine, checkpoints, tracking);
``launch.orchestration`` places jobs on Ray (the Ray Train wrapper, actor pools, cluster checks, the pipeline);
``launch`` holds the thin entry points.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("configs", "models", "data", "evaluation", "trainer", "launch.orchestration", "launch")
"""Lowest first; a module belongs to the most specific (longest) entry that its dotted name starts with."""


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of a module named relative to ``vitvq`` (``trainer.engine``); None outside them."""
    best = None
    for i, name in enumerate(LAYERS):
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(LAYERS[best])):
            best = i
    return best


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module relative to ``vitvq``) for every vitvq import in the file at ``path``."""
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y, from .. import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
                names = ["vitvq." + n for n in names]
            else:
                names = [node.module or ""]
        else:
            continue
        found += [(node.lineno, n[len("vitvq."):]) for n in names if n.startswith("vitvq.")]
    return found


def upward_imports(root: Path) -> list[str]:
    """Every import in the layer folders under ``root`` that names a layer above its module's."""
    bad = []
    for folder in sorted({name.split(".")[0] for name in LAYERS}):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            own = layer_of(module)
            for line, target in imports_of(path, module):
                theirs = layer_of(target)
                if theirs is not None and own is not None and theirs > own:
                    bad.append(f"{path.relative_to(root)}:{line}: {module} ({LAYERS[own]}) imports {target} "
                               f"({LAYERS[theirs]}, a layer above)")
    return bad


def test_no_module_imports_a_layer_above_its_own() -> None:
    bad = upward_imports(ROOT)
    assert not bad, "imports that run upward (see tests/test_layers.py for the layers):\n" + "\n".join(bad)


def test_the_check_finds_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an upward import at module level, one inside a function and a relative one are found;
    a downward one is not."""
    for folder in ("configs", "models", "data", "evaluation", "trainer", "launch/orchestration"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "models" / "net.py").write_text("from vitvq.configs import check\nimport vitvq.models.other\n")
    (tmp_path / "data" / "load.py").write_text("def f():\n    from vitvq.trainer.engine import free_port\n")
    (tmp_path / "evaluation" / "pool.py").write_text("from ..launch.orchestration import pool\n")
    (tmp_path / "trainer" / "loop.py").write_text("import vitvq.launch.orchestration.pipeline\n")
    (tmp_path / "launch" / "orchestration" / "pipeline.py").write_text("from vitvq.trainer import loop\n")
    bad = upward_imports(tmp_path)
    assert [b.split(":")[0] for b in bad] == ["data/load.py", "evaluation/pool.py", "trainer/loop.py"], bad
    assert "imports trainer.engine (trainer, a layer above)" in bad[0]
    assert "imports launch.orchestration (launch.orchestration, a layer above)" in bad[1]
