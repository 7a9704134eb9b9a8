"""Train the debug tokenizer with the Trainer on this world size, recording what test_world_size.py checks.

Started under ``torchrun --nproc_per_node N world_size_worker.py --out RUN --record DIR [--dump-at S] overrides...``.
Writes into DIR:

- ``keys_rank{r}.json``: every batch rank ``r`` consumed, in order, as [step, stream batch index, epoch, keys];
- ``start_rank{r}.json``: where the stream of rank ``r`` stands once the Trainer is built (resumed or not);
- ``engines_step{S}.pt`` (rank 0): each engine's fp32 master weights, Adam moments and step counts, learning rate
  and schedule step, read from the live engine with DeepSpeed's own getters right after the checkpoint of step S;
- ``engines_resumed.pt`` (rank 0): the same, right after a resume, before any step;
- with either, each engine's buffers (``"buffers"``: codebooks, their k-means flag, EMA statistics, windows) and the
  task's state (``"task"``), and per rank ``pools_step{S}_rank{r}.pt`` / ``pools_resumed_rank{r}.pt``: that rank's
  dead-code restart pools.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.engine import _link_optimizer_states, shutdown_distributed
from vitvq.trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def engine_state(engine: Any) -> dict[str, Any]:
    """Collective (ZeRO-2 gathers the partitions): {name: (fp32, exp_avg, exp_avg_sq)}, Adam and schedule steps, lr."""
    _link_optimizer_states(engine.optimizer)  # deepspeed 0.19.8 leaves groups >= 1 unlinked (see engine.py)
    params = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # not trained by this engine
            continue
        moments = [safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")]
        params[name] = [t.detach().float().cpu().clone() for t in (full, *moments)]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    steps = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
    params_names = {n for n, _ in engine.module.named_parameters()}
    buffers = {n: b.detach().cpu().clone() for n, b in engine.module.state_dict(keep_vars=True).items()
               if n not in params_names}
    return {"params": params, "buffers": buffers, "adam_steps": steps, "lr": list(engine.get_lr()), "global_steps": engine.global_steps,
            "schedule_step": engine.lr_scheduler.last_epoch}  # the lr above comes from the optimizer's groups


def dump(trainer: Trainer, path: Path, pools: Path) -> None:
    states = {name: engine_state(engine) for name, engine in trainer.engines.items()}
    torch.save(trainer.task.rank_state_dict()["restart_pools"], pools)
    if trainer.dist.is_main:
        torch.save({**states, "task": trainer.task.state_dict()}, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--dump-at", type=int, default=-1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    record = Path(args.record)
    record.mkdir(parents=True, exist_ok=True)
    cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", [f"train.out_dir={args.out}", *args.overrides])
    trainer = Trainer(cfg)
    trainer.build()
    rank, stream = trainer.dist.rank, trainer.stream
    (record / f"start_rank{rank}.json").write_text(json.dumps(
        {"step": trainer.step, "batches": stream.batches, "epoch": stream.epoch,
         "batches_per_epoch": stream.batches_per_epoch, "accumulation": trainer.accum}))
    if trainer.step > 0:
        dump(trainer, record / "engines_resumed.pt", record / f"pools_resumed_rank{rank}.pt")

    consumed: list[list[Any]] = []
    next_batch, save = trainer.next_batch, trainer.save

    def recording_next_batch() -> dict[str, Any]:
        batch = next_batch()
        index = stream.batches - 1
        consumed.append([trainer.step + 1, index, index // stream.batches_per_epoch, list(batch["key"])])
        return batch

    def dumping_save() -> None:
        save()
        if trainer.step == args.dump_at:
            dump(trainer, record / f"engines_step{trainer.step}.pt", record / f"pools_step{trainer.step}_rank{rank}.pt")

    trainer.next_batch, trainer.save = recording_next_batch, dumping_save
    trainer.fit()
    (record / f"keys_rank{rank}.json").write_text(json.dumps(consumed))
    shutdown_distributed()  # leave together, not in the interpreter's teardown


if __name__ == "__main__":
    main()
