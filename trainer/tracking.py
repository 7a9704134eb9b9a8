"""Experiment tracking: the one module in the project that imports MLflow.

The trainer holds a ``Tracker`` on every rank. ``make_tracker`` gives rank 0 an ``MLflowTracker`` and every
other rank (or a run with tracking off) a ``NullTracker`` whose methods do nothing, so the training loop never
needs ``if rank == 0`` around a log call. Only rank 0 writes because MLflow's default store is SQLite, which
takes one writer at a time.

    tracker = make_tracker(rank, enabled=True, experiment="vitvq-stage1", run_name="demo", run_id=None)
    tracker.log_params(flatten(cfg))                      # once, for a new run
    tracker.log_metrics({"train/total_loss": 0.31}, step=100)
    tracker.log_image(grid_uint8_hwc, "reconstructions", step=100)   # -> images/reconstructions_step0000100.png
    tracker.close("FINISHED")

Where runs go: the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else MLflow's default
(``sqlite:///mlflow.db`` in the working directory for MLflow 3.x).

A resumed run (``run_id=`` from the checkpoint) continues the SAME MLflow run instead of starting another, unless
the folder it resumes in is not the one the run was started in (tag ``vitvq.out_dir``): a copied run folder
(``cp -r runs/a runs/b``) starts a new run tagged ``copied_from_run_id`` rather than writing into the original's
(issue 20, item 9). Names, params and tags pass through ``configs/redact.py``: no secret reaches the store.
MLflow's usage telemetry is off unless ``MLFLOW_DISABLE_TELEMETRY`` says otherwise: offline, its background client
slowed training steps many-fold. The rules for resumed params and tags, long params, non-finite values and store
errors, and that measurement: README, "Design notes".
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vitvq.configs.redact import redact, redact_config

STATUSES = ("FINISHED", "FAILED", "KILLED")
OUT_DIR_TAG = "vitvq.out_dir"
"""The resolved folder a run was created for: a resume from another folder (a copy) starts a new run."""
COPIED_TAG = "copied_from_run_id"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported; see the docstring


class Tracker(ABC):
    """What the trainer may call; identical on every rank. Use as a context manager to close on errors."""

    run_id: Optional[str] = None

    @abstractmethod
    def log_params(self, flat: dict[str, Any]) -> None:
        """Record a flat ``{"model.encoder.width": 512, ...}`` dict as run params."""

    @abstractmethod
    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set (overwrite) run tags."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalars (floats, ints or 0-d tensors) at a training step."""

    @abstractmethod
    def log_image(self, image: Any, name: str, step: int) -> None:
        """Store an (H, W, 3) uint8 image (numpy, torch or PIL) as ``images/<name>_step<step:07d>.png``."""

    @abstractmethod
    def log_figure(self, figure: Any, name: str, step: Optional[int] = None) -> None:
        """Store a matplotlib figure as ``figures/<name>[_step<step:07d>].png``."""

    def tag_other_run(self, run_id: str, tags: dict[str, Any]) -> bool:
        """Set tags on another run of this store (a link back from a run that builds on it); False if absent."""
        return False

    @abstractmethod
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Upload a file or a whole folder into the run's artifacts (under ``artifact_path``)."""

    @abstractmethod
    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED``; later calls do nothing."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class NullTracker(Tracker):
    """The tracker of ranks other than 0 and of runs without tracking: every call is a no-op."""

    run_id = None

    def log_params(self, flat: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: Any, name: str, step: int) -> None:
        pass

    def log_figure(self, figure: Any, name: str, step: Optional[int] = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker(Tracker):
    """One MLflow run, written through ``MlflowClient`` (no global active run, so tests and tools can hold
    several trackers in one process)."""

    def __init__(self, experiment: str, run_name: Optional[str] = None, tracking_uri: Optional[str] = None,
                 run_id: Optional[str] = None, tags: Optional[dict[str, Any]] = None,
                 out_dir: Optional[str] = None) -> None:
        self.client = mlflow_client(tracking_uri)
        self.tracking_uri: str = self.client.tracking_uri
        self.experiment_id = get_or_create_experiment(self.client, redact(experiment))
        self.closed = False
        run = self._existing_run(run_id) if run_id else None
        copied_from = None
        if run is not None and out_dir and run.data.tags.get(OUT_DIR_TAG, out_dir) != out_dir:
            copied_from, run = run, None
        self.created = run is None
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=redact(run_name) if run_name else None)
            self.resume_index = 0
            if copied_from is not None:  # a copy of another run's folder: its history is the original's, not ours
                self.client.set_tag(run.info.run_id, COPIED_TAG, run_id)
                print(f"tracking: {out_dir} is a copy of {copied_from.data.tags[OUT_DIR_TAG]}, whose MLflow run is "
                      f"{run_id}; this folder's run is a new one, {run.info.run_id} (tag {COPIED_TAG})", flush=True)
            elif run_id:  # the checkpoint named a run this store does not have: keep a trace of it
                self.client.set_tag(run.info.run_id, "resume.missing_run_id", run_id)
            if out_dir:
                self.client.set_tag(run.info.run_id, OUT_DIR_TAG, out_dir)
        else:
            # start_run(run_id=...) does the same: the run goes back to RUNNING and keeps its history.
            self.client.update_run(run.info.run_id, status="RUNNING")
            self.resume_index = int(run.data.tags.get("resume.count", "0")) + 1
            self.client.set_tag(run.info.run_id, "resume.count", str(self.resume_index))
            if out_dir and OUT_DIR_TAG not in run.data.tags:  # a run from before the tag: it lives here from now on
                self.client.set_tag(run.info.run_id, OUT_DIR_TAG, out_dir)
                run = self.client.get_run(run.info.run_id)
        self.run_id = run.info.run_id
        self._params: dict[str, str] = dict(run.data.params)
        self._tags: dict[str, str] = dict(run.data.tags)
        if tags:
            self._set_initial_tags(tags)

    def _existing_run(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            warnings.warn(f"MLflow run {run_id} (from the checkpoint) is not in {redact(self.tracking_uri)}; "
                          f"starting a new run (tag resume.missing_run_id)")
            return None
        if run.info.lifecycle_stage == "deleted":  # logging to a deleted run raises; bring it back
            warnings.warn(f"MLflow run {run_id} was deleted; restoring it to continue")
            self.client.restore_run(run_id)
        return run

    def _set_initial_tags(self, tags: dict[str, Any]) -> None:
        """New run: set them all. Resumed run: add missing ones; a changed value goes to ``resume.<n>.<key>``."""
        out = {}
        for key, value in tags.items():
            key = clean_key(key)
            old = self._tags.get(key)
            if self.resume_index == 0 or old is None:
                out[key] = value
            elif old != clip(redact(str(value), key), tag_limit()):
                out[f"resume.{self.resume_index}.{key}"] = value
        self.set_tags(out)

    def log_params(self, flat: dict[str, Any]) -> None:
        from mlflow.entities import Param
        new, changed = {}, {}
        for key, value in redact_config(flat).items():  # no secret becomes a param (configs/redact.py decides)
            key, value = clean_key(key), clip(value, param_limit())
            if key not in self._params:
                new[key] = value
            elif self._params[key] != value:  # params are immutable: keep the first, tag the new value
                changed[f"resume.{self.resume_index}.{key}"] = value
        # MlflowClient.log_batch splits the list into requests of MLflow's limit (100 params) itself (3.x).
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])
        self._params.update(new)
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag
        items = [(clean_key(k), clip(redact(str(v), k), tag_limit())) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items])
        self._tags.update(items)

    def tag_other_run(self, run_id: str, tags: dict[str, Any]) -> bool:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException
        try:
            self.client.get_run(run_id)
        except MlflowException:
            warnings.warn(f"MLflow run {run_id} is not in {redact(self.tracking_uri)}: no link back to run {self.run_id}")
            return False
        self.client.log_batch(run_id, tags=[RunTag(clean_key(k), clip(redact(str(v), k), tag_limit()))
                                            for k, v in tags.items()])
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            value = float(value)
            entries.append(Metric(clean_key(key), value if math.isfinite(value) else math.nan, now, int(step)))
        self.client.log_batch(self.run_id, metrics=entries)

    def log_image(self, image: Any, name: str, step: int) -> None:
        from PIL import Image
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{clean_name(name)}_step{int(step):07d}.png"
            Image.fromarray(to_uint8_image(image)).save(path)
            self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def log_figure(self, figure: Any, name: str, step: Optional[int] = None) -> None:
        suffix = "" if step is None else f"_step{int(step):07d}"
        self.client.log_figure(self.run_id, figure, f"figures/{clean_name(name)}{suffix}.png")

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if not self.closed:
            self.client.set_terminated(self.run_id, status=status)
            self.closed = True


