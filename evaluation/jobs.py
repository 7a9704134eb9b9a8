"""The evaluation package's jobs, each one function of one typed config: ``sample`` (images from a prior),
``ref_stats`` (reference statistics), ``rfid`` and ``gfid``. ``launch/sample.py`` and ``launch/evaluate.py`` derive
their flags from these configs (``configs/cli.py``) and call the functions; the pipeline calls them directly.

    cfg = GfidConfig(samples="samples.npz", ref="ref.npz", workers=0, extractor="tiny")
    print_result(cfg, gfid(cfg))    # the table; the job functions themselves print nothing

A value the job finds it cannot use (a prior that does not fit the tokenizer, a top_k beyond the vocabulary) is a
``ConfigError`` naming the field, as a refusal at load is. The machinery the jobs run is in ``sampling.py``
(plan, worker) and ``workers.py`` (the evaluation pool); the pool's resources are ``configs/pool.py``'s. Logging a
result into an MLflow run is the caller's (``launch/evaluate.py --mlflow-run``, ``trainer.tracking``): evaluation
sits below the trainer and imports no MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

import torch

from vitvq.configs import ConfigError, check, from_dict, to_dict
from vitvq.configs.pool import PoolJobConfig
from vitvq.data.shards import sha256_file
from vitvq.evaluation.metrics import save_ref_stats
from vitvq.evaluation.sampling import (ORDER_RULE, SEED_RULE, SampleJob, SamplePlan, SampleSet, check_exports,
                                       classes_text, sample_images, save_grid, save_npz)
from vitvq.evaluation.workers import EvalResult, Source, WorkerPool, compute_ref_stats, evaluate_gfid, evaluate_rfid
from vitvq.models import prior as prior_mod
from vitvq.models.sampling import SamplingSettings


# -- sampling ---------------------------------------------------------------------------------------------
@dataclass
class SampleConfig(PoolJobConfig, SamplingSettings, SampleSet):
    """Sample images from a trained prior for gFID: an ADM-style .npz, a picture of the first samples, the protocol."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("prior", "tokenizer", "out", "cfg_scale")  # a command line names them

    prior: str = ""
    """Prior export (prior.pt of a stage-2 run)."""
    tokenizer: str = ""
    """Tokenizer export whose codes the prior models."""
    out: str = ""
    """Output .npz (ADM's layout), with OUT.grid.png and OUT.protocol.json beside it."""
    grid_png: Optional[str] = None
    """Picture of the first samples (default: out with .grid.png)."""
    workers: int = 0
    gpus_per_worker: Optional[float] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    other_tokenizer: bool = False
    """Sample although ``tokenizer`` is not the export the prior's tokens came from (the prior records its sha256):
    e.g. a decoder fine-tuned on the same codes. Off: such a pair is refused, since codes decoded by another
    tokenizer make other images. Either way the protocol's notes record the pair."""

    def __post_init__(self) -> None:
        PoolJobConfig.__post_init__(self)
        SamplingSettings.__post_init__(self)
        SampleSet.__post_init__(self)
        check(bool(self.prior), "prior", self.prior, "name the prior export (prior.pt of a stage-2 run)")
        check(bool(self.tokenizer), "tokenizer", self.tokenizer,
              "name the tokenizer export the prior's tokens came from")
        check(Path(self.out).suffix == ".npz", "out", self.out,
              "must end in .npz (launch/evaluate.py gfid reads it by its suffix)")


