"""The pipeline's config (``configs/pipeline/*.yaml``): the recipes and resources of each step of ``launch/orchestration/pipeline.py``.

Every field is validated at load (``launch/pipeline.py`` refuses a bad value with its dotted name before any step runs).
The bulk steps are made of the jobs' own pieces (the pool's resources, the sampling settings, the encoding options,
the gFID settings), so that a setting is declared once; ``launch/orchestration/pipeline.py`` builds each job's config from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from vitvq.configs import check, load
from vitvq.configs.pool import PoolConfig
from vitvq.data.encode import EncodeOptions
from vitvq.evaluation.jobs import GfidSettings
from vitvq.evaluation.sampling import SampleSet
from vitvq.models.sampling import SamplingSettings


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


PoolStep = PoolConfig
"""Where a bulk step (encoding, statistics, sampling, gFID) runs: Ray actors on the pipeline's cluster, each with
these resources; the same fields as the jobs' pools (``configs.pool.PoolConfig``)."""


@dataclass
class EncodeStep(PoolConfig, EncodeOptions):
    train_shards: Optional[str] = None
    """Image shards to encode for the prior's training (default: the stage-1 recipe's training data)."""
    val_shards: Optional[str] = None
    """Image shards for the prior's validation and the gFID reference (default: the stage-1 recipe's); encoded
    centered whatever augment says."""
    batch_size: int = 64
    """Images (views) per forward pass of the tokenizer."""

    def __post_init__(self) -> None:
        PoolConfig.__post_init__(self)
        EncodeOptions.__post_init__(self)


@dataclass
class SampleStep(PoolConfig, SamplingSettings, SampleSet):
    """Sampling from the prior: the sampling job's settings (``evaluation.jobs.SampleConfig``) on the pipeline's
    pool; every field but the pool's resources is part of the step's lineage."""

    def __post_init__(self) -> None:
        PoolConfig.__post_init__(self)
        SamplingSettings.__post_init__(self)
        SampleSet.__post_init__(self)


@dataclass
class GfidStep(PoolConfig, GfidSettings):
    ref: Optional[str] = None
    """Reference statistics .npz (ADM's or launch/evaluate.py ref-stats); None: computed from the validation images
    at the tokenizer's resolution (the ``ref`` step)."""

    def __post_init__(self) -> None:
        PoolConfig.__post_init__(self)
        GfidSettings.__post_init__(self)


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