def make_tracker(rank: int, enabled: bool, experiment: str, run_name: Optional[str] = None,
                 run_id: Optional[str] = None, tracking_uri: Optional[str] = None,
                 tags: Optional[dict[str, Any]] = None, out_dir: Optional[str] = None) -> Tracker:
    """An ``MLflowTracker`` on rank 0 when tracking is on, a ``NullTracker`` everywhere else. ``out_dir``: the
    resolved folder the run belongs to (a resume from another folder starts a new run)."""
    if rank == 0 and enabled:
        return MLflowTracker(experiment, run_name=run_name, tracking_uri=tracking_uri, run_id=run_id, tags=tags,
                             out_dir=out_dir)
    return NullTracker()


def mlflow_client(tracking_uri: Optional[str] = None) -> Any:
    """An ``MlflowClient`` for ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default store.
    Tools (``launch/compare.py``) read runs through this so that MLflow stays imported in one module."""
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


@dataclass
class MlflowTarget:
    """Where an evaluation's result is logged: an existing MLflow run."""

    mlflow_run: Optional[str] = None
    """Log the eval/* metrics into this MLflow run at the result's step, the protocol as eval.protocol.* tags."""
    tracking_uri: Optional[str] = None
    """MLflow store of that run (default $MLFLOW_TRACKING_URI, else MLflow's)."""


