"""Evaluation workers: a pool of Ray actors that run Inception (and the tokenizer) over slices of a dataset.

Each worker loads the feature extractor once, takes its slice of the data (``vitvq.evaluation.data``: index striding
over a folder or an ``.npz``, ``rank/world_size`` over shards), accumulates the sums of ``vitvq.evaluation.metrics`` and
hands them back; the driver adds them up, so FID/IS are the same for any number of workers. ``WorkerPool`` is an
``data.pool.ActorPool`` of these workers (the pool itself knows nothing of Inception).

    pool = WorkerPool(workers=2, extractor="inception", weights=None)   # Ray local cluster unless address=...
    res = evaluate_gfid(pool, Source(npz="samples.npz"), ref="VIRTUAL_imagenet256_labeled.npz")
    res.metrics   # {"eval/fid": ..., "eval/is": ..., "eval/is_std": ...}, res.protocol: how it was measured

``workers=0`` runs the same code in this process without Ray. ``vitvq.evaluation.async_eval.AsyncEvaluator`` wraps a
pool for training.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from vitvq.evaluation.inception import build_extractor, resolve_inception_weights
from vitvq.data.pool import ActorPool
from vitvq.evaluation.data import IndexedData, Source, shard_batches  # Source re-exported: the API takes it
from vitvq.evaluation.metrics import (LPIPS_MODES, NETWORK_KEYS, PROTOCOL_KEYS_MUST_MATCH, FIDStats, ISStats, ReconStats,
                             RefStats, build_lpips, fid_against, is_split_ids, load_ref_stats, protocol_mismatches,
                             resolve_lpips_mode, to_uint8)


# -- one worker --------------------------------------------------------------------------------------------
@dataclass
class Job:
    source: Source
    batch_size: int = 32
    image_stats: bool = True  # FID statistics of the source images
    is_splits: int = 0  # > 0: Inception Score of the source images over that many splits (folders / .npz)
    tokenizer: Optional[str] = None  # rFID: reconstruct through this export, statistics of the reconstructions
    lpips: str = "off"  # auto | vgg | random | off (vitvq.evaluation.metrics.LPIPS_MODES)
    lpips_weights: Optional[str] = None  # torchvision vgg16-397923af.pth, else the torch hub cache
    save_recons: Optional[str] = None


@dataclass
class Partial:
    """What a worker accumulated; ``a + b`` merges two workers exactly."""

    images: Optional[FIDStats] = None
    recons: Optional[FIDStats] = None
    isc: Optional[ISStats] = None
    recon: Optional[ReconStats] = None

    def __add__(self, other: "Partial") -> "Partial":
        def add(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else a + b
        return Partial(*(add(getattr(self, k), getattr(other, k)) for k in ("images", "recons", "isc", "recon")))


class EvalWorker:
    """Holds the extractor (loaded once) and runs jobs on its slice; a Ray actor, or a plain object (workers=0)."""

    def __init__(self, extractor: str = "inception", weights: Optional[str] = None, device: str = "cpu",
                 threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.extractor = build_extractor(extractor, weights, self.device)
        self._lpips: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        return dict(self.extractor.protocol)

    def start(self, job: Job, rank: int, world_size: int) -> int:
        """Prepare this worker's slice; returns its number of images."""
        self.job, self.acc, self.done = job, Partial(), False
        self.tok, self.lpips_net = None, None
        if job.tokenizer is not None:
            from vitvq.models.tokenizer import Tokenizer
            self.tok = Tokenizer.load_export(job.tokenizer).to(self.device).eval()
            key = f"{job.lpips}:{job.lpips_weights}"
            if key not in self._lpips:  # built once per worker, like the extractor
                net = build_lpips(job.lpips, job.lpips_weights)
                self._lpips[key] = net.to(self.device) if net is not None else None
            self.lpips_net = self._lpips[key]
        if job.source.indexed:
            data = IndexedData(job.source)
            own = np.arange(rank, data.n, world_size)  # index striding: worker r takes r, r + W, r + 2W, ...
            self.split_ids = is_split_ids(data.n, job.is_splits) if job.is_splits else None
            chunks = [own[i:i + job.batch_size] for i in range(0, len(own), job.batch_size)]
            self.batches = ((data.load(c), list(c)) for c in chunks)
            return len(own)
        if job.is_splits:
            raise ValueError("Inception Score needs globally indexed samples: give a folder or an .npz")
        from vitvq.data import build_eval_loader  # webdataset stays out of processes that read folders only
        if job.source.resolution is None:
            raise ValueError("shards need a resolution (the evaluation crop size)")
        loader = build_eval_loader(job.source.shards, image_size=job.source.resolution, batch_size=job.batch_size,
                                   rank=rank, world_size=world_size, num_workers=0, pixel_range="minus_one_one",
                                   index=job.source.index, verify=job.source.verify)
        self.batches = shard_batches(loader)
        return loader.num_samples

    @torch.no_grad()
    def step(self, max_batches: int = 1) -> tuple[int, bool]:
        """Process up to ``max_batches`` batches; returns (images processed, finished)."""
        count = 0
        for _ in range(max_batches):
            batch = next(self.batches, None)
            if batch is None:
                self.done = True
                break
            count += self._process(*batch)
        return count, self.done

    def _process(self, imgs: torch.Tensor, ids: list) -> int:
        job, acc = self.job, self.acc
        imgs = imgs.to(self.device)  # (B, 3, H, W) uint8
        if job.image_stats or job.is_splits:
            feats, logits = self.extractor(imgs)
            if job.image_stats:
                acc.images = acc.images or FIDStats.zeros(feats.shape[1])
                acc.images.update(feats)
            if job.is_splits:
                acc.isc = acc.isc or ISStats.zeros(logits.shape[1], job.is_splits)
                acc.isc.update(logits, self.split_ids[np.asarray(ids)])
        if self.tok is not None:
            x = imgs.float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1], the model boundary convention
            dec_out, q = self.tok(x)
            rec = self.tok.to_image(dec_out).float()  # (B, 3, H, W) in [-1, 1]
            rec8 = to_uint8(rec)
            feats, _ = self.extractor(rec8)
            acc.recons = acc.recons or FIDStats.zeros(feats.shape[1])
            acc.recons.update(feats)
            acc.recon = acc.recon or ReconStats()
            acc.recon.update(x, rec, q.indices, self.tok.vocab_size, self.lpips_net)
            if job.save_recons:
                _save_pngs(rec8, ids, job.save_recons)
        return int(imgs.shape[0])

    def result(self) -> Partial:
        return self.acc


