"""Single-file exports from a training run's checkpoints: consolidated fp32 weights plus the structured config.

``export_checkpoint(run_dir, dest, tag=None)`` reads the checkpoint's own ``meta.json`` (which stage wrote it,
its full config, ZeRO stage and precision), takes the fp32 weights of the task's export engine from DeepSpeed's
files (``trainer.engine.engine_fp32_state``), and lets the task build its model, load them with strict key
checking and write the file (stage 1: ``Tokenizer.save_export``, read back by ``Tokenizer.load_export`` with no
DeepSpeed). "Latest" is the checkpoint manager's own notion: the newest complete checkpoint.

Used at the end of training (rank 0), for each checkpoint evaluated during training, and as the job
``export(ExportConfig(...))`` by ``launch/export_tokenizer.py`` and the pipeline's ``export`` step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from vitvq.configs import check, from_dict
from vitvq.trainer.checkpoint import CheckpointManager, meta_file
from vitvq.trainer.engine import engine_fp32_state
from vitvq.trainer.task import stage_classes


def export_checkpoint(run_dir: str | Path, dest: str | Path, tag: Optional[str] = None) -> Path:
    """Write ``dest`` from checkpoint ``tag`` (default: the latest complete one) of the run in ``run_dir``."""
    ckpt = CheckpointManager(run_dir)
    tag, meta = ckpt.complete(tag)
    folder = ckpt.root / tag
    if "config" not in meta or "stage" not in meta:
        raise RuntimeError(f"{folder} was written by an older vitvq: its {meta_file(folder).name} has no config; "
                           f"export it with that version, or resume it once with this one and export the new checkpoint")
    cfg_cls, task_cls = stage_classes(meta["stage"])
    cfg = from_dict(cfg_cls, meta["config"])
    state = engine_fp32_state(folder, task_cls.export_engine, meta["zero_stage"])
    extra = {"step": meta["step"], "mlflow_run_id": meta.get("mlflow_run_id"), "config_hash": meta.get("config_hash"),
             "recipe": meta.get("recipe"), "stage": meta["stage"], "checkpoint": str(folder)}
    return task_cls.write_export(cfg, state, Path(dest), extra)


@dataclass
class ExportConfig:
    """Export a run's checkpoint as one file of fp32 weights and its config."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("run_dir", "out")  # a command line names them

    run_dir: str = ""
    """train.out_dir of the run."""
    out: str = ""
    """Output file (e.g. tokenizer.pt)."""
    tag: Optional[str] = None
    """Checkpoint folder name, e.g. step_00001000 (default: the latest complete one)."""

    def __post_init__(self) -> None:
        check(bool(self.run_dir), "run_dir", self.run_dir, "name the run's folder (its train.out_dir)")
        check(bool(self.out), "out", self.out, "name the output file, e.g. tokenizer.pt")


def export(cfg: ExportConfig) -> dict[str, Any]:
    """The job: ``{"path": the file written}``."""
    return {"path": str(export_checkpoint(cfg.run_dir, cfg.out, cfg.tag))}


__all__ = ["export_checkpoint", "ExportConfig", "export"]