def log_evaluation(run_id: str, metrics: dict[str, float], protocol: dict[str, Any], step: int,
                   tracking_uri: Optional[str] = None) -> None:
    """An evaluation's metrics into the run that produced the checkpoint, at its step, and its protocol as
    ``eval.protocol.*`` tags (``launch/evaluate.py --mlflow-run``). Through ``MlflowClient``: the run's status is
    left alone, unlike a resumed training run."""
    client = mlflow_client(tracking_uri)
    for key, value in metrics.items():
        client.log_metric(run_id, clean_key(key), float(value), step=int(step))
    for key, value in protocol.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
        client.set_tag(run_id, clean_key(f"eval.protocol.{key}"), clip(redact(str(text), key), tag_limit()))


def get_or_create_experiment(client: Any, name: str) -> str:
    """Id of the experiment ``name``, created if missing (restored if it was deleted)."""
    from mlflow.exceptions import MlflowException
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another job created it between the lookup and here
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        warnings.warn(f"MLflow experiment {name!r} was deleted; restoring it")
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def git_commit() -> Optional[str]:
    """``git rev-parse HEAD`` of the checkout holding this file; None when it is not a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


# -- helpers ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def mlflow_limit(name: str, default: int) -> int:
    """A length limit of the installed MLflow (read lazily: importing this module must not import MLflow)."""
    try:
        from mlflow.utils import validation
    except ImportError:
        return default
    return int(getattr(validation, name, default))


def param_limit() -> int:
    return mlflow_limit("MAX_PARAM_VAL_LENGTH", 6000)  # 6000 characters in MLflow 3.x


def tag_limit() -> int:
    return mlflow_limit("MAX_TAG_VAL_LENGTH", 8000)


def clip(value: Any, limit: int) -> str:
    """``str(value)`` cut to ``limit`` characters (ending ``...`` when cut), as MLflow would store it."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / `` and space; anything else becomes ``_``."""
    return re.sub(r"[^\w\-./ ]", "_", str(key))[:250]


def clean_name(name: str) -> str:
    return re.sub(r"[^\w\-.]", "_", name)


def to_uint8_image(image: Any) -> np.ndarray:
    """(H, W, 3) or (H, W) uint8 from a PIL image, a numpy array or a torch tensor; (3, H, W) is transposed
    and float images are taken to be in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch, without importing it here
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"integer images must be uint8, got {arr.dtype}")
        arr = np.round(np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0).astype(np.uint8)
    return arr


__all__ = ["Tracker", "NullTracker", "MLflowTracker", "make_tracker", "mlflow_client", "get_or_create_experiment",
           "MlflowTarget", "log_evaluation", "git_commit", "to_uint8_image", "STATUSES"]
