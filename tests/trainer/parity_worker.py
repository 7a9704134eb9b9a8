"""Run 3 stage-1 steps on DeepSpeed engines over deterministic batches; rank 0 saves the final weights.

Started by tests/trainer/test_gan_parity.py under ``torchrun --nproc_per_node 2``. Each rank takes its
chunks of the same global batch that the plain-PyTorch reference in the test sees whole.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.engine import build_engine, init_distributed
from vitvq.trainer.stage1 import Stage1Task


def global_batch(step: int, n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (N, 3, H, W) in [-1, 1]


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
    accum = cfg.train.accumulation(dist.world_size)
    engines = {n: build_engine(modules[n], task.optim_config(n), cfg.train, accum, task.schedule_steps(n))
               for n in task.engine_names}
    task.attach(engines)
    mb = cfg.train.micro_batch_size
    for step in range(args.steps):
        x = global_batch(step, cfg.train.global_batch_size, cfg.model.image_size)
        for m in range(accum):
            chunk = m * dist.world_size + dist.rank
            assert task.micro_step({"image": x[chunk * mb:(chunk + 1) * mb]}, step) is not None
    if dist.is_main:
        torch.save({n: {k: v.detach().float().clone() for k, v in e.module.state_dict().items()}
                    for n, e in engines.items()}, args.out)


if __name__ == "__main__":
    main()
