"""Consolidated fp32 tokenizer weights from a training run, in the single-file format ``models/`` loads.

Stage 2 and evaluation read the tokenizer with ``Tokenizer.load_export(path)``; no DeepSpeed is needed there.
Used at the end of training (rank 0) and by ``launch/export_tokenizer.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from vitvq.models.tokenizer import Tokenizer
from vitvq.trainer.config import stage1_from_flat
from vitvq.trainer.engine import consolidated_fp32_state


def export_tokenizer(run_dir: str | Path, out: str | Path, tag: Optional[str] = None) -> Path:
    """Write ``out`` from checkpoint ``tag`` (default: the latest complete one) of ``run_dir``."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if tag is None:
        pointer = root / "latest"
        if not pointer.is_file():
            raise FileNotFoundError(f"no complete checkpoint in {root} (no 'latest' file): train first, or pass --tag")
        tag = pointer.read_text().strip()
    meta = json.loads((root / tag / "meta.json").read_text())
    cfg = stage1_from_flat(json.loads((run_dir / "config.json").read_text()))
    try:  # ZeRO 1/2: merge the fp32 master partitions
        state = consolidated_fp32_state(root / tag, "generator")
    except (FileNotFoundError, ValueError, KeyError):  # ZeRO 0 keeps the module weights whole
        files = sorted((root / tag / "generator").glob("mp_rank_*_model_states.pt"))
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in torch.load(files[0], map_location="cpu", weights_only=False)["module"].items()}
    model = Tokenizer(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Buffers that DeepSpeed's fp32 merge leaves out (EMA codebooks, fixed position tables) come from the module file.
    if missing:
        files = sorted((root / tag / "generator").glob("mp_rank_*_model_states.pt"))
        module_state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        still = [k for k in missing if k not in module_state]
        if still or unexpected:
            raise RuntimeError(f"checkpoint {root / tag} does not match the tokenizer config: missing {still}, "
                               f"unexpected {unexpected}")
        model.load_state_dict({**module_state, **state}, strict=True)
    extra = {"step": meta["step"], "mlflow_run_id": meta.get("mlflow_run_id"), "config_hash": meta.get("config_hash"),
             "recipe": meta.get("recipe"), "checkpoint": str(root / tag)}
    return model.save_export(out, extra)