def _plan(cfg: SampleConfig) -> tuple[SamplePlan, dict[str, Any]]:
    """The plan of ``cfg`` for its prior, and the prior export's extra; what the prior cannot take is refused as a
    ConfigError naming the field (a prior that does not fit the tokenizer: ``prior``)."""
    try:
        prior_export, _ = check_exports(cfg.prior, cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        only_tok = str(cfg.tokenizer) in str(e) and str(cfg.prior) not in str(e)
        raise ConfigError("tokenizer" if only_tok else "prior", cfg.tokenizer if only_tok else cfg.prior, str(e)) \
            from None
    p = from_dict(prior_mod.PriorConfig, prior_export["config"])
    if p.num_classes == 0:
        check(cfg.classes is None, "classes", cfg.classes,
              f"the prior {cfg.prior} is unconditional (num_classes 0); drop the classes")
        check(cfg.cfg_scale == 1, "cfg_scale", cfg.cfg_scale,
              f"the prior {cfg.prior} is unconditional: guidance needs classes, set cfg_scale 1")
    check(cfg.top_k <= p.vocab_size, "top_k", cfg.top_k,
          f"more than the prior's vocabulary of {p.vocab_size} tokens (0 = all tokens)")
    try:
        plan = SamplePlan.for_prior(p, cfg.per_class, cfg.seed, cfg.classes)
    except ValueError as e:
        raise ConfigError("classes", cfg.classes, str(e)) from None
    return plan, prior_export["extra"]


def sample(cfg: SampleConfig) -> dict[str, Any]:
    """Draw ``cfg``'s samples, write the .npz, the grid and the protocol; ``{"protocol", "protocol_path",
    "command"}`` (the gfid command to run next)."""
    device, gpus = cfg.placement(torch.cuda.is_available())
    plan, extra = _plan(cfg)
    prior_sha, tok_sha = sha256_file(cfg.prior), sha256_file(cfg.tokenizer)  # the files as sampling reads them
    trained_on = extra.get("tokenizer_sha256")
    check(cfg.other_tokenizer or trained_on in (None, tok_sha), "tokenizer", cfg.tokenizer,
          f"its sha256 is {tok_sha}, but the prior {cfg.prior} was trained on the tokens of the tokenizer export with "
          f"sha256 {trained_on}: name that export, or set other_tokenizer (--other-tokenizer) to decode its codes "
          f"with this one on purpose")
    out = Path(cfg.out)
    grid_png = Path(cfg.grid_png) if cfg.grid_png else out.with_suffix(".grid.png")
    job = SampleJob(plan, cfg.sampling_settings(), batch_size=cfg.batch_size)
    t0 = time.time()
    res = sample_images(cfg.prior, cfg.tokenizer, job, workers=cfg.workers, device=device, address=cfg.address,
                        cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=gpus, progress=cfg.progress)
    seconds = time.time() - t0
    save_npz(out, res.images, res.labels if plan.conditional else None)
    save_grid(grid_png, res.images, plan.grid_indices())

    notes = []
    if trained_on not in (None, tok_sha):
        notes.append(f"the prior was trained on tokens of a tokenizer export with sha256 {trained_on}, "
                     f"not {cfg.tokenizer} ({tok_sha}): decoded by another tokenizer on purpose (other_tokenizer)")
    if cfg.temperature == 0:
        notes.append("temperature 0 is greedy: every sample of a class is the same image")
    n, h, w = res.images.shape[:3]
    protocol = {
        "samples": n, "per_class": plan.per_class, "classes": classes_text(plan),
        "class_list": list(plan.classes) if plan.conditional else None, "order": ORDER_RULE,
        **to_dict(cfg.sampling_settings()), "seed_rule": SEED_RULE,
        "resolution": f"{h}x{w} (as decoded, uint8 round((x + 1) * 127.5))",
        "prior": str(Path(cfg.prior).resolve()), "prior_sha256": prior_sha,
        "prior_step": extra.get("step"), "tokenizer": str(Path(cfg.tokenizer).resolve()), "tokenizer_sha256": tok_sha,
        "batch_size": cfg.batch_size, "workers": cfg.workers, "device": device,
        "torch": res.worker["torch"], "seconds": round(seconds, 1), "npz": str(out.resolve()),
        "npz_layout": "arr_0 uint8 (N, H, W, 3)" + (", arr_1 int64 (N,) labels" if plan.conditional else ""),
        "grid_png": str(grid_png.resolve()), "notes": notes,
    }
    protocol_path = out.with_suffix(".protocol.json")
    tmp = protocol_path.with_name(protocol_path.name + ".tmp")
    tmp.write_text(json.dumps(protocol, indent=2))
    tmp.replace(protocol_path)
    command = f"python launch/evaluate.py gfid --samples {out} --ref REF.npz"
    return {"protocol": protocol, "protocol_path": str(protocol_path), "command": command}


def print_samples(result: dict[str, Any], say: Callable[[str], None] = print) -> None:
    """The protocol of ``sample``'s result as a table, its notes, and the command to run next."""
    protocol = result["protocol"]
    width = max(map(len, protocol)) + 2
    say(f"\n{protocol['samples']} samples -> {protocol['npz']}")
    for k, v in protocol.items():
        if k not in ("class_list", "notes"):
            say(f"  {k:<{width}}{v}")
    for note in protocol["notes"]:
        say(f"  !! {note}")
    say(f"protocol -> {result['protocol_path']}\nnext (REF.npz: ADM's VIRTUAL_imagenet256_labeled.npz for ImageNet "
        f"256, or launch/evaluate.py ref-stats):\n  {result['command']}")


# -- evaluation -------------------------------------------------------------------------------------------
@dataclass
class ExtractorSettings:
    """The feature network of FID and IS."""

    extractor: Literal["inception", "tiny", "inception-random"] = "inception"
    """The FID InceptionV3 (needs its weights file), or random stand-ins for tests and speed: NOT comparable to
    published numbers."""
    inception_weights: Optional[str] = None
    """Path of pt_inception-2015-12-05-6726825d.pth (else $VITVQ_INCEPTION_WEIGHTS, else the torch hub cache)."""


@dataclass
class GfidSettings(ExtractorSettings):
    """How gFID and IS are measured."""

    splits: int = 10
    """Inception Score splits."""

    def __post_init__(self) -> None:
        check(self.splits >= 1, "splits", self.splits, "must be >= 1")


@dataclass
class EvalConfig(PoolJobConfig, ExtractorSettings):
    """What every evaluation shares: the images taken, where the result goes."""

    command: ClassVar[str] = ""
    limit: Optional[int] = None
    """Only the first N images (folders and .npz; shards are taken whole)."""
    json: Optional[str] = None
    """Write the result as JSON to this path."""
    step: Optional[int] = None
    """Step the result is recorded (and logged) at (default: the export's step, else 0)."""

    def __post_init__(self) -> None:
        PoolJobConfig.__post_init__(self)
        check(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1 (or none: every image)")

    def _one_source(self, names: tuple[str, ...]) -> None:
        given = [n for n in names if getattr(self, n)]
        if len(given) != 1:  # named: the second one given, else the first that could be
            name = given[1] if given else names[0]
            raise ConfigError(name, getattr(self, name), f"give exactly one of {', '.join(names)}"
                              + (f" (got {', '.join(given)})" if given else ""))


@dataclass
class ImagesFrom:
    """Where the real images come from (one of them)."""

    shards: Optional[str] = None
    """Webdataset shards: path, brace pattern or index .json (as data.build_eval_loader reads them)."""
    images: Optional[str] = None
    """A folder of images (searched recursively, sorted)."""


@dataclass
class RefStatsConfig(EvalConfig, ImagesFrom):
    """Inception mean/covariance of a dataset, with the protocol they were measured under."""

    command: ClassVar[str] = "ref-stats"
    REQUIRED: ClassVar[tuple[str, ...]] = ("out",)
    npz: Optional[str] = None
    """An .npz of uint8 (N, H, W, 3) images under arr_0."""
    resolution: Optional[int] = None
    """Center crop + resize to this side (needed for shards; default for folders: as stored)."""
    out: str = ""
    """Output .npz (mu, sigma, count, protocol)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._one_source(("shards", "images", "npz"))
        check(not self.shards or self.resolution is not None, "resolution", self.resolution,
              "shards need the evaluation side, e.g. 256")
        check(self.resolution is None or self.resolution >= 1, "resolution", self.resolution, "must be >= 1")
        check(bool(self.out), "out", self.out, "name the output .npz")

    def title(self) -> str:
        return f"reference statistics -> {self.out}"


@dataclass
class RfidConfig(EvalConfig, ImagesFrom):
    """Reconstruction FID, PSNR, SSIM, LPIPS and codebook usage of a tokenizer."""

    command: ClassVar[str] = "rfid"
    REQUIRED: ClassVar[tuple[str, ...]] = ("tokenizer",)
    tokenizer: str = ""
    """Tokenizer export (launch/export_tokenizer.py)."""
    ref: Optional[str] = None
    """Reference statistics .npz (default: the evaluated originals)."""
    save_recons: Optional[str] = None
    """Write the reconstructions as PNGs into this folder."""
    lpips: Literal["auto", "vgg", "random", "off"] = "auto"
    """auto: vgg when torchvision's vgg16-397923af.pth is found, else off."""
    lpips_weights: Optional[str] = None
    """vgg16-397923af.pth (else the torch hub cache)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._one_source(("shards", "images"))
        check(bool(self.tokenizer), "tokenizer", self.tokenizer, "name the tokenizer export")

    def title(self) -> str:
        return f"rFID of {self.tokenizer}"


@dataclass
class GfidConfig(EvalConfig, GfidSettings):
    """FID and Inception Score of generated samples."""

    command: ClassVar[str] = "gfid"
    REQUIRED: ClassVar[tuple[str, ...]] = ("samples", "ref")
    samples: str = ""
    """A folder of PNGs, or an .npz of uint8 NHWC under arr_0 (ADM; launch/sample.py writes one)."""
    ref: str = ""
    """Reference statistics .npz (ours, or ADM's mu/sigma)."""

    def __post_init__(self) -> None:
        EvalConfig.__post_init__(self)
        GfidSettings.__post_init__(self)
        check(bool(self.samples), "samples", self.samples, "name the samples (.npz or a folder of PNGs)")
        check(bool(self.ref), "ref", self.ref, "name the reference statistics .npz")

    def title(self) -> str:
        return f"gFID / IS of {self.samples}"


def _pool(cfg: EvalConfig) -> WorkerPool:
    device, gpus = cfg.placement(torch.cuda.is_available())
    return WorkerPool(cfg.workers, cfg.extractor, cfg.inception_weights, device, cfg.address, cfg.cpus_per_worker,
                      gpus)


def _finish(cfg: EvalConfig, result: EvalResult) -> dict[str, Any]:
    """The result as a dict (``command``, ``metrics``, ``protocol``, ``step``, ...), written to ``cfg.json``."""
    if result.step is None:
        result.step = cfg.step if cfg.step is not None else 0
    result.protocol["workers"] = cfg.workers
    out = {"command": cfg.command, **result.to_json()}
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(out, indent=2, default=str))
    return out


def ref_stats(cfg: RefStatsConfig) -> dict[str, Any]:
    """Reference statistics of ``cfg``'s images, written to ``cfg.out``; the result dict (metric: ``count``)."""
    source = Source(images=cfg.images, npz=cfg.npz, shards=cfg.shards, resolution=cfg.resolution,
                    limit=cfg.limit if not cfg.shards else None)
    pool = _pool(cfg)
    try:
        t0 = time.time()
        stats, protocol = compute_ref_stats(pool, source, cfg.batch_size, cfg.progress)
        save_ref_stats(cfg.out, stats, protocol)
        result = EvalResult({"count": stats.n}, protocol, seconds=time.time() - t0)
    finally:
        pool.close()
    return _finish(cfg, result)


def rfid(cfg: RfidConfig) -> dict[str, Any]:
    """rFID, PSNR, SSIM, LPIPS and codebook usage of ``cfg.tokenizer``; the result dict."""
    source = Source(images=cfg.images, shards=cfg.shards, limit=cfg.limit if not cfg.shards else None)
    pool = _pool(cfg)
    try:
        result = evaluate_rfid(pool, cfg.tokenizer, source, cfg.ref, cfg.batch_size, cfg.lpips, cfg.lpips_weights,
                               cfg.save_recons, cfg.step, cfg.progress)
    finally:
        pool.close()
    return _finish(cfg, result)


def gfid(cfg: GfidConfig) -> dict[str, Any]:
    """FID against ``cfg.ref`` and IS of ``cfg.samples``, with how they were drawn (``sampling.*``); the result."""
    is_npz = Path(cfg.samples).suffix == ".npz"
    source = Source(npz=cfg.samples if is_npz else None, images=None if is_npz else cfg.samples, limit=cfg.limit)
    pool = _pool(cfg)
    try:
        result = evaluate_gfid(pool, source, cfg.ref, cfg.batch_size, cfg.splits, cfg.progress)
        result.protocol.update(sampling_protocol(cfg.samples))
    finally:
        pool.close()
    return _finish(cfg, result)


def sampling_protocol(samples: Optional[str]) -> dict[str, Any]:
    """How the samples were drawn (``sample`` writes ``<samples>.protocol.json`` beside the .npz): the sample count,
    classes, every sampling setting, seeds and the model files, as ``sampling.*`` entries of the gFID protocol; a
    note when there is none."""
    if not samples or not samples.endswith(".npz"):
        return {}
    path = Path(samples).with_suffix(".protocol.json")
    if not path.is_file():
        return {"sampling": f"unknown: no {path.name} beside the samples (not written by launch/sample.py)"}
    keep = ("samples", "per_class", "classes", *(f.name for f in fields(SamplingSettings)), "seed_rule", "prior",
            "prior_sha256", "prior_step", "tokenizer", "tokenizer_sha256")
    drawn = json.loads(path.read_text())
    return {f"sampling.{k}": drawn[k] for k in keep if k in drawn}


def print_result(cfg: EvalConfig, result: dict[str, Any], say: Callable[[str], None] = print) -> None:
    """An evaluation's result as a table: metrics and seconds, then the protocol and its warnings."""
    values = {**result["metrics"], "seconds": round(result["seconds"], 1)}
    protocol = result["protocol"]
    width = max(len(k) for k in [*values, *protocol]) + 2
    say(f"\n{cfg.title()}")
    for k, v in values.items():
        say(f"  {k:<{width}}{v:.6g}" if isinstance(v, float) else f"  {k:<{width}}{v}")
    say("protocol")
    for k, v in protocol.items():
        say(f"  {k:<{width}}{json.dumps(v) if isinstance(v, dict) else v}")
    if not protocol.get("comparable_to_papers", False):
        say("  !! NOT comparable to published numbers: not the verified InceptionV3 weights")
    for n in result["warnings"]:
        say(f"  !! {n}")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """The evaluation job of ``cfg``'s type: ``ref_stats``, ``rfid`` or ``gfid``."""
    job = next(fn for cls, fn in ((RefStatsConfig, ref_stats), (RfidConfig, rfid), (GfidConfig, gfid))
               if isinstance(cfg, cls))
    return job(cfg)

__all__ = ["SampleConfig", "sample", "print_samples", "ExtractorSettings", "GfidSettings", "EvalConfig",
           "RefStatsConfig", "RfidConfig", "GfidConfig", "ref_stats", "rfid", "gfid", "print_result",
           "sampling_protocol", "evaluate"]
