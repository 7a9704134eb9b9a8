"""A micro-batch dropped for a non-finite loss changes no state: EMA codes and statistics, the restart window, the
codebook-health window and LeCam's averages move only for micro-batches that were used.

These statistics are computed inside the forward pass, before the losses are known; the task applies them only
after the every-rank finiteness check (``Stage1Task.micro_step``). Runs the real task in one process, with plain
PyTorch AdamW in place of the DeepSpeed engines (the dropped micro-batch never reaches them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.engine import DistInfo
from vitvq.trainer.stage1 import Stage1Task

ROOT = Path(__file__).resolve().parents[2]


class TorchEngine:
    """The parts of a DeepSpeed engine the task uses, in plain PyTorch (one process, no accumulation)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.global_steps = module, 0
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1


def snapshot(task: Stage1Task) -> dict[str, torch.Tensor]:
    q = task.gen.quantizer
    state = {f"quantizer.{k}": v.clone() for k, v in q.state_dict().items()}
    state.update({f"loss.{k}": v.clone() for k, v in task.loss.state_dict().items()})
    health = task.health.state_dict()
    state.update({"health.current": health["current"].clone(), "health.hist": health["hist"].clone()})
    return state


def build() -> Stage1Task:
    cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", [
        "model.quantizer.kind=ema", "model.quantizer.restart_dead_codes=true", "model.quantizer.restart_every=1",
        "model.quantizer.init=random", "loss.lecam_weight=0.1", "loss.disc_start=0"])
    torch.manual_seed(0)
    task = Stage1Task(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    task.attach({name: TorchEngine(m) for name, m in task.build_modules().items()})
    return task


def images(seed: int) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_a_nan_micro_batch_leaves_every_statistic_unchanged() -> None:
    task = build()
    assert task.micro_step({"image": images(1)}, step=0) is not None  # LeCam initialised, EMA and windows moved
    before = snapshot(task)
    assert bool(before["loss.lecam_initialized"]) and before["health.current"].sum() > 0
    bad = images(2)
    bad[0, 0, 0, 0] = float("nan")
    assert task.micro_step({"image": bad}, step=1) is None
    after = snapshot(task)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed for a dropped micro-batch"
    # ...and it is forgotten, not applied later: the next used micro-batch gives what it gives without the NaN one.
    assert task.micro_step({"image": images(3)}, step=1) is not None
    task.after_step(2)  # restart_every=1: a restart from the used vectors only
    clean = build()
    assert clean.micro_step({"image": images(1)}, step=0) is not None
    assert clean.micro_step({"image": images(3)}, step=1) is not None
    clean.after_step(2)
    want, got = snapshot(clean), snapshot(task)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(got["quantizer.codebook.embed_sum"], before["quantizer.codebook.embed_sum"])
    assert task.health.restarts == clean.health.restarts > 0
