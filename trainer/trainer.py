"""The Trainer: engines, data, resume, the step loop, checkpoints, validation and tracking, for any stage.

``train(cfg)`` is the one entry point: ``launch/train_stage1.py`` calls it under ``deepspeed``, ``torchrun``
or plain ``python``, and a Ray Train worker calls the very same function. A stage is a task object
(``trainer.stage1.Stage1Task``) that builds its modules and turns a batch into updates; everything else
(process group, resume, checkpoints, MLflow, progress, guards) lives here once.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from vitvq.data import build_eval_loader, build_train_stream
from vitvq.configs import flatten
from vitvq.trainer.checkpoint import CheckpointManager, maybe_fault, set_rng_state
from vitvq.trainer.config import Stage1Config, config_hash
from vitvq.trainer.engine import all_reduce_sum, barrier, build_engine, grad_norm, init_distributed
from vitvq.trainer.stage1 import Stage1Task
from vitvq.trainer.tracking import git_commit, make_tracker


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: Stage1Config):
        self.cfg = cfg
        self.dist = init_distributed()
        self.out = Path(cfg.train.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = CheckpointManager(self.out, self.dist, cfg.train.keep_last)
        self.accum = cfg.train.accumulation(self.dist.world_size)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_good: Optional[str] = None
        self.history: list[dict[str, float]] = []
        self._shard_specs: dict[str, Optional[str]] = {}

    # -- the named steps --------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        self.seed_everything(cfg.train.seed)
        resume = self.ckpt.latest()
        self.task = Stage1Task(cfg, self.dist)
        modules = self.task.build_modules()
        load_universal = bool(resume and resume[1]["world_size"] != self.dist.world_size)
        if load_universal and cfg.train.on_world_size_change == "refuse":
            raise RuntimeError(
                f"{self.out} holds a checkpoint written by {resume[1]['world_size']} ranks and this run has "
                f"{self.dist.world_size}; rerun with train.on_world_size_change=convert to convert it to DeepSpeed's "
                f"universal format, or start with the original number of ranks")
        self.engines = {name: build_engine(modules[name], self.task.optim_config(name), cfg.train,
                                           self.dist.world_size, load_universal)
                        for name in self.task.engine_names}
        self.task.attach(self.engines)
        data_state = self.resume(resume) if resume else None
        self.build_data(data_state)
        self.tracker = make_tracker(
            rank=self.dist.rank, enabled=cfg.train.tracking, experiment=cfg.train.experiment,
            run_name=cfg.train.run_name or cfg.recipe, run_id=self.run_id if resume else None, tracking_uri=None,
            tags={"git_commit": git_commit() or "unknown", "world_size": str(self.dist.world_size),
                  "recipe": cfg.recipe, "config_hash": config_hash(cfg), "stage": self.task.name,
                  "dataset_index_sha256": self.data_index_checksum()})
        self.run_id = self.tracker.run_id
        if not resume:
            self.tracker.log_params(flatten(cfg))
        if self.dist.is_main:
            (self.out / "config.json").write_text(json.dumps(flatten(cfg), indent=1, default=str))
        self.evaluator = self.make_evaluator()

    def make_evaluator(self) -> Any:
        """Rank 0's background rFID evaluator (Ray workers), or None when eval.every is 0."""
        e = self.cfg.eval
        if not (e.every and self.dist.is_main):
            return None
        from vitvq.evaluation.async_eval import AsyncEvaluator, Source
        return AsyncEvaluator(Source(shards=self.shards("val"), resolution=self.cfg.data.image_size), ref=e.ref,
                              workers=e.workers, extractor=e.extractor, inception_weights=e.inception_weights,
                              batch_size=e.batch_size, lpips=e.lpips)

    def submit_eval(self) -> None:
        """Export the checkpoint just written and hand it to the evaluator; training goes on meanwhile."""
        if self.evaluator is None:
            return
        from vitvq.trainer.export import export_tokenizer
        path = export_tokenizer(self.out, self.out / "exports" / f"tokenizer_step{self.step:08d}.pt",
                                self.ckpt.tag(self.step))
        self.evaluator.submit(path, self.step)

    def log_evals(self, wait: bool = False) -> dict[str, float]:
        """Log the evaluations that have finished (all of them with ``wait``) at their checkpoints' steps."""
        if self.evaluator is None:
            return {}
        latest: dict[str, float] = {}
        for res in (self.evaluator.close() if wait else self.evaluator.poll()):
            if res.error:
                tqdm.write(f"evaluation of step {res.step} failed: {res.error}")
                continue
            self.tracker.log_metrics(res.metrics, step=res.step)
            self.tracker.set_tags({f"eval.protocol.{k}": v for k, v in res.protocol.items()})
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps(res.to_json(), default=str) + "\n")
            latest = dict(res.metrics)
        return latest

    def seed_everything(self, seed: int) -> None:
        random.seed(seed + self.dist.rank)
        np.random.seed(seed + self.dist.rank)
        torch.manual_seed(seed)  # same init on every rank; DeepSpeed also broadcasts rank 0's weights

    def build_data(self, state: Optional[dict]) -> None:
        cfg = self.cfg
        self.stream = build_train_stream(cfg.data, batch_size=cfg.train.micro_batch_size, rank=self.dist.rank,
                                         world_size=self.dist.world_size, seed=cfg.train.seed, state=state)
        self.batches = iter(self.stream)

    def shards(self, split: str) -> Optional[str]:
        """The shard spec of ``split`` ("train" or "val"); the built-in demo data is written on first use.
        Resolved once per split: the loop asks every step, and the demo check takes a file lock and stats shards."""
        if split not in self._shard_specs:
            d = self.cfg.data
            if d.source == "demo":
                from vitvq.data import ensure_demo_shards
                self._shard_specs[split] = str(ensure_demo_shards(d.demo_root, d.image_size, split))
            else:
                self._shard_specs[split] = d.train_shards if split == "train" else d.val_shards
        return self._shard_specs[split]

    def data_index_checksum(self) -> str:
        from vitvq.data import index_checksum
        return index_checksum(self.shards("train"), self.cfg.data.index) or "none"

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
        same_world = meta["world_size"] == self.dist.world_size
        if rank_state is not None and same_world:
            set_rng_state(rank_state["rng"])
            return rank_state["data"]
        # Another world size: the per-rank data cursors do not map onto the new ranks. Continue from the next
        # epoch boundary of a reseeded stream; the global batch size is kept by the recomputed accumulation.
        self.seed_everything(self.cfg.train.seed + self.step)
        if self.dist.is_main:
            print(f"resumed {tag} written by {meta['world_size']} ranks on {self.dist.world_size}: weights and "
                  f"optimizer converted through the universal format; gradient accumulation is now {self.accum}")
        return {"restart_epoch_after_step": self.step} if rank_state is not None else None

    def save(self) -> None:
        client_state = {"step": self.step, "mlflow_run_id": self.run_id, "config_hash": config_hash(self.cfg),
                        "task": self.task.state_dict()}
        meta = {"mlflow_run_id": self.run_id, "config_hash": config_hash(self.cfg), "recipe": self.cfg.recipe}
        self.ckpt.save(self.step, self.engines, client_state, {"data": self.stream.state_dict()}, meta)
        self.last_good = self.ckpt.tag(self.step)

    def next_batch(self) -> dict[str, torch.Tensor]:
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
                        f"checkpoint is {self.out / 'checkpoints' / str(self.last_good)} — lower the learning rate or "
                        f"check the data, then rerun the same command to resume from it")
                continue
            self.nonfinite_in_a_row = 0
            for k, v in metrics.items():
                sums[k] = sums[k] + v
            done += 1
        return {k: v / self.accum for k, v in sums.items()}, wait

    def log(self, metrics: dict[str, torch.Tensor], step_s: float, wait_s: float) -> dict[str, float]:
        keys = sorted(metrics)
        vec = torch.stack([metrics[k] for k in keys]) if keys else torch.zeros(0, device=self.dist.device)
        all_reduce_sum(vec)  # mean over ranks; codebook stats are already global
        out = {f"train/{k}": v / self.dist.world_size for k, v in zip(keys, vec.tolist())}
        g, d = self.engines["generator"], self.engines["discriminator"]
        out.update({"train/lr": g.get_lr()[0], "train/grad_norm_g": grad_norm(g), "train/grad_norm_d": grad_norm(d),
                    "perf/step_s": step_s, "perf/data_wait_frac": wait_s / max(step_s, 1e-9),
                    "perf/images_per_s": self.cfg.train.global_batch_size / max(step_s, 1e-9),
                    "data/skipped_samples": float(self.stream.skipped), "train/nonfinite_skipped": self.nonfinite_total})
        self.record(out)
        return out

    def record(self, metrics: dict[str, float]) -> None:
        """To MLflow, and to ``metrics.jsonl`` beside the checkpoints (a plain-text record readable without it)."""
        self.tracker.log_metrics(metrics, step=self.step)
        if self.dist.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        loader = build_eval_loader(self.shards("val"), image_size=cfg.data.image_size,
                                   batch_size=cfg.train.micro_batch_size, rank=self.dist.rank,
                                   world_size=self.dist.world_size, num_workers=0, pixel_range=cfg.data.pixel_range)
        metrics = self.task.validate(loader, cfg.train.val_batches)
        self.record(metrics)
        return metrics

    def write_grid(self, batch: Optional[dict] = None) -> Optional[Path]:
        """Originals above reconstructions as a PNG in out_dir/images and an image in the MLflow run."""
        grid = self.task.reconstruction_grid((batch or self.grid_batch)["image"])
        if not self.dist.is_main:
            return None
        from PIL import Image
        folder = self.out / "images"
        folder.mkdir(exist_ok=True)
        path = folder / f"reconstructions_step{self.step:07d}.png"
        Image.fromarray(grid).save(path)
        Image.fromarray(grid).save(self.out / "reconstructions.png")
        self.tracker.log_image(grid, "reconstructions", step=self.step)
        return path

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        self.grid_batch = self.first_val_batch() or self.next_batch()
        if self.step == 0:  # the "before" picture and numbers, to compare the end of training against
            self.write_grid()
            if t.val_every and self.shards("val"):
                self.validate()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.dist.is_main),
                   unit="step", dynamic_ncols=True)
        last: dict[str, float] = {}
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                metrics, wait = self.train_step()
                self.step += 1
                step_s = time.perf_counter() - t0
                if self.step % t.log_every == 0 or self.step == t.steps:
                    last = self.log(metrics, step_s, wait)
                    self.history.append({"step": self.step, **last})
                    bar.set_postfix(loss=f"{last.get('train/total_loss', float('nan')):.4f}",
                                    img_s=f"{last['perf/images_per_s']:.1f}")
                bar.update(1)
                if t.val_every and self.shards("val") and (self.step % t.val_every == 0 or self.step == t.steps):
                    last.update(self.validate())
                if self.step % t.image_every == 0 or self.step == t.steps:
                    self.write_grid()
                evaluate = bool(cfg.eval.every) and (self.step % cfg.eval.every == 0 or self.step == t.steps)
                if self.step % t.ckpt_every == 0 or self.step == t.steps or evaluate:
                    self.save()
                if evaluate:
                    self.submit_eval()
                if self.step % t.log_every == 0:
                    last.update(self.log_evals())
                maybe_fault("step", self.step)
        except BaseException:
            bar.close()
            self.tracker.close(status="FAILED")
            raise
        bar.close()
        last.update(self.log_evals(wait=True))
        export = self.export()
        self.tracker.close(status="FINISHED")
        return {"step": self.step, "out_dir": str(self.out), "run_id": self.run_id, "export": str(export),
                "tracking_uri": getattr(self.tracker, "tracking_uri", None),
                "metrics": last, "history": self.history}

    def first_val_batch(self) -> Optional[dict]:
        shards = self.shards("val")
        if not shards:
            return None
        loader = build_eval_loader(shards, image_size=self.cfg.data.image_size, batch_size=8,
                                   rank=0, world_size=1, num_workers=0, pixel_range=self.cfg.data.pixel_range)
        return next(iter(loader), None)

    def export(self) -> Optional[Path]:
        """fp32 tokenizer export from the final checkpoint (rank 0), logged to the MLflow run."""
        from vitvq.trainer.export import export_tokenizer
        path = None
        if self.dist.is_main:
            path = export_tokenizer(self.out, self.out / "tokenizer.pt")
            self.tracker.log_artifact(path, artifact_path="export")
        barrier()
        return path


def train(cfg: Stage1Config) -> dict[str, Any]:
    """Build everything from the config and train; the function every launcher (and Ray) calls."""
    trainer = Trainer(cfg)
    trainer.build()
    return trainer.fit()
