"""Evaluation while training goes on: tokenizer exports handed to the worker pool, results polled back.

The stage-1 trainer (rank 0) submits each checkpoint's export and logs the rFID when it arrives; see
``vitvq.evaluation.workers`` for the pool and the metrics, which are the same as ``launch/evaluate.py rfid``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from vitvq.evaluation.inception import resolve_inception_weights
from vitvq.evaluation.data import Source
from vitvq.evaluation.workers import EvalResult, WorkerPool, compute_ref_stats, evaluate_rfid
from vitvq.evaluation.metrics import RefStats, load_ref_stats


class AsyncEvaluator:
    """Evaluates tokenizer exports in the background while training goes on (stage-1 trainer, rank 0).

        evaluator = AsyncEvaluator(Source(shards=cfg.data.val_shards, resolution=256), ref="ref.npz", workers=2)
        evaluator.submit(export_path, step)        # returns at once
        for r in evaluator.poll():                 # finished ones, in step order; each has .metrics and .protocol
            tracker.log_metrics(r.metrics, step=r.step)
        evaluator.close()                          # waits for the queue; evaluator.wait() returns the rest

    Jobs run one after another on one background thread that drives the worker pool (built on the first job,
    so the constructor returns at once as well). Without ``ref`` the statistics of the originals are computed
    on the first job and reused. A failed evaluation comes back as a result with ``error`` set instead of
    raising into the training loop.
    """

    def __init__(self, source: Source, ref: Optional[str] = None, workers: int = 1, extractor: str = "inception",
                 inception_weights: Optional[str] = None, batch_size: int = 32, lpips: str = "auto",
                 lpips_weights: Optional[str] = None, device: str = "cpu", address: Optional[str] = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0):
        if extractor == "inception":  # fail at start-up, not hours later on the first checkpoint
            inception_weights = str(resolve_inception_weights(inception_weights))
        self.source, self.batch_size = source, batch_size
        self.lpips, self.lpips_weights = lpips, lpips_weights
        self._ref: Optional[RefStats] = load_ref_stats(ref) if ref else None
        self._ref_path = ref
        self._pool_args = dict(workers=workers, extractor=extractor, weights=inception_weights, device=device,
                               address=address, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
        self._pool: Optional[WorkerPool] = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitvq-eval")
        self._futures: list[tuple[int, Future]] = []

    def submit(self, export_path: str | Path, step: int) -> None:
        self._futures.append((step, self._thread.submit(self._evaluate, str(export_path), step)))

    def _evaluate(self, export_path: str, step: int) -> EvalResult:
        t0 = time.time()
        try:
            if self._pool is None:
                self._pool = WorkerPool(**self._pool_args)
            source = self.source
            if self._ref is None:  # rFID against the originals: their statistics once, for every checkpoint
                from vitvq.models.tokenizer import Tokenizer
                if source.resolution is None:
                    source = replace(source, resolution=Tokenizer.load_export(export_path).cfg.image_size)
                stats, protocol = compute_ref_stats(self._pool, source, self.batch_size, progress=False)
                mu, sigma = stats.mean_cov()
                self._ref = RefStats(mu, sigma, protocol)
            res = evaluate_rfid(self._pool, export_path, source, self._ref, self.batch_size, self.lpips,
                                self.lpips_weights, step=step, progress=False)
            if self._ref_path is None:
                res.protocol["reference"] = "the evaluated originals (same images, same crop)"
            res.step = step
            return res
        except Exception as e:  # reported to the trainer through poll(), never raised into its loop
            return EvalResult({}, {"tokenizer": export_path}, step=step, seconds=time.time() - t0,
                              error=f"{type(e).__name__}: {e}")

    def poll(self) -> list[EvalResult]:
        """The evaluations finished since the last call (in submission order); never blocks."""
        done = [f for f in self._futures if f[1].done()]
        self._futures = [f for f in self._futures if not f[1].done()]
        return [f.result() for _, f in done]

    def wait(self, timeout: Optional[float] = None) -> list[EvalResult]:
        """Block until every submitted evaluation has finished; returns those not yet polled."""
        out = [f.result(timeout=timeout) for _, f in self._futures]
        self._futures = []
        return out

    @property
    def pending(self) -> int:
        return len(self._futures)

    def close(self) -> list[EvalResult]:
        """Finish the queue, stop the workers; returns the results not yet polled."""
        out = self.wait()
        self._thread.shutdown(wait=True)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        return out

    def __enter__(self) -> "AsyncEvaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["AsyncEvaluator"]
