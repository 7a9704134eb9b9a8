"""Stage 2 as a task for the Trainer: the autoregressive prior over a tokenizer's codes on one DeepSpeed engine.

The data are token shards written once by ``launch/encode_tokens.py`` (``data/tokens.py``); their index records
the sha256 of the tokenizer export they were encoded with, and this task refuses to train when it differs from
``cfg.tokenizer`` (a prior is only meaningful with the decoder that turns its tokens back into pixels). The
prior's vocabulary, grid and classes are checked against the same index before any engine is built.

One micro-step: label dropout (the null class for classifier-free guidance, from a generator whose seed is a
function of the run's seed, the rank and the micro-step count, so a resumed run drops the same labels), the
teacher-forced forward ``[cond, z_0 .. z_{N-2}] -> z_0 .. z_{N-1}``, cross-entropy in nats per token, the
non-finite verdict agreed by every rank, then backward and step. Validation: loss and token accuracy on the
held-out token shards, without dropout. Pictures: a grid of samples with fixed classes and seeds, decoded by the
tokenizer, so the grids of one run (and of runs with the same ``samples`` settings) are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
import torch.nn as nn

from vitvq.configs import check
from vitvq.configs.redact import redact
from vitvq.data import build_token_eval_loader, build_token_stream, check_lineage, index_checksum
from vitvq.data.shards import sha256_file
from vitvq.data.tokens import TokenDataConfig, index_token_facts
from vitvq.evaluation.pictures import image_grid
from vitvq.evaluation.sampling import SamplePlan, check_classes
from vitvq.models.prior import Prior, PriorConfig, prior_loss
from vitvq.models.sampling import SamplingSettings, generate
from vitvq.models.tokens import check_prior_fits
from vitvq.trainer.config import OptimConfig, TrainConfig
from vitvq.trainer.engine import DistInfo, all_reduce_sum, any_rank, grad_norm
from vitvq.trainer.task import Evaluator, Stream


@dataclass
class SampleGridConfig(SamplingSettings):
    """The grid of samples drawn while training (``train.image_every``): the same classes and seeds at every step,
    so the grids of a run are comparable, with the sampling settings (``models/sampling.SamplingSettings``, the
    flags of ``launch/sample.py``); an unconditional prior's grid is drawn without guidance."""

    classes: list[int] = field(default_factory=lambda: list(range(8)))
    """One row per class (class-conditional priors; an unconditional prior draws ``len(classes)`` rows anyway)."""
    per_class: int = 8
    """Samples per row."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_classes(self.classes, self.per_class)


@dataclass
class Stage2Config:
    """The prior over a tokenizer's codes. It names the tokenizer export it models and never re-declares stage 1:
    the prior's ``vocab_size``, ``grid`` and ``num_classes`` are checked against the token shards' index, which
    records the export they were encoded with (``launch/encode_tokens.py``)."""

    stage: ClassVar[str] = "stage2"

    tokenizer: str = ""
    """Path of the tokenizer export (``tokenizer.pt``) the token shards were encoded with; decodes the sample grids."""
    prior: PriorConfig = field(default_factory=lambda: replace(PriorConfig.PRESETS["small"]))
    """The transformer: a preset (debug/small/vim-base/vim-large/llamagen-b/l/xl) or explicit fields."""
    tokens: TokenDataConfig = field(default_factory=TokenDataConfig)
    """Token shards (written by launch/encode_tokens.py)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=4.5e-4, betas=(0.9, 0.96), weight_decay=0.01, warmup_steps=5000, grad_clip=1.0))
    """Optimizer and schedule (defaults: VIM's AdamW betas 0.9/0.96 and peak lr 4.5e-4)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/stage2", experiment="vitvq-stage2"))
    """Loop, precision, checkpoints and tracking (MLflow experiment vitvq-stage2)."""
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    """The sample grid drawn every train.image_every steps."""
    recipe: str = "custom"
    """Recipe name (set from the YAML file name), logged as an MLflow tag."""

    def __post_init__(self) -> None:
        check(bool(self.tokenizer.strip()), "tokenizer", self.tokenizer,
              "give the tokenizer export the tokens were encoded with (launch/encode_tokens.py prints it)")
        if self.prior.num_classes:
            bad = [c for c in self.samples.classes if c >= self.prior.num_classes]
            check(not bad, "samples.classes", self.samples.classes,
                  f"class indices must be < prior.num_classes={self.prior.num_classes}")


class Stage2Task:
    """Next-token cross-entropy of the prior on one engine; the tokenizer (frozen, fp32) only decodes pictures."""

    name = "stage2"
    engine_names = ("prior",)
    export_engine = "prior"
    export_file = "prior.pt"
    progress = {"loss": "train/loss", "tok_s": "perf/tokens_per_s"}

    def __init__(self, cfg: Stage2Config, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.throughput = ("perf/tokens_per_s", float(cfg.prior.seq_len))
        self.engines: dict[str, Any] = {}
        self.micro_steps = 0  # micro-batches trained on (all ranks alike): seeds the label dropout
        self.lineage = self._check_tokens()
        self._tokenizer: Optional[nn.Module] = None

    # -- the tokens and where they come from -------------------------------------------------------
    def _check_tokens(self) -> dict[str, Any]:
        """Refuse tokens encoded by another tokenizer export, or of another shape than the prior's, before any
        engine is built; the lineage recorded in the index (for MLflow tags and the export)."""
        cfg, t, p = self.cfg, self.cfg.tokens, self.cfg.prior
        if not Path(cfg.tokenizer).expanduser().is_file():
            raise FileNotFoundError(f"tokenizer={cfg.tokenizer!r} does not exist: give the tokenizer export the "
                                    f"token shards were encoded with (train stage 1, or launch/export_tokenizer.py)")
        index = check_lineage(t.train_tokens, cfg.tokenizer, index=t.index)
        if t.val_tokens:
            check_lineage(t.val_tokens, cfg.tokenizer)
        check_prior_fits(p, index_token_facts(index), source="their tokenizer",
                         what=f"the prior does not fit the token shards {t.train_tokens} (encoded by the tokenizer "
                              f"{cfg.tokenizer})")
        info = index["tokens"]
        tok = info["tokenizer"]
        return {"tokenizer_sha256": tok["sha256"], "tokenizer_mlflow_run_id": tok.get("mlflow_run_id") or "none",
                "tokens_index_sha256": index_checksum(t.train_tokens, t.index) or "none",
                "tokens_augment": str(info.get("augment"))}

    def tags(self) -> dict[str, str]:
        return dict(self.lineage)

    def linked_runs(self, run_id: str) -> dict[str, dict[str, str]]:
        """The tokenizer's stage-1 run (when its export names one) gets a tag pointing at this prior run."""
        stage1 = self.lineage["tokenizer_mlflow_run_id"]
        return {} if stage1 == "none" else {stage1: {f"prior_run.{run_id}": self.cfg.train.out_dir}}

    def train_stream(self, state: Optional[dict[str, Any]]) -> Stream:
        return build_token_stream(self.cfg.tokens, shards=self.cfg.tokens.train_tokens,
                                  batch_size=self.cfg.train.micro_batch_size, rank=self.dist.rank,
                                  world_size=self.dist.world_size, seed=self.cfg.train.seed, state=state)

    # -- construction -------------------------------------------------------------------------
    def build_modules(self) -> dict[str, nn.Module]:
        return {"prior": Prior(self.cfg.prior)}

    def optim_config(self, name: str) -> OptimConfig:
        return self.cfg.optim

    def schedule_steps(self, name: str) -> int:
        return self.cfg.train.steps

    def attach(self, engines: dict[str, Any]) -> None:
        self.engines = engines

    @property
    def prior(self) -> Prior:
        return self.engines["prior"].module

    def on_start(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"micro_steps": self.micro_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_steps = int(state["micro_steps"])

    # -- one micro-step -----------------------------------------------------------------------
    def _labels(self, batch: dict[str, Any]) -> Optional[torch.Tensor]:
        """Training labels after label dropout (None: an unconditional prior)."""
        p = self.cfg.prior
        if not p.num_classes:
            return None
        labels = batch["label"].to(self.dist.device)
        if p.label_dropout == 0:
            return labels
        seed = np.random.SeedSequence([self.cfg.train.seed, self.dist.rank, self.micro_steps]).generate_state(1, np.uint64)
        g = torch.Generator().manual_seed(int(seed[0] >> np.uint64(1)))
        return self.prior.drop_labels(labels, g)

    def micro_step(self, batch: dict[str, Any], step: int) -> Optional[dict[str, torch.Tensor]]:
        engine = self.engines["prior"]
        tokens = batch["tokens"].to(self.dist.device, non_blocking=True)  # (B, N) int64
        labels = self._labels(batch)
        logits = self.prior(tokens, labels)  # (B, N, V) fp32; through .module, as stage 1 (see its docstring)
        loss, acc = prior_loss(logits, tokens)
        if any_rank(not torch.isfinite(loss).item(), self.dist.device):
            return None  # nothing changed: the next micro-batch draws the same label dropout
        engine.backward(loss)
        engine.step()
        self.micro_steps += 1
        return {"loss": loss.detach(), "token_accuracy": acc}

    def engine_metrics(self) -> dict[str, float]:
        e = self.engines["prior"]
        return {"train/lr": e.get_lr()[0], "train/grad_norm": grad_norm(e)}

    # -- validation, pictures, export -----------------------------------------------------------
    @property
    def has_validation(self) -> bool:
        return bool(self.cfg.tokens.val_tokens)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss (nats per token) and token accuracy over ``val_batches`` micro-batches per rank, no dropout."""
        loader = build_token_eval_loader(self.cfg.tokens.val_tokens, batch_size=self.cfg.train.micro_batch_size,
                                         rank=self.dist.rank, world_size=self.dist.world_size,
                                         index=self.cfg.tokens.index, verify=self.cfg.tokens.verify_shards)
        prior, p = self.prior, self.cfg.prior
        was_training = prior.training
        prior.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.dist.device)  # tokens, nats, correct
        for i, batch in enumerate(loader):
            if i >= self.cfg.train.val_batches:
                break
            tokens = batch["tokens"].to(self.dist.device)
            labels = batch["label"].to(self.dist.device) if p.num_classes else None
            logits = prior(tokens, labels)
            loss, acc = prior_loss(logits, tokens)
            n = tokens.numel()
            sums += torch.tensor([n, loss.item() * n, acc.item() * n], dtype=torch.float64, device=sums.device)
        prior.train(was_training)
        all_reduce_sum(sums)
        n = max(sums[0].item(), 1.0)
        return {"val/loss": sums[1].item() / n, "val/token_accuracy": sums[2].item() / n,
                "val/tokens": sums[0].item()}

    def tokenizer(self) -> nn.Module:
        """The frozen fp32 tokenizer that decodes the sample grids (loaded on first use, on rank 0 only)."""
        if self._tokenizer is None:
            from vitvq.models.tokenizer import Tokenizer
            self._tokenizer = Tokenizer.load_export(self.cfg.tokenizer, map_location=self.dist.device).requires_grad_(False)
        return self._tokenizer

    def pictures(self) -> dict[str, np.ndarray]:
        if not self.dist.is_main:  # the prior runs no collectives: rank 0 draws alone
            return {}
        return {"samples": self.sample_grid()}

    @torch.no_grad()
    def sample_grid(self) -> np.ndarray:
        """Rows of ``samples.per_class`` samples of each class in ``samples.classes``, uint8 (H, W, 3): sample i of
        the grid is sample i of ``launch/sample.py --classes <classes> --per-class <per_class> --seed <seed>`` with
        the same settings (``evaluation.sampling.SamplePlan``: class-major order, a seed per sample)."""
        s, p = self.cfg.samples, self.cfg.prior
        if p.num_classes:
            plan = SamplePlan(tuple(s.classes), s.per_class, s.seed)
        else:  # one class, the null one: len(classes) rows of its first samples
            plan = SamplePlan((p.null_class,), len(s.classes) * s.per_class, s.seed, conditional=False)
        idx = np.arange(plan.n)
        labels = torch.from_numpy(plan.labels(idx)).to(self.dist.device)
        gens = plan.generators(idx)
        settings = s.sampling_settings() if p.num_classes else replace(s.sampling_settings(), cfg_scale=1.0)
        tokens = generate(self.prior, labels, settings, generators=gens)
        tok = self.tokenizer()
        images = tok.to_image(tok.decode_codes(tokens.view(-1, p.grid, p.grid)).float()).clamp(-1, 1)
        return image_grid(images.cpu(), s.per_class, min_width=256)  # tiny images enlarged

    def evaluator(self, export: Callable[[Optional[str], Path], Path]) -> Optional[Evaluator]:
        return None

    @classmethod
    def write_export(cls, cfg: Stage2Config, state: dict[str, torch.Tensor], dest: Path, extra: dict[str, Any]) -> Path:
        prior = Prior(cfg.prior)
        prior.load_state_dict(state, strict=True)
        tok = Path(cfg.tokenizer).expanduser()
        lineage = {"tokenizer": redact(str(tok)), "tokenizer_sha256": sha256_file(tok) if tok.is_file() else None,
                   "tokens": redact(cfg.tokens.train_tokens)}  # the export travels: no credential of a shard URL
        return prior.save_export(dest, {**extra, **lineage})

    def summary(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        keys = ("train/loss", "train/token_accuracy", "val/loss", "val/token_accuracy")
        out = Path(self.cfg.train.out_dir)
        return [(k, f"{metrics[k]:.4f}") for k in keys if k in metrics] + [
            ("samples", str(out / "samples.png")), ("prior export", str(out / self.export_file)),
            ("tokenizer", self.cfg.tokenizer)]


__all__ = ["SamplingSettings", "SampleGridConfig", "Stage2Config", "Stage2Task", "check_classes"]
