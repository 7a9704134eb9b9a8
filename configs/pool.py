"""A pool's resources, declared once: where a bulk job (sampling, evaluation, token encoding) runs.

``data/pool.ActorPool`` runs such jobs on Ray actors or in this process. The jobs' configs inherit
``PoolJobConfig`` (``evaluation/jobs.py``, ``data/encode.py``: hence the flags ``--workers``, ``--device``, ...), and
the pipeline's bulk steps ``PoolConfig`` (``launch/orchestration/pipeline_config.py``), each with its own defaults. Standard
library only (plus ``configs.schema``), so that every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from vitvq.configs.schema import ConfigError, check


@dataclass
class PoolConfig:
    """Where a bulk job runs: Ray actors (or this process), each with these resources."""

    workers: int = 1
    """Ray actors (0: in this process, no Ray)."""
    cpus_per_worker: float = 1
    """CPU cores (and torch threads) per actor."""
    gpus_per_worker: Optional[float] = 0
    """GPUs per actor (fractions share a GPU); none: 1 with device cuda and workers > 0, else 0."""
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """torch device of the model in the actors (auto: cuda when available; cuda in actors needs GPUs per worker)."""
    batch_size: int = 32
    """Images per forward pass in a worker."""

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers", self.workers, "must be >= 0 (0: in this process)")
        check(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        check(self.gpus_per_worker is None or self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker,
              "must be >= 0")
        check(self.device != "cuda" or self.gpus_per_worker != 0 or self.workers == 0, "device", self.device,
              "cuda in Ray actors needs gpus_per_worker > 0 (Ray hides GPUs from actors that ask for none)")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")

    def placement(self, cuda_available: bool) -> tuple[str, float]:
        """(device, GPUs per worker) with ``auto`` and ``none`` resolved, given whether this process sees CUDA
        (``torch.cuda.is_available()``)."""
        device = ("cuda" if cuda_available else "cpu") if self.device == "auto" else self.device
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if device == "cuda" and self.workers > 0 else 0.0
        if device == "cuda" and self.workers > 0 and gpus == 0:
            raise ConfigError("gpus_per_worker", gpus, "must be > 0 with device cuda and workers > 0 (Ray hides GPUs "
                                                       "from actors that ask for none)")
        if device == "cuda" and self.workers == 0 and not cuda_available:
            raise ConfigError("device", self.device, "cuda is not available in this process; use cpu")
        return device, float(gpus)


@dataclass
class PoolJobConfig(PoolConfig):
    """A job that starts its own pool: on which Ray cluster, and whether it shows progress."""

    address: Optional[str] = None
    """An existing Ray cluster (auto, ray://HOST:10001; default: start a local one)."""
    progress: bool = True
    """Show a progress bar."""


__all__ = ["PoolConfig", "PoolJobConfig"]
