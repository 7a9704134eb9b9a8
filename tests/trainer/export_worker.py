"""Train the debug recipe 2 steps in each engine configuration, checkpoint, and save the fp32 masters DeepSpeed holds.

Started by tests/trainer/test_export.py under ``torchrun --nproc_per_node 2``. The masters are read from the live
engine (``safe_get_full_fp32_param``, a collective over the ZeRO partitions; at ZeRO 0 the parameters themselves
are the fp32 weights), which is independent of the checkpoint files the export reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param

from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.engine import shutdown_distributed
from vitvq.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("configs", nargs="+", help="ZERO:PRECISION, e.g. 1:bf16")
    args = p.parse_args()
    for spec in args.configs:
        zero, precision = spec.split(":")
        out = Path(args.out) / f"zero{zero}_{precision}"
        cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", [
            f"train.out_dir={out}", f"train.zero_stage={zero}", f"train.precision={precision}", "train.steps=2",
            "train.tracking=false", "train.progress=false", "train.val_every=0"])
        trainer = Trainer(cfg)
        trainer.build()
        for _ in range(2):
            trainer.train_step()
            trainer.step += 1
        trainer.save()
        gen = trainer.engines[trainer.task.export_engine].module
        masters = {}
        for name, param in gen.named_parameters():
            full = safe_get_full_fp32_param(param) if int(zero) > 0 else param.detach()
            masters[name] = full.detach().float().cpu().clone()
        buffers = {name: b.detach().cpu().clone() for name, b in gen.state_dict().items()  # persistent ones
                   if name not in masters}
        if trainer.dist.is_main:
            torch.save({"params": masters, "buffers": buffers,
                        "module_dtype": str(next(gen.parameters()).dtype)}, out / "masters.pt")
        trainer.tracker.close()
    shutdown_distributed()  # leave together, not in the interpreter's teardown


if __name__ == "__main__":
    main()
