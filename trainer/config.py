"""Job schemas: the sections every stage shares (``train``, optimizer) and the stage-1 job.

Recipes under ``configs/<stage>/`` are YAML files holding values for these dataclasses; the command line
adds dotted overrides (``train.steps=100 model.encoder=base``). Everything is validated once, in
:func:`load_job_config`, and a bad value is refused there with the field's dotted name. A job config names its
stage (``stage: ClassVar[str]``), which is how ``trainer.task.STAGES`` finds its task.
"""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional, TypeVar

from vitvq.data.config import DataConfig
from vitvq.configs import check, flatten, from_dict, load, to_dict
from vitvq.models.discriminators import DiscConfig
from vitvq.models.losses import LossConfig
from vitvq.models.tokenizer import TokenizerConfig


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate, reached after the linear warm-up."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas (ViT-VQGAN: 0.9, 0.99)."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 5000
    """Linear warm-up steps from 0 to lr."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr * min_lr_ratio on the last step."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping; 0 turns it off (DeepSpeed >= 0.19.3 defaults to 1.0, so always set)."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", self.lr, "must be positive")
        check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "each beta must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.eps > 0, "eps", self.eps, "must be positive")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    out_dir: str = "runs/stage1"
    """Output folder: checkpoints, exports, pictures. A run resumes from the latest checkpoint found here."""
    steps: int = 500_000
    """Optimizer steps (an update of every engine of the task: stage 1 updates the discriminator once it is active)."""
    global_batch_size: int = 256
    """Samples per optimizer step over all ranks; accumulation = global / (micro x world size)."""
    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 mixed precision (DeepSpeed bf16 with fp32 master weights and fp32 grad accumulation) or fp32."""
    zero_stage: Literal[0, 1, 2] = 2
    """DeepSpeed ZeRO stage for both engines."""
    activation_checkpointing: bool = False
    """Recompute transformer blocks in backward (non-reentrant torch.utils.checkpoint)."""
    seed: int = 0
    """Seed of model init, data order and augmentation."""
    log_every: int = 10
    """Steps between metric logs."""
    ckpt_every: int = 1000
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept in out_dir/checkpoints; older ones are deleted."""
    val_every: int = 1000
    """Steps between validations on data.val_shards (0 = never)."""
    val_batches: int = 8
    """Micro-batches per rank in one validation pass."""
    image_every: int = 1000
    """Steps between the task's pictures (stage 1: reconstruction grids; PNG in out_dir, image in MLflow)."""
    max_nonfinite: int = 5
    """Consecutive non-finite losses (each skips its step) after which the run stops."""
    experiment: str = "vitvq-stage1"
    """MLflow experiment."""
    run_name: Optional[str] = None
    """MLflow run name; default = the recipe name."""
    tracking: bool = True
    """Log to MLflow (MLFLOW_TRACKING_URI, else MLflow's default store)."""
    parent_run_id: Optional[str] = None
    """MLflow run this one is a step of (``launch/pipeline.py`` sets it): a new run is tagged ``mlflow.parentRunId``
    so that the MLflow UI nests it. Bookkeeping only: not part of ``config_hash``."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    on_world_size_change: Literal["convert", "refuse"] = "convert"
    """Resuming at another world size: convert the ZeRO checkpoint to universal format, or refuse."""
    preempt_signal: Optional[str] = "SIGUSR1"
    """A second signal that preempts as SIGTERM does (SLURM's ``--signal=USR1@120`` warns before the end of an
    allocation); null for SIGTERM and Ctrl-C alone. Every rank finishes the step, saves and exits with status 75."""
    dist_timeout_s: int = 1800
    """Seconds a collective may wait for the other ranks before the process group fails (a hung rank, a slow
    checkpoint on shared storage); torch's default is 1800."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_every", "ckpt_every", "keep_last",
                     "image_every", "max_nonfinite"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(self.preempt_signal is None or (self.preempt_signal.startswith("SIG") and hasattr(signal, self.preempt_signal)
              and self.preempt_signal not in ("SIGKILL", "SIGSTOP")), "preempt_signal", self.preempt_signal,
              "must name a catchable signal such as SIGUSR1 or SIGUSR2, or be null")
        check(self.dist_timeout_s > 0, "dist_timeout_s", self.dist_timeout_s, "must be a positive number of seconds")
        check(self.val_every >= 0, "val_every", self.val_every, "must be >= 0 (0 = no validation)")
        check(self.val_batches > 0, "val_batches", self.val_batches, "must be positive")
        check(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size", self.global_batch_size,
              f"must be a multiple of micro_batch_size={self.micro_batch_size}")
        # DeepSpeed 0.19.8 refuses bf16 weights with fp32 gradient accumulation at stage 0 ("unsupported mix of
        # model_dtype and grad_accum_dtype"), and bf16 accumulation would lose the small gradients.
        check(self.precision == "fp32" or self.zero_stage >= 1, "precision", self.precision,
              "bf16 needs zero_stage 1 or 2 (fp32 master weights and gradient accumulation); set train.zero_stage=1")

    def accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step that keep the global batch at this world size."""
        per_step = self.micro_batch_size * world_size
        check(self.global_batch_size % per_step == 0, "train.global_batch_size", self.global_batch_size,
              f"must be divisible by micro_batch_size x world_size = {per_step}; change either")
        return self.global_batch_size // per_step


@dataclass
class EvalConfig:
    every: int = 0
    """Steps between asynchronous rFID evaluations of a tokenizer export on the validation shards (0 = off)."""
    workers: int = 1
    """Ray evaluation workers (a local Ray cluster is started unless RAY_ADDRESS names one)."""
    extractor: Literal["inception", "inception-random", "tiny"] = "inception"
    """Feature extractor: the FID Inception (needs its weights file) or test stand-ins (not comparable to papers)."""
    inception_weights: Optional[str] = None
    """Path of pt_inception-2015-12-05-6726825d.pth (None: the torch hub cache)."""
    ref: Optional[str] = None
    """Reference statistics .npz (launch/evaluate.py ref-stats, or ADM's); None = statistics of the val images."""
    batch_size: int = 32
    """Images per worker batch."""
    lpips: Literal["auto", "vgg", "random", "off"] = "auto"
    """LPIPS of the reconstructions: vgg (needs the VGG16 file), auto (vgg if present), random (tests), off."""

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", self.every, "must be >= 0 (0 = no evaluation during training)")
        check(self.workers >= 1, "workers", self.workers, "must be at least 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be positive")


@dataclass
class Stage1Config:
    stage: ClassVar[str] = "stage1"

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer (encoder, quantizer, decoder)."""
    disc: DiscConfig = field(default_factory=DiscConfig)
    """The discriminator."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and weights."""
    optim_g: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule of the tokenizer."""
    optim_d: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule of the discriminator."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and transforms."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, precision, checkpoints and tracking."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """rFID of tokenizer exports on the validation shards, computed by Ray workers while training goes on."""
    recipe: str = "custom"
    """Recipe name (set from the YAML file name), logged as an MLflow tag."""

    def __post_init__(self) -> None:
        check(self.data.image_size == self.model.image_size, "data.image_size", self.data.image_size,
              f"must equal model.image_size={self.model.image_size}")
        check(self.eval.every == 0 or bool(self.data.val_shards) or self.data.source == "demo", "eval.every",
              self.eval.every, "evaluation during training needs data.val_shards; set them or eval.every=0")
        check(self.model.output == "logit_laplace" or self.loss.logit_laplace_weight == 0, "loss.logit_laplace_weight",
              self.loss.logit_laplace_weight, f"needs model.output=logit_laplace (it is {self.model.output!r}); set 0")


C = TypeVar("C")


def load_job_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Load a recipe of job schema ``cls`` plus ``key=value`` overrides; the recipe name defaults to the file's stem."""
    overrides = list(overrides or [])
    if path is not None and not any(o.startswith("recipe=") for o in overrides):
        overrides.insert(0, f"recipe={Path(path).stem}")
    return load(cls, path, overrides)


def load_stage1_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage1Config:
    return load_job_config(Stage1Config, path, overrides)


def config_hash(cfg: object) -> str:
    """Short stable hash of the resolved config, stored in checkpoints to flag a changed config on resume (without
    ``train.parent_run_id``: the pipeline invocation that continues a run is not a change of the run)."""
    data = to_dict(cfg)
    if isinstance(data.get("train"), dict):
        data["train"].pop("parent_run_id", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def stage1_from_flat(flat: dict) -> Stage1Config:
    """Rebuild a config from its flat (MLflow params) form."""
    from vitvq.configs import unflatten
    return from_dict(Stage1Config, unflatten(flat))


__all__ = ["OptimConfig", "TrainConfig", "EvalConfig", "Stage1Config", "load_job_config", "load_stage1_config", "config_hash", "flatten",
           "stage1_from_flat"]
