"""Run stage-2 steps on a real DeepSpeed engine over deterministic token batches; rank 0 saves what it computed.

Started by tests/trainer/test_stage2_parity.py under ``torchrun --nproc_per_node 2``: the real ``Stage2Task``
micro-step on the engine of ``vitvq.trainer.engine.build_engine``. Micro-step m of rank r takes chunk
``m * world + r`` of the same global batch that the test's plain reference sees whole. The engine records its full
data-parallel mean gradient before each ``engine.step()`` (``parity_worker.RecordingEngine``). Saved by rank 0:
``"init"`` (the prior's state before DeepSpeed saw it), ``"states"[k]`` (the weights of step k's forwards; the
last entry after the last step), ``"grads"[k]``, ``"lrs"[k]``.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import torch.distributed as tdist

from vitvq.trainer.config import load_job_config
from vitvq.trainer.engine import build_engine, init_distributed
from vitvq.trainer.stage2 import Stage2Config, Stage2Task

_spec = importlib.util.spec_from_file_location("parity_worker", Path(__file__).with_name("parity_worker.py"))
parity_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity_worker)
RecordingEngine, snapshot = parity_worker.RecordingEngine, parity_worker.snapshot


def global_batch(step: int, n: int, seq_len: int, vocab: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randint(0, vocab, (n, seq_len), generator=g), torch.randint(0, classes, (n,), generator=g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_job_config(Stage2Config, args.config, args.overrides)
    dist = init_distributed()
    torch.manual_seed(cfg.train.seed)
    task = Stage2Task(cfg, dist)
    modules = task.build_modules()
    init = snapshot(modules["prior"])
    accum = cfg.train.accumulation(dist.world_size)
    engine = RecordingEngine(build_engine(modules["prior"], task.optim_config("prior"), cfg.train, accum,
                                          task.schedule_steps("prior")))
    task.attach({"prior": engine})
    task.on_start()
    mb, pc = cfg.train.micro_batch_size, cfg.prior
    states = []
    for step in range(args.steps):
        states.append(snapshot(engine.module))
        tokens, labels = global_batch(step, cfg.train.global_batch_size, pc.seq_len, pc.vocab_size, pc.num_classes)
        for m in range(accum):
            c = slice((m * dist.world_size + dist.rank) * mb, (m * dist.world_size + dist.rank + 1) * mb)
            assert task.micro_step({"tokens": tokens[c], "label": labels[c]}, step) is not None
        task.after_step(step + 1)
    states.append(snapshot(engine.module))
    assert len(engine.grads) == args.steps, f"{len(engine.grads)} optimizer steps in {args.steps} steps"
    if dist.is_main:
        torch.save({"init": init, "states": states, "grads": engine.grads, "lrs": engine.lrs}, args.out)
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
