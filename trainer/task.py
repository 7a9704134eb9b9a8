"""What a stage gives the Trainer (the :class:`Task` protocol), and the table of stages that ``train(cfg)`` uses.

The Trainer (``trainer/trainer.py``) owns the process group, the engines' lifecycle, resume, checkpoints, the
step loop, the non-finite guard, tracking and the progress bar; it never names a model, an engine or a loss.
Everything a stage knows goes through its task: which engines it has and their optimizer settings, its data,
one micro-step, validation, the pictures to log, its per-engine metrics, its export and its own state.

A second stage plugs in with three things and no change to the Trainer:

1. a config dataclass with ``stage: ClassVar[str] = "stage2"`` and the ``train``, ``recipe`` fields (the
   Trainer reads only ``cfg.train`` and ``cfg.recipe``);
2. a class implementing :class:`Task`, built as ``TaskClass(cfg, dist)``;
3. a line in :data:`STAGES` that imports both lazily.

``launch/train_stage2.py`` then loads its config and calls the same ``train(cfg)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    import torch.nn as nn

    from vitvq.trainer.config import OptimConfig


@dataclass(frozen=True)
class Every:
    """Fires every ``n`` steps and on the last step; ``n = 0`` never fires. Each component keeps its own."""

    n: int
    last: int

    def __call__(self, step: int) -> bool:
        return self.n > 0 and (step % self.n == 0 or step == self.last)


class Stream(Protocol):
    """A rank's training batches with an exactly resumable position (``vitvq.data.TrainStream`` is one)."""

    skipped: int
    """Samples this rank dropped as unreadable so far."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...


class Evaluator(Protocol):
    """Background evaluation of checkpoints while training goes on (stage 1: rFID on Ray workers)."""

    def due(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` should be evaluated (the Trainer then saves one, if not due anyway)."""
        ...

    def submit(self, step: int, tag: str) -> None:
        """Hand the checkpoint ``tag`` of ``step`` to the workers; returns at once."""
        ...

    def poll(self) -> list[Any]:
        """Finished results (``metrics``, ``protocol``, ``step``, ``error``, ``to_json()``); never blocks."""
        ...

    def close(self) -> list[Any]:
        """Wait for the queue, stop the workers; the results not yet polled."""
        ...


class Task(Protocol):
    name: str
    """The stage ("stage1"): the key in :data:`STAGES`, the MLflow tag ``stage``, recorded in every checkpoint."""
    engine_names: tuple[str, ...]
    """One DeepSpeed engine per name, built from ``build_modules()[name]`` and ``optim_config(name)``."""
    export_engine: str
    """The engine whose consolidated fp32 weights make the export."""
    export_file: str
    """File name of the final export in ``out_dir`` (stage 1: ``tokenizer.pt``)."""
    progress: dict[str, str]
    """Progress-bar label -> logged metric name."""
    throughput: tuple[str, float]
    """(metric name, items per sample): ``perf/images_per_s`` counts 1 per sample, a prior counts its tokens."""

    def build_modules(self) -> dict[str, "nn.Module"]: ...
    def optim_config(self, name: str) -> "OptimConfig": ...
    def schedule_steps(self, name: str) -> int:
        """Optimizer steps the learning-rate schedule of engine ``name`` spans."""
        ...
    def attach(self, engines: dict[str, Any]) -> None:
        """Receive the engines (DeepSpeed's, or a plain reference) before the first micro-step."""
        ...

    def on_start(self) -> None:
        """Collective, once the engines are built and any checkpoint loaded, before the first step of this process
        (stage 1: k-means codebook initialisation on a fresh run; the task's own state says whether it is due)."""
        ...
    def after_step(self, step: int) -> None:
        """Collective, after optimizer step ``step`` (stage 1: dead-code restarts, the codebook-health window)."""
        ...

    def tags(self) -> dict[str, str]:
        """Extra MLflow tags of the run (dataset index checksum, lineage hashes)."""
        ...
    def linked_runs(self, run_id: str) -> dict[str, dict[str, str]]:
        """Tags to set on the runs this one builds on, by their MLflow run id, linking back to ``run_id``
        (stage 2: the tokenizer's stage-1 run gets ``prior_run.<run_id>``)."""
        ...
    def train_stream(self, state: Optional[dict[str, Any]]) -> Stream:
        """This rank's training stream, at ``state`` (None: the start)."""
        ...
    def micro_step(self, batch: dict[str, Any], step: int) -> Optional[dict[str, "torch.Tensor"]]:
        """Forward, backward and step of every engine on one micro-batch; its metrics (0-d tensors, summed over
        the accumulation by the Trainer and averaged), or None when the micro-batch was dropped on every rank
        (then nothing of the task's state may have changed: statistics kept in the forward wait for the verdict)."""
        ...
    def engine_metrics(self) -> dict[str, float]:
        """Per-engine values after an optimizer step (learning rates, gradient norms), logged under train/."""
        ...

    @property
    def has_validation(self) -> bool: ...
    def validate(self) -> dict[str, float]:
        """Collective: metrics over the held-out set (names with their ``val/`` prefix)."""
        ...
    def pictures(self) -> dict[str, "np.ndarray"]:
        """Collective: uint8 (H, W, 3) images by name, saved as PNG and logged to MLflow at this step."""
        ...
    def evaluator(self, export: Callable[[str, Path], Path]) -> Optional[Evaluator]:
        """Rank 0's background evaluator, or None; ``export(tag, dest)`` writes a checkpoint's export."""
        ...

    @classmethod
    def write_export(cls, cfg: Any, state: dict[str, "torch.Tensor"], dest: Path, extra: dict[str, Any]) -> Path:
        """Build the model of ``cfg``, load ``state`` (strict) and write the single-file export to ``dest``."""
        ...
    def summary(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        """(label, value) lines of the closing summary, after the step count."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    # Optional: state that differs per rank (saved in each rank's own file, restored when the world size is the same):
    #   def rank_state_dict(self) -> dict[str, Any]
    #   def load_rank_state_dict(self, state: dict[str, Any]) -> None
    # and, for a resume at another world size, how the old ranks' states (rank order, None where a rank had none)
    # are shared out: the state new rank ``rank`` of ``world`` loads.
    #   def resize_rank_states(self, old: list[Optional[dict]], rank: int, world: int) -> dict[str, Any]


def _stage1() -> tuple[type, type]:
    from vitvq.trainer.config import Stage1Config
    from vitvq.trainer.stage1 import Stage1Task
    return Stage1Config, Stage1Task


def _stage2() -> tuple[type, type]:
    from vitvq.trainer.stage2 import Stage2Config, Stage2Task
    return Stage2Config, Stage2Task


STAGES: dict[str, Callable[[], tuple[type, type]]] = {"stage1": _stage1, "stage2": _stage2}
"""Stage name -> (config class, task class), imported on first use so that one stage never imports another."""


def stage_classes(name: str) -> tuple[type, type]:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {sorted(STAGES)}")
    return STAGES[name]()


__all__ = ["Every", "Task", "Stream", "Evaluator", "STAGES", "stage_classes"]
