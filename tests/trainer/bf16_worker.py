"""Run stage-1 steps in bf16 on real DeepSpeed engines over deterministic batches; rank 0 saves what they computed.

Started by tests/trainer/test_bf16.py under ``torchrun --nproc_per_node 2``: the real ``Stage1Task`` micro-step on
the engines of ``vitvq.trainer.engine.build_engine`` with ``train.precision=bf16`` (the rest from the overrides),
the batches and gradient recording of ``parity_worker.py``. Besides the bf16 module state and the mean gradient
of every step, it records DeepSpeed's fp32 master weights (``safe_get_full_fp32_param``, a collective at ZeRO 1/2)
at the start of every step and after the last one, i.e. after the task's ``after_step`` hook, where anything that
writes the weights between optimizer steps has written them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as tdist
from deepspeed.utils import safe_get_full_fp32_param

from parity_worker import RecordingEngine, global_batch, snapshot
from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.engine import build_engine, init_distributed
from vitvq.trainer.stage1 import Stage1Task

ROOT = Path(__file__).resolve().parents[2]


def masters(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's fp32 master value (the module's own value where DeepSpeed keeps none)."""
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)  # collective: every rank, same order
            out[name] = (p.detach() if full is None else full).float().clone()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", args.overrides)
    assert cfg.train.precision == "bf16"
    dist = init_distributed()
    torch.manual_seed(cfg.train.seed)
    task = Stage1Task(cfg, dist)
    modules = task.build_modules()
    init = {n: snapshot(m) for n, m in modules.items()}
    init["lpips"] = snapshot(task.loss.perceptual)
    accum = cfg.train.accumulation(dist.world_size)
    engines = {n: RecordingEngine(build_engine(modules[n], task.optim_config(n), cfg.train, accum,
                                               task.schedule_steps(n)))
               for n in task.engine_names}
    task.attach(engines)
    task.on_start()
    mb = cfg.train.micro_batch_size
    states, fp32 = [], []
    for step in range(args.steps):
        states.append({n: snapshot(e.module) for n, e in engines.items()})
        fp32.append({n: masters(e) for n, e in engines.items()})
        x = global_batch(step, cfg.train.global_batch_size, cfg.model.image_size)
        for m in range(accum):
            chunk = m * dist.world_size + dist.rank
            assert task.micro_step({"image": x[chunk * mb:(chunk + 1) * mb]}, step) is not None
        task.after_step(step + 1)  # the Trainer's call, with its step count
    states.append({n: snapshot(e.module) for n, e in engines.items()})
    fp32.append({n: masters(e) for n, e in engines.items()})
    for n, e in engines.items():
        assert len(e.grads) == args.steps, f"{n}: {len(e.grads)} optimizer steps in {args.steps} steps"
    if dist.is_main:
        torch.save({"init": init, "states": states, "masters": fp32,
                    "grads": [{n: e.grads[k] for n, e in engines.items()} for k in range(args.steps)],
                    "lrs": [{n: e.lrs[k] for n, e in engines.items()} for k in range(args.steps)]}, args.out)
    tdist.barrier()  # leave together (see parity_worker.py)
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
