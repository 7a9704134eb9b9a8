"""Run stage-1 steps on real DeepSpeed engines over deterministic batches; rank 0 saves what they computed.

Started by tests/trainer/test_gan_parity.py under ``torchrun --nproc_per_node 2``: the real ``Stage1Task``
micro-step on the engines of ``vitvq.trainer.engine.build_engine`` (ZeRO stage, accumulation and the rest
from the config overrides). Each rank takes its chunks of the same global batch that the test's plain
reference sees whole: micro-step m of rank r takes chunk ``m * world + r``.

The engines are wrapped so that, at every accumulation boundary, the full data-parallel mean gradient of
every parameter is read right before ``engine.step()`` (``deepspeed.utils.safe_get_full_grad``: a collective
under ZeRO 1/2, valid between the boundary backward and the step; unclipped). Saved by rank 0:

- ``"init"``: each module's state before DeepSpeed saw it, and the frozen LPIPS module of the loss;
- ``"states"[k]``: each engine's module state at the start of optimizer step k (the weights step k's
  forwards use), ``"states"[steps]`` the state after the last step;
- ``"grads"[k]``: each engine's mean gradient of step k, by parameter name (zeros where DeepSpeed has none);
- ``"lrs"[k]``: each engine's learning rate at step k.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from deepspeed.utils import safe_get_full_grad

ROOT = Path(__file__).resolve().parents[2]

from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.engine import build_engine, init_distributed
from vitvq.trainer.stage1 import Stage1Task


def global_batch(step: int, n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (N, 3, H, W) in [-1, 1]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class RecordingEngine:
    """A DeepSpeed engine that records its full mean gradient at each accumulation boundary, before stepping."""

    def __init__(self, engine: Any):
        self.engine, self.grads, self.lrs = engine, [], []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def step(self) -> None:
        if self.engine.is_gradient_accumulation_boundary():
            grads = {}
            for name, p in self.engine.module.named_parameters():
                if p.requires_grad:
                    g = safe_get_full_grad(p)  # collective under ZeRO 1/2: every rank calls it in the same order
                    grads[name] = torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float().clone()
            self.grads.append(grads)
            self.lrs.append(self.engine.get_lr()[0])
        self.engine.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", args.overrides)
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
    # The Trainer's order of calls (trainer/trainer.py). With the test's quantizer settings (random init, no
    # dead-code restarts) the hooks write no weights, which the test's weight check relies on.
    if hasattr(task, "on_start"):
        task.on_start()
    mb = cfg.train.micro_batch_size
    states = []
    for step in range(args.steps):
        states.append({n: snapshot(e.module) for n, e in engines.items()})
        x = global_batch(step, cfg.train.global_batch_size, cfg.model.image_size)
        for m in range(accum):
            chunk = m * dist.world_size + dist.rank
            assert task.micro_step({"image": x[chunk * mb:(chunk + 1) * mb]}, step) is not None
        if hasattr(task, "after_step"):
            task.after_step(step)
    states.append({n: snapshot(e.module) for n, e in engines.items()})
    for n, e in engines.items():
        assert len(e.grads) == args.steps, f"{n}: {len(e.grads)} optimizer steps in {args.steps} steps"
    if dist.is_main:
        torch.save({"init": init, "states": states,
                    "grads": [{n: e.grads[k] for n, e in engines.items()} for k in range(args.steps)],
                    "lrs": [{n: e.lrs[k] for n, e in engines.items()} for k in range(args.steps)]}, args.out)
    # Leave together and tear the process group down here, not in the interpreter's teardown: 2 of ~100 launches
    # without this had rank 1 abort ("terminate called without an active exception", no Python traceback) on a
    # loaded 2-core machine; the cause was not pinned down.
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
