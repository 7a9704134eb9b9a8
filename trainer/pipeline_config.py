"""The pipeline's config (``configs/pipeline/*.yaml``): the recipes and resources of each step of ``trainer/pipeline.py``.

Every field is validated at load (``launch/pipeline.py`` refuses a bad value with its dotted name before any step runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from vitvq.configs import check, load
from vitvq.trainer.stage2 import SamplingSettings, check_classes


# -- config ---------------------------------------------------------------------------------------
@dataclass
class TrainStep:
    recipe: str = ""
    """Recipe YAML of the stage (e.g. configs/stage1/demo.yaml), relative to the working directory."""
    overrides: list[str] = field(default_factory=list)
    """Dotted key=value overrides of the recipe (the pipeline sets out_dir, MLflow names and, in stage 2, the
    tokenizer and token indexes itself)."""
    workers: str = "1"
    """Ray Train workers: N, or MIN-MAX for an elastic run."""
    cpus_per_worker: float = 1
    """CPUs per Train worker."""
    gpus_per_worker: float = 0
    """0 (CPU ranks) or 1."""
    max_failures: int = 0
    """Worker-group failures (crashes, lost nodes) Ray restarts from (-1: no limit)."""

    def __post_init__(self) -> None:
        from vitvq.launch.orchestration.ray_train import parse_workers
        check(bool(self.recipe), "recipe", self.recipe, "name the stage's recipe YAML, e.g. configs/stage1/demo.yaml")
        try:
            parse_workers(self.workers)
        except ValueError as e:
            check(False, "workers", self.workers, str(e))
        check(self.gpus_per_worker in (0, 1), "gpus_per_worker", self.gpus_per_worker, "must be 0 or 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        check(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= -1 (-1: no limit)")


@dataclass
class PoolStep:
    """Where a bulk step (encoding, statistics, sampling, gFID) runs: Ray actors, each with these resources."""
    workers: int = 1
    """Ray actors (0: in the pipeline's own process)."""
    cpus_per_worker: float = 1
    """CPU cores (and torch threads) per actor."""
    gpus_per_worker: float = 0
    """GPUs per actor (fractions share a GPU)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """torch device in the actors (cuda needs gpus_per_worker > 0)."""
    batch_size: int = 32
    """Images per forward pass."""

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers", self.workers, "must be >= 0 (0: in this process)")
        check(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        check(self.device == "cpu" or self.gpus_per_worker > 0 or self.workers == 0, "device", self.device,
              "cuda in Ray actors needs gpus_per_worker > 0 (Ray hides GPUs from actors that ask for none)")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")

    def pool_args(self) -> list[str]:
        return ["--workers", str(self.workers), "--cpus-per-worker", f"{self.cpus_per_worker:g}",
                "--gpus-per-worker", f"{self.gpus_per_worker:g}", "--device", self.device,
                "--batch-size", str(self.batch_size)]


@dataclass
class EncodeStep(PoolStep):
    train_shards: Optional[str] = None
    """Image shards to encode for the prior's training (default: the stage-1 recipe's training data)."""
    val_shards: Optional[str] = None
    """Image shards for the prior's validation and the gFID reference (default: the stage-1 recipe's)."""
    augment: Literal["center", "flip", "tencrop"] = "center"
    """Views per training image: centered square, + its mirror, LlamaGen's ten-crop."""
    limit: Optional[int] = None
    """Encode only the first N samples of each split (quick runs)."""
    batch_size: int = 64
    """Images (views) per forward pass of the tokenizer."""


@dataclass
class SampleStep(PoolStep, SamplingSettings):
    per_class: int = 50
    """Samples per class (50 x 1000 classes = ADM's 50k for ImageNet)."""
    classes: Optional[list[int]] = None
    """Class indices to sample (default: every class of the prior)."""

    def __post_init__(self) -> None:
        PoolStep.__post_init__(self)
        SamplingSettings.__post_init__(self)
        check_classes(self.classes, self.per_class)


@dataclass
class GfidStep(PoolStep):
    ref: Optional[str] = None
    """Reference statistics .npz (ADM's or launch/evaluate.py ref-stats); None: computed from the validation images
    at the tokenizer's resolution (the ``ref`` step)."""
    extractor: Literal["inception", "inception-random", "tiny"] = "inception"
    """The FID InceptionV3 (needs its weights file), or random stand-ins NOT comparable to published numbers."""
    inception_weights: Optional[str] = None
    """Path of pt_inception-2015-12-05-6726825d.pth (else $VITVQ_INCEPTION_WEIGHTS, else the torch hub cache)."""
    splits: int = 10
    """Inception Score splits."""


@dataclass
class PipelineConfig:
    root: str = "runs/pipeline"
    """Output folder of every step (on storage every node sees, same path)."""
    experiment: str = "vitvq-pipeline"
    """MLflow experiment of the parent run and of every step's run."""
    run_name: Optional[str] = None
    """Parent run's name (default: the recipe name)."""
    tracking: bool = True
    """Log to MLflow (MLFLOW_TRACKING_URI, else MLflow's default store)."""
    progress: bool = True
    """Progress bars of the steps."""
    stage1: TrainStep = field(default_factory=lambda: TrainStep(recipe="configs/stage1/demo.yaml"))
    """The tokenizer's training."""
    stage2: TrainStep = field(default_factory=lambda: TrainStep(recipe="configs/stage2/demo.yaml"))
    """The prior's training, on the tokens the pipeline encodes with the tokenizer of stage 1."""
    encode: EncodeStep = field(default_factory=EncodeStep)
    """Token encoding of the training and validation images."""
    sample: SampleStep = field(default_factory=SampleStep)
    """Sampling from the prior."""
    gfid: GfidStep = field(default_factory=GfidStep)
    """FID and Inception Score of the samples."""
    recipe: str = "custom"
    """Pipeline name (set from the YAML file name)."""

    def __post_init__(self) -> None:
        check(bool(self.root), "root", self.root, "name the output folder")


def load_pipeline_config(path: str | Path, overrides: Optional[list[str]] = None) -> PipelineConfig:
    overrides = list(overrides or [])
    if not any(o.startswith("recipe=") for o in overrides):
        overrides.insert(0, f"recipe={Path(path).stem}")
    return load(PipelineConfig, path, overrides)


__all__ = ["PipelineConfig", "TrainStep", "PoolStep", "EncodeStep", "SampleStep", "GfidStep", "load_pipeline_config"]