def _save_pngs(imgs: torch.Tensor, ids: list, out: str) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    for img, i in zip(imgs.permute(0, 2, 3, 1).cpu().numpy(), ids):
        name = f"{i:06d}" if isinstance(i, (int, np.integer)) else re.sub(r"[^\w.-]", "_", str(i))
        Image.fromarray(img).save(Path(out) / f"{name}.png")


# -- the pool ----------------------------------------------------------------------------------------------
class WorkerPool(ActorPool):
    """``workers`` evaluation actors (``EvalWorker``; a local Ray cluster, or the one at ``address``), or one
    in-process worker (0). ``protocol`` is how they measure (network, weights, resize).

    The Inception weights are resolved and verified here, in the driver, so that a missing file fails before any
    actor starts, with the message that says where to put it.
    """

    def __init__(self, workers: int = 1, extractor: str = "inception", weights: Optional[str] = None,
                 device: str = "cpu", address: Optional[str] = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, startup_timeout: float = 600):
        if extractor == "inception":
            weights = str(resolve_inception_weights(weights))
        threads = max(1, int(cpus_per_worker)) if workers else 0
        super().__init__(EvalWorker, (extractor, weights, device, threads), workers=workers, address=address,
                         cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                         startup_timeout=startup_timeout, ready="protocol", what="evaluation")
        self.protocol: dict[str, Any] = self.ready_value

    def run(self, job: Job, desc: str = "eval", progress: bool = True) -> Partial:  # type: ignore[override]
        """Run ``job`` over all workers; merged statistics in worker order."""
        return super().run(job, desc=desc, progress=progress, unit="img")


# -- the three evaluations ---------------------------------------------------------------------------------
@dataclass
class EvalResult:
    metrics: dict[str, float]
    protocol: dict[str, Any]
    step: Optional[int] = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "protocol": self.protocol, "step": self.step, "seconds": self.seconds,
                "warnings": self.warnings, "error": self.error}


def _with_ref(protocol: dict[str, Any], ref: RefStats, ref_path: Optional[str],
              keys: tuple[str, ...] = PROTOCOL_KEYS_MUST_MATCH, extra: Optional[list[str]] = None) -> list[str]:
    """Record the reference in the protocol; warn when its protocol differs from ours (numbers not comparable)."""
    protocol["reference"] = str(ref_path)
    protocol["reference_protocol"] = ref.protocol
    issues = protocol_mismatches(ref.protocol, protocol, keys) + list(extra or [])
    for msg in issues:
        warnings.warn(f"reference statistics were made differently, FID not comparable: {msg}")
    return issues


