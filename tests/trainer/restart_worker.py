"""Restart every code of the debug tokenizer after one step in each engine configuration, on 2 ranks, and record
what DeepSpeed holds right after the restart and one optimizer step later.

Started by tests/trainer/test_codebook_restarts.py under ``torchrun --nproc_per_node 2``. Each configuration
writes ``<out>/<config>.pt`` (rank 0) with the module rows, the fp32 master rows and the Adam moments read from
the live engine, plus every rank's codebook for the cross-rank check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.engine import _link_optimizer_states, shutdown_distributed
from vitvq.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def engine_view(engine, param: torch.nn.Parameter, zero: int) -> dict[str, torch.Tensor]:
    """The parameter's fp32 master value and Adam moments as the optimizer holds them (collective at ZeRO 1/2)."""
    if zero == 0:
        state = getattr(engine.optimizer, "optimizer", engine.optimizer).state[param]
        master, moments = param.detach(), (state["exp_avg"], state["exp_avg_sq"])
    else:
        _link_optimizer_states(engine.optimizer)  # deepspeed 0.19.8 leaves groups >= 1 unlinked (see engine.py)
        master = safe_get_full_fp32_param(param)
        moments = tuple(safe_get_full_optimizer_state(param, k) for k in ("exp_avg", "exp_avg_sq"))
    return {"master": master.float().cpu().clone(), "exp_avg": moments[0].float().cpu().clone(),
            "exp_avg_sq": moments[1].float().cpu().clone()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("configs", nargs="+", help="ZERO:PRECISION, e.g. 1:bf16")
    args = p.parse_args()
    for spec in args.configs:
        zero, precision = int(spec.split(":")[0]), spec.split(":")[1]
        cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", [
            f"train.out_dir={Path(args.out) / spec.replace(':', '_')}", f"train.zero_stage={zero}",
            f"train.precision={precision}", "train.tracking=false", "train.progress=false", "train.val_every=0",
            "model.quantizer.init=random", "model.quantizer.restart_dead_codes=true",
            "model.quantizer.restart_every=1", "model.quantizer.dead_threshold=1e9"])  # every code is dead
        trainer = Trainer(cfg)
        trainer.build()
        gen = trainer.engines["generator"]
        codebook = trainer.task.gen.quantizer.codebook
        quantizer = trainer.task.gen.quantizer
        # train_step() is one optimizer step without the Trainer's after_step hook: the restart runs only where
        # this script calls end_step, at the end of step 1 (all 64 codes, from the step's batch vectors).
        trainer.train_step()
        trainer.step += 1
        before = engine_view(gen, codebook.weight, zero)
        restarted = quantizer.end_step(1)
        after_restart = engine_view(gen, codebook.weight, zero)
        module_after_restart = codebook.weight.detach().float().cpu().clone()
        trainer.train_step()  # the next optimizer step, with no restart after it
        trainer.step += 1
        after_step = engine_view(gen, codebook.weight, zero)
        mine = codebook.weight.detach().float().cpu().clone()
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        if trainer.dist.is_main:
            torch.save({"restarted": restarted, "before": before, "after_restart": after_restart,
                        "module_after_restart": module_after_restart, "after_step": after_step,
                        "ranks": every, "lr": gen.get_lr()[0]}, Path(args.out) / f"{spec.replace(':', '_')}.pt")
        trainer.tracker.close()
    shutdown_distributed()  # leave together, not in the interpreter's teardown


if __name__ == "__main__":
    main()
