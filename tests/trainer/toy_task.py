"""A second task that is not a GAN: least-squares regression on one engine, trained by the same Trainer.

Run by tests/trainer/test_task_protocol.py under ``torchrun``: it registers itself in ``trainer.task.STAGES`` and
calls the one ``train(cfg)``. It is also the smallest example of what a stage supplies (see trainer/task.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

import torch
import torch.nn as nn

from vitvq.configs import load
from vitvq.trainer.config import OptimConfig, TrainConfig
from vitvq.trainer.engine import DistInfo
from vitvq.trainer.task import STAGES


@dataclass
class ToyConfig:
    stage: ClassVar[str] = "toy"

    dim: int = 8
    """Input features."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=1))
    """Optimizer of the one engine."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=6, global_batch_size=8, micro_batch_size=2, precision="fp32", ckpt_every=2, log_every=1,
        val_every=0, image_every=1000, experiment="toy"))
    """Loop and checkpoints."""
    recipe: str = "toy"
    """Recipe name."""


class ToyStream:
    """Batch n of rank r is a function of (seed, r, n) alone, so the position is one number."""

    skipped = 0

    def __init__(self, dim: int, batch: int, rank: int, seed: int, state: Optional[dict]):
        self.dim, self.batch, self.rank, self.seed = dim, batch, rank, seed
        self.batches = state["batches"] if state else 0
        self.w = torch.linspace(-1, 1, dim)  # the target weights

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.batches)
            x = torch.randn(self.batch, self.dim, generator=g)
            self.batches += 1
            yield {"x": x, "y": x @ self.w + 0.1 * torch.randn(self.batch, generator=g)}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}


class ToyTask:
    name = "toy"
    engine_names = ("model",)
    export_engine = "model"
    export_file = "toy.pt"
    progress = {"loss": "train/loss"}
    throughput = ("perf/samples_per_s", 1.0)
    has_validation = False

    def __init__(self, cfg: ToyConfig, dist: DistInfo):
        self.cfg, self.dist, self.engines = cfg, dist, {}

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": nn.Linear(self.cfg.dim, 1)}

    def optim_config(self, name: str) -> OptimConfig:
        return self.cfg.optim

    def schedule_steps(self, name: str) -> int:
        return self.cfg.train.steps

    def attach(self, engines: dict[str, Any]) -> None:
        self.engines = engines

    def on_start(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def tags(self) -> dict[str, str]:
        return {"toy": "yes"}

    def linked_runs(self, run_id: str) -> dict[str, dict[str, str]]:
        return {}

    def train_stream(self, state: Optional[dict]) -> ToyStream:
        return ToyStream(self.cfg.dim, self.cfg.train.micro_batch_size, self.dist.rank, self.cfg.train.seed, state)

    def micro_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        engine = self.engines["model"]
        loss = (engine.module(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach()}

    def engine_metrics(self) -> dict[str, float]:
        return {"train/lr": self.engines["model"].get_lr()[0]}

    def validate(self) -> dict[str, float]:
        return {}

    def pictures(self) -> dict:
        return {}

    def evaluator(self, export: Any) -> None:
        return None

    @classmethod
    def write_export(cls, cfg: ToyConfig, state: dict[str, torch.Tensor], dest: Path, extra: dict) -> Path:
        model = nn.Linear(cfg.dim, 1)
        model.load_state_dict(state, strict=True)
        torch.save({"state_dict": model.state_dict(), "extra": extra}, dest)
        return dest

    def summary(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        return [("train/loss", f"{metrics.get('train/loss', float('nan')):.4f}")]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


STAGES["toy"] = lambda: (ToyConfig, ToyTask)

if __name__ == "__main__":
    from vitvq.trainer.trainer import train
    p = argparse.ArgumentParser()
    p.add_argument("overrides", nargs="*")
    train(load(ToyConfig, None, p.parse_args().overrides))