def compute_ref_stats(pool: WorkerPool, source: Source, batch_size: int = 32,
                      progress: bool = True) -> tuple[FIDStats, dict[str, Any]]:
    part = pool.run(Job(source, batch_size=batch_size), desc="ref-stats", progress=progress)
    protocol = {**pool.protocol, **source.describe(), "count": part.images.n}
    return part.images, protocol


def evaluate_gfid(pool: WorkerPool, source: Source, ref: str | RefStats, batch_size: int = 32, splits: int = 10,
                  progress: bool = True) -> EvalResult:
    """FID against ``ref`` and Inception Score (``splits`` splits) of generated samples."""
    t0 = time.time()
    ref_stats = ref if isinstance(ref, RefStats) else load_ref_stats(ref)
    part = pool.run(Job(source, batch_size=batch_size, is_splits=splits), desc="gfid", progress=progress)
    is_mean, is_std = part.isc.score()
    metrics = {"eval/fid": fid_against(part.images, ref_stats), "eval/is": is_mean, "eval/is_std": is_std}
    h, w = IndexedData(source).load(np.array([0])).shape[2:]  # samples are used as generated, never cropped
    protocol = {**pool.protocol, **source.describe(), "resolution": f"{h}x{w} (as generated)",
                "count": part.images.n, "is_splits": splits,
                "is_split_rule": "torch-fidelity: permutation seed 2020 over sample index, contiguous chunks"}
    ref_side = ref_stats.protocol.get("resolution")
    size_issue = ([f"resolution: reference {ref_side}x{ref_side} vs samples {h}x{w}"]
                  if isinstance(ref_side, int) and (h, w) != (ref_side, ref_side) else [])
    issues = _with_ref(protocol, ref_stats, "given statistics" if isinstance(ref, RefStats) else str(ref),
                       NETWORK_KEYS, size_issue)
    return EvalResult(metrics, protocol, seconds=time.time() - t0, warnings=issues)


def evaluate_rfid(pool: WorkerPool, tokenizer: str, source: Source, ref: Optional[str | RefStats] = None,
                  batch_size: int = 32, lpips: str = "auto", lpips_weights: Optional[str] = None,
                  save_recons: Optional[str] = None, step: Optional[int] = None, progress: bool = True) -> EvalResult:
    """rFID (reconstructions vs ``ref``, or vs the evaluated originals when no ``ref``), PSNR, SSIM, LPIPS,
    codebook usage and perplexity of ``tokenizer`` on ``source`` (cropped to the tokenizer's resolution)."""
    from vitvq.models.tokenizer import Tokenizer
    t0 = time.time()
    tok = Tokenizer.load_export(tokenizer)  # in the driver: a bad path fails here, and gives resolution and step
    if source.resolution is None:
        source = replace(source, resolution=tok.cfg.image_size)
    if step is None:
        step = getattr(tok, "export_extra", {}).get("step")
    del tok
    lpips = resolve_lpips_mode(lpips, lpips_weights)  # decided once here, not differently on each machine
    if lpips == "vgg":
        from vitvq.models.perceptual import find_backbone_file
        find_backbone_file("vgg", lpips_weights)  # a missing file fails before any worker starts
    ref_stats = load_ref_stats(ref) if isinstance(ref, (str, Path)) else ref
    job = Job(source, batch_size=batch_size, image_stats=ref_stats is None, tokenizer=str(tokenizer),
              lpips=lpips, lpips_weights=lpips_weights, save_recons=save_recons)
    part = pool.run(job, desc="rfid", progress=progress)
    if ref_stats is None:
        mu, sigma = part.images.mean_cov()
        ref_stats = RefStats(mu, sigma, {"source": "the evaluated originals"})
    summary = part.recon.summary()
    metrics = {"eval/rfid": fid_against(part.recons, ref_stats), **{f"eval/{k}": v for k, v in summary.items()}}
    protocol = {**pool.protocol, **source.describe(), "count": part.recons.n, "tokenizer": str(tokenizer),
                "lpips": LPIPS_MODES[lpips],
                "psnr_ssim": "per image on [0,1] floats, mean over images; SSIM gaussian 11/1.5 over the valid "
                             "region (torchmetrics map, as scikit-image)"}
    if ref is None:
        protocol["reference"] = "the evaluated originals (same images, same crop)"
        issues: list[str] = []
    else:
        issues = _with_ref(protocol, ref_stats, ref if isinstance(ref, (str, Path)) else "given statistics")
    return EvalResult(metrics, protocol, step=step, seconds=time.time() - t0, warnings=issues)


__all__ = ["Source", "Job", "Partial", "EvalWorker", "WorkerPool", "EvalResult", "compute_ref_stats",
           "evaluate_gfid", "evaluate_rfid"]
