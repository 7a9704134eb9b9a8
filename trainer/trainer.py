"""The Trainer: process group, engines, resume, the step loop, checkpoints, validation and tracking, for any task.

``train(cfg)`` is the one entry point: ``launch/train_stage1.py`` calls it under ``deepspeed``, ``torchrun`` or
plain ``python``, and a Ray Train worker calls the very same function. What is trained comes from a task
(``trainer/task.py``: the protocol, and the table that maps ``cfg.stage`` to its task class); this file never
names a model, an engine or a loss. Everything else lives here once: the process group, resume, the loop,
crash-safe checkpoints, the non-finite guard, MLflow, the progress bar, pictures and background evaluation
(stopping at a step on a signal: ``trainer/preemption.py``).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from vitvq.configs import flatten, to_dict
from vitvq.configs.redact import redact, redact_config
from vitvq.trainer.checkpoint import (CheckpointManager, atomic_write_text, check_shared_folder, latest_file,
                                      maybe_fault, rank_file, set_rng_state)
from vitvq.trainer.config import config_hash
from vitvq.trainer.engine import (all_reduce_sum, any_rank, barrier, build_engine, init_distributed,
                                  shutdown_distributed)
from vitvq.trainer.export import export_checkpoint
from vitvq.trainer.parallelize import parallelize
from vitvq.trainer.preemption import PREEMPTED_EXIT, Preempted, StopRequest
from vitvq.trainer.task import Every, Task, stage_classes
from vitvq.trainer.tracking import git_commit, make_tracker


class NonFiniteLossError(RuntimeError):
    pass


OnCheckpoint = Callable[[int, str, Path, dict[str, float]], None]
"""``on_checkpoint(step, tag, folder, metrics)``: called on every rank once checkpoint ``tag`` is complete and
``latest`` names it, with the last logged metrics (Ray Train reports it; a collective, like the save itself)."""


class Trainer:
    def __init__(self, cfg: Any, task_cls: Optional[type] = None, on_checkpoint: Optional[OnCheckpoint] = None):
        self.cfg = cfg
        self.task_cls = task_cls or stage_classes(cfg.stage)[1]
        self.on_checkpoint = on_checkpoint
        self.dist = init_distributed(cfg.train.dist_timeout_s)
        self.out = Path(cfg.train.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        check_shared_folder(self.out, self.dist)  # every rank must see the checkpoints rank 0 writes
        self.ckpt = CheckpointManager(self.out, self.dist, cfg.train.keep_last)
        self.accum = cfg.train.accumulation(self.dist.world_size)  # the one place it is computed
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_good: Optional[str] = None
        self.history: list[dict[str, float]] = []
        t = cfg.train
        self.should_log, self.should_validate = Every(t.log_every, t.steps), Every(t.val_every, t.steps)
        self.should_draw, self.should_save = Every(t.image_every, t.steps), Every(t.ckpt_every, t.steps)

    # -- the named steps --------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        self.seed_everything(cfg.train.seed)
        resume = self.ckpt.latest()
        self.task: Task = self.task_cls(cfg, self.dist)
        modules = parallelize(self.task.build_modules(), cfg.train)
        load_universal = bool(resume and resume[1]["world_size"] != self.dist.world_size)
        if load_universal and cfg.train.on_world_size_change == "refuse":
            raise RuntimeError(
                f"{self.out} holds a checkpoint written by {resume[1]['world_size']} ranks and this run has "
                f"{self.dist.world_size}; rerun with train.on_world_size_change=convert to convert it to DeepSpeed's "
                f"universal format, or start with the original number of ranks")
        self.engines = {name: build_engine(modules[name], self.task.optim_config(name), cfg.train, self.accum,
                                           self.task.schedule_steps(name), load_universal)
                        for name in self.task.engine_names}
        self.task.attach(self.engines)
        self.seed_training(cfg.train.seed)
        data_state = self.resume(resume) if resume else None
        self.stream = self.task.train_stream(data_state)
        self.batches = iter(self.stream)
        self.task.on_start()
        if resume and self.dist.is_main:
            self.truncate_metrics()
        self.tracker = make_tracker(
            rank=self.dist.rank, enabled=cfg.train.tracking, experiment=cfg.train.experiment,
            run_name=cfg.train.run_name or cfg.recipe, run_id=self.run_id if resume else None, tracking_uri=None,
            out_dir=str(self.out.resolve()),
            tags={"git_commit": git_commit() or "unknown", "world_size": str(self.dist.world_size),
                  "recipe": cfg.recipe, "config_hash": config_hash(cfg), "stage": self.task.name, **self.task.tags(),
                  **({"mlflow.parentRunId": cfg.train.parent_run_id} if cfg.train.parent_run_id else {})})
        try:
            self.start_tracking(resume is not None)
        except BaseException as e:  # a run that exists must not stay RUNNING (issue 20)
            self.tracker.close(failed_status(e))
            raise

    def start_tracking(self, resumed: bool) -> None:
        """The first records of the (new or resumed) MLflow run, ``config.json`` and the evaluator."""
        cfg = self.cfg
        self.run_id = self.tracker.run_id
        # What this process runs on, at the step it starts from: a restart or a resize shows as a change here
        # (restarts = how often this MLflow run was resumed; a NullTracker has no count and records nothing).
        self.tracker.log_metrics({"sys/world_size": self.dist.world_size,
                                  "sys/restarts": getattr(self.tracker, "resume_index", 0)}, step=self.step)
        if not resumed or getattr(self.tracker, "created", False):  # a new run: also a copied folder's (item 9)
            self.tracker.log_params(flatten(cfg))
            for other, tags in self.task.linked_runs(self.run_id).items():
                self.tracker.tag_other_run(other, tags)
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(redact_config(flatten(cfg)), indent=1, default=str))
        self.evaluator = self.task.evaluator(self.export_to) if self.dist.is_main else None

    def truncate_metrics(self) -> None:
        """On resume, drop the records of the steps after the checkpoint from ``metrics.jsonl``: they are redone, and
        the file must never hold a step twice (issue 20). Atomic: a crash here leaves the old file or the new one."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) <= self.step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut by the crash: it is redone too
                pass
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))

    def seed_everything(self, seed: int) -> None:
        random.seed(seed + self.dist.rank)
        np.random.seed(seed + self.dist.rank)
        torch.manual_seed(seed)  # same init on every rank; DeepSpeed also broadcasts rank 0's weights

    def seed_training(self, seed: int) -> None:
        """Once the models exist: torch's draws during training (dropout masks, Gumbel noise) differ per rank, as
        data-parallel replicas need (one seed everywhere would give every rank's micro-batch the same masks)."""
        torch.manual_seed(int(np.random.SeedSequence([seed, self.dist.rank]).generate_state(1)[0]))

    def resume(self, resume: tuple[str, dict]) -> Optional[dict]:
        tag, meta = resume
        engine_tags = self.ckpt.prepare_resume(tag, meta, self.task.engine_names)
        client_state, rank_state = self.ckpt.load(tag, self.engines, engine_tags)
        self.step = int(client_state["step"])
        self.run_id = client_state.get("mlflow_run_id")
        self.task.load_state_dict(client_state["task"])
        self.last_good = tag
        if client_state.get("config_hash") != config_hash(self.cfg) and self.dist.is_main:
            print(f"warning: resuming {tag} with a config that differs from the one it was written with")
        if meta["world_size"] == self.dist.world_size:
            if rank_state is None:
                raise RuntimeError(f"{rank_file(self.ckpt.root / tag, self.dist.rank)} is missing although {tag} was "
                                   f"written by {meta['world_size']} ranks: the checkpoint is damaged; point "
                                   f"{latest_file(self.ckpt.root)} at an older complete one")
            set_rng_state(rank_state["rng"])
            if "task" in rank_state and hasattr(self.task, "load_rank_state_dict"):
                self.task.load_rank_state_dict(rank_state["task"])
            if self.dist.is_main:  # said on every launch path (torchrun, Ray, a plain process): never a silent resume
                print(redact(f"resumed {tag} at step {self.step} on {self.dist.world_size} rank(s) "
                             f"({self.ckpt.root / tag})"), flush=True)
            return rank_state["data"]
        # Another world size: the RNG states do not map onto the new ranks, so every rank is reseeded from the step
        # (deterministic), and every rank, old or new (a new one has no rank file), continues the data from the same
        # state, the old ranks' (shared storage: rank 0 reads them all). The stream continues at the start of the
        # next epoch of the new layout (README, "Changing the world size"); the global batch is kept by the
        # recomputed accumulation. Per-rank task state (stage 1's dead-code restart pools) is shared out by the task.
        self.seed_everything(self.cfg.train.seed + self.step)
        self.seed_training(self.cfg.train.seed + self.step)
        data, old_tasks = self.ckpt.resize_state(tag, meta["world_size"])
        if hasattr(self.task, "resize_rank_states") and any(t is not None for t in old_tasks):
            self.task.load_rank_state_dict(self.task.resize_rank_states(old_tasks, self.dist.rank,
                                                                        self.dist.world_size))
        if self.dist.is_main:
            print(f"resumed {tag} written by {meta['world_size']} ranks on {self.dist.world_size} at step {self.step}: "
                  f"weights and optimizer converted through the universal format, buffers (codebooks, their k-means "
                  f"flag and EMA statistics) and restart pools carried over; gradient accumulation is now "
                  f"{self.accum}", flush=True)
        return data

    def save(self) -> None:
        cfg = self.cfg
        client_state = {"step": self.step, "mlflow_run_id": self.run_id, "config_hash": config_hash(cfg),
                        "task": self.task.state_dict()}
        # meta.json describes the checkpoint without loading it: what wrote it and how. Its config is redacted like
        # config.json (issue 20): the export rebuilds only the model from it, and model fields hold no secrets; a
        # resume takes its config from the command line, never from here.
        meta = {"mlflow_run_id": self.run_id, "config_hash": config_hash(cfg), "recipe": redact(cfg.recipe),
                "stage": self.task.name, "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
                "config": redact_config(to_dict(cfg)), "config_redacted": True}
        # The data state's readable position names shard URLs (credentials and all): masked, as it is never read back.
        rank_state = {"data": redact_config(self.stream.state_dict())}
        if hasattr(self.task, "rank_state_dict"):
            rank_state["task"] = self.task.rank_state_dict()
        folder = self.ckpt.save(self.step, self.engines, client_state, rank_state, meta)
        self.last_good = self.ckpt.tag(self.step)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.step, self.last_good, folder, dict(self.history[-1]) if self.history else {})

    def export_to(self, tag: Optional[str], dest: Path) -> Path:
        """The task's single-file export of checkpoint ``tag`` (None: the latest complete one)."""
        return export_checkpoint(self.out, dest, tag)

    def next_batch(self) -> dict[str, Any]:
        try:
            return next(self.batches)
        except StopIteration:  # epoch mode: every rank ends its epoch on the same batch count
            self.batches = iter(self.stream)
            return next(self.batches)

    def train_step(self) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer step = ``accum`` micro-steps; returns mean metrics and the seconds spent waiting on data."""
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.dist.device))
        done, wait = 0, 0.0
        while done < self.accum:
            t0 = time.perf_counter()
            batch = self.next_batch()
            wait += time.perf_counter() - t0
            metrics = self.task.micro_step(batch, self.step)
            if metrics is None:
                self.nonfinite_in_a_row += 1
                self.nonfinite_total += 1
                if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step}; the last good "
                        f"checkpoint is {self.ckpt.root / str(self.last_good)} — lower the learning rate or "
                        f"check the data, then rerun the same command to resume from it")
                continue
            self.nonfinite_in_a_row = 0
            for k, v in metrics.items():
                sums[k] = sums[k] + v
            done += 1
        return {k: v / self.accum for k, v in sums.items()}, wait

    def log(self, metrics: dict[str, torch.Tensor], step_s: float, wait_s: float) -> dict[str, float]:
        keys = sorted(metrics)
        skipped = torch.tensor([float(self.stream.skipped)], device=self.dist.device)
        vec = torch.cat([torch.stack([metrics[k] for k in keys]) if keys else skipped[:0], skipped])
        all_reduce_sum(vec)  # mean over ranks (codebook stats are already global); skipped samples: the sum
        out = {f"train/{k}": v / self.dist.world_size for k, v in zip(keys, vec[:-1].tolist())}
        out.update(self.task.engine_metrics())
        name, per_sample = self.task.throughput
        out.update({"perf/step_s": step_s, "perf/data_wait_frac": wait_s / max(step_s, 1e-9),
                    name: self.cfg.train.global_batch_size * per_sample / max(step_s, 1e-9),
                    "data/skipped_samples": vec[-1].item(), "train/nonfinite_skipped": self.nonfinite_total})
        self.record(out)
        return out

    def record(self, metrics: dict[str, float]) -> None:
        """To MLflow, and to ``metrics.jsonl`` beside the checkpoints (a plain-text record readable without it)."""
        self.tracker.log_metrics(metrics, step=self.step)
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def validate(self) -> dict[str, float]:
        metrics = self.task.validate()
        self.record(metrics)
        return metrics

    def draw(self) -> None:
        """The task's pictures as PNGs in out_dir/images (and the newest at out_dir/<name>.png) and in MLflow."""
        pictures = self.task.pictures()  # every rank: the task may run its models, and ranks stay in step
        if not (pictures and self.dist.is_main):
            return
        from PIL import Image
        folder = self.out / "images"
        folder.mkdir(exist_ok=True)
        for name, img in pictures.items():
            Image.fromarray(img).save(folder / f"{name}_step{self.step:07d}.png")
            Image.fromarray(img).save(self.out / f"{name}.png")
            self.tracker.log_image(img, name, step=self.step)

    def log_evals(self, wait: bool = False) -> dict[str, float]:
        """Log the evaluations that have finished (all of them with ``wait``) at their checkpoints' steps."""
        if self.evaluator is None:
            return {}
        latest: dict[str, float] = {}
        for res in (self.evaluator.close() if wait else self.evaluator.poll()):
            if res.error:
                tqdm.write(redact(f"evaluation of step {res.step} failed: {res.error}"))
                continue
            self.tracker.log_metrics(res.metrics, step=res.step)
            self.tracker.set_tags({f"eval.protocol.{k}": v for k, v in res.protocol.items()})
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps(res.to_json(), default=str) + "\n")
            latest = dict(res.metrics)
        return latest

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        validating = self.task.has_validation
        # Not a terminal (a Ray Train worker, whose output reaches the driver line by line; a log file): a line every
        # 30 s instead of a redraw every 0.1 s, so that a log holds the rate and ETA rather than thousands of lines.
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.dist.is_main),
                   unit="step", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
        last: dict[str, float] = {}
        stop = StopRequest(t.preempt_signal)
        preempted: Optional[str] = None
        try:
            if self.step == 0:  # the "before" picture and numbers, to compare the end of training against
                self.draw()
                if validating and t.val_every:
                    self.validate()
            while self.step < t.steps:
                t0 = time.perf_counter()
                metrics, wait = self.train_step()
                self.step += 1
                self.task.after_step(self.step)
                step_s = time.perf_counter() - t0
                if self.should_log(self.step):
                    last = self.log(metrics, step_s, wait)
                    self.history.append({"step": self.step, **last})
                    bar.set_postfix({label: f"{last.get(key, float('nan')):.4g}"
                                     for label, key in self.task.progress.items()})
                bar.update(1)
                if validating and self.should_validate(self.step):
                    last.update(self.validate())
                if self.should_draw(self.step):
                    self.draw()
                evaluate = self.evaluator is not None and self.evaluator.due(self.step)
                if self.should_save(self.step) or evaluate:
                    self.save()
                if evaluate:
                    self.evaluator.submit(self.step, self.ckpt.tag(self.step))
                if self.should_log(self.step):
                    last.update(self.log_evals())
                maybe_fault("step", self.step)
                if any_rank(stop.signal is not None, self.dist.device):  # every rank stops at the same step
                    preempted = stop.signal or "another rank's signal"
                    if not (self.should_save(self.step) or evaluate):
                        self.save()
                    break
        except BaseException as e:  # at any step, step 0 included: the MLflow run never stays RUNNING
            bar.close()
            stop.restore()
            self.tracker.close(status=failed_status(e))
            raise
        stop.restore()
        bar.close()
        if preempted:
            if self.evaluator is not None:
                self.evaluator.close()  # queued evaluations are dropped; the next start re-submits nothing
            self.tracker.close(status="KILLED")
            return {"step": self.step, "out_dir": str(self.out), "run_id": self.run_id, "preempted": preempted,
                    "checkpoint": str(self.ckpt.root / self.ckpt.tag(self.step))}
        last.update(self.log_evals(wait=True))
        export = self.export()
        self.tracker.close(status="FINISHED")
        return {"step": self.step, "out_dir": str(self.out), "run_id": self.run_id, "export": str(export),
                "tracking_uri": getattr(self.tracker, "tracking_uri", None), "metrics": last,
                "summary": self.task.summary(last), "history": self.history}

    def export(self) -> Optional[Path]:
        """The task's export of the final checkpoint (rank 0), logged to the MLflow run."""
        path = None
        if self.dist.is_main:
            path = self.export_to(None, self.out / self.task.export_file)
            self.tracker.log_artifact(path, artifact_path="export")
        barrier()
        return path


def failed_status(e: BaseException) -> str:
    """The MLflow status of a run that ``e`` ends: KILLED for Ctrl-C, FAILED otherwise."""
    return "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"


def train(cfg: Any, task_cls: Optional[type] = None, on_checkpoint: Optional[OnCheckpoint] = None) -> dict[str, Any]:
    """Build everything from the config and train; the function every launcher (and Ray) calls.

    The task comes from ``cfg.stage`` through ``trainer.task.STAGES`` unless ``task_cls`` is given;
    ``on_checkpoint`` (see :data:`OnCheckpoint`) is how ``launch/orchestration/ray_train.py`` reports checkpoints to Ray."""
    trainer = Trainer(cfg, task_cls, on_checkpoint)
    trainer.build()
    result = trainer.fit()
    shutdown_distributed()  # a later train() in this process (a Ray restart) joins a new group
    if result.get("preempted"):
        if trainer.dist.is_main:
            print(f"preempted: stopped by {result['preempted']} after step {result['step']} and saved "
                  f"{result['checkpoint']}; rerun the same command to continue from it", file=sys.stderr, flush=True)
        raise Preempted(PREEMPTED_EXIT)
    return result
