"""The pipeline's skip rule: lineage hashes of step keys, and the ``step.json`` manifest each step writes last.

A step's key holds what its output depends on (``training_key``: a resolved recipe minus bookkeeping; the step's
settings; the sha256 of the files it reads); its lineage is the sha256 of that key. ``read_manifest`` returns a
step's record only when the manifest has the same lineage and every output is still there with its recorded
sha256, so ``launch/orchestration/pipeline.py`` reruns a step exactly when something it depends on, or its output, changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from vitvq.configs import to_dict
from vitvq.data.shards import sha256_file
from vitvq.trainer.checkpoint import atomic_write_text

MANIFEST = "step.json"
BOOKKEEPING = ("out_dir", "experiment", "run_name", "parent_run_id", "tracking", "progress")
"""``train.*`` fields that name where a training writes and how it shows progress, not what it computes: left out of
its lineage."""


def lineage_hash(name: str, key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"step": name, **key}, sort_keys=True, default=str).encode()).hexdigest()


def training_key(cfg: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved recipe minus bookkeeping (and minus ``drop``, top-level fields replaced by file hashes)."""
    data = to_dict(cfg)
    for k in BOOKKEEPING:
        data["train"].pop(k, None)
    for k in drop:
        section, _, name = k.partition(".")
        if name:
            data[section].pop(name, None)
        else:
            data.pop(section, None)
    return data


def read_manifest(folder: Path, lineage: str) -> Optional[dict[str, Any]]:
    """The step's record when its output is complete and unchanged; None when the step must run."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("lineage") != lineage:
        return None
    for name, out in manifest["outputs"].items():
        p = Path(out)
        if not p.exists():
            return None
        if p.is_file() and sha256_file(p) != manifest["sha256"].get(name):
            return None
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomically and last: a step folder without ``step.json`` is an unfinished step."""
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, default=str))


__all__ = ["MANIFEST", "BOOKKEEPING", "lineage_hash", "training_key", "read_manifest", "write_manifest"]
