"""The whole pipeline in one submission: stage 1 -> export -> token encoding -> stage 2 -> sampling -> gFID/IS.

``launch/pipeline.py --config configs/pipeline/<name>.yaml`` runs it on a Ray cluster (a local one by default).
Each step runs with its own resources: the two trainings as Ray Train runs (``launch/orchestration/ray_train.fit``, the same
as ``launch/ray_train.py``), the export as a Ray task, and encoding, reference statistics, sampling and gFID on
their own Ray actor pools (``data/pool.py``): the job functions their launchers call (``evaluation/jobs.py``,
``data/encode.py``, ``trainer/export.py``), each given a typed config built from the step's settings.

Lineage. Every step's output is a function of a key: the resolved recipe of a training (without bookkeeping such
as ``train.out_dir`` or the MLflow names), the dataset index's sha256, the settings of the step, and the sha256 of
the files it reads (the tokenizer export, the token indexes, the prior export, the samples, the reference). The
step's lineage hash is the sha256 of that key; its folder is ``<root>/<step>-<lineage[:12]>`` and it ends by
writing ``step.json`` (lineage, key, outputs and their sha256, MLflow run, seconds) atomically, last. A step is
skipped when its ``step.json`` exists with the same lineage and every output file still has the sha256 recorded
there. So a rerun skips everything, a changed tokenizer recipe re-runs the tokenizer and every step downstream of
it but not the reference statistics of the real images, and an interrupted step runs again in the same folder:
a training resumes from its latest checkpoint (and MLflow run), the encoder keeps the shards it had written.

MLflow: one parent run per invocation (experiment ``experiment``), a child run per step that runs (the trainings'
own runs, tagged ``mlflow.parentRunId`` through ``train.parent_run_id``; a run per other step, written here),
each tagged with its step and lineage. The parent records every step as ``step.<name>.status`` (ran / skipped),
``step.<name>.lineage`` and ``step.<name>.run_id`` (for a skipped step, the run of the invocation that made its
output), and gets the final gFID/IS and the sample grid.

Written here rather than with a workflow engine (Ray Workflows is deprecated, Ray DAGs cache nothing across
invocations): what is needed is a content-addressed skip rule and the MLflow tree, a few dozen lines.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from vitvq.configs import flatten, to_dict
from vitvq.data.shards import sha256_file
from vitvq.configs.pool import PoolConfig
from vitvq.models.tokens import check_prior_fits
from vitvq.trainer.config import load_job_config
from vitvq.launch.orchestration.lineage import lineage_hash, read_manifest, training_key, write_manifest
from vitvq.launch.orchestration.pipeline_config import (EncodeStep, GfidStep, PipelineConfig, SampleStep, TrainStep,
                                           load_pipeline_config)

STEPS = ("stage1", "export", "encode", "stage2", "ref", "sample", "gfid")


def fields_of(cfg: Any, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s fields in ``cfg`` (an instance of a subclass): a step's share of a job's config."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}


# -- the pipeline ---------------------------------------------------------------------------------
@dataclass
class StepResult:
    name: str
    status: str  # "ran" or "skipped"
    lineage: str
    folder: Path
    outputs: dict[str, str]
    sha256: dict[str, str]
    run_id: Optional[str]
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, say: Callable[[str], None] = print):
        self.cfg, self.say = cfg, say
        self.root = Path(cfg.root).resolve()
        self.results: dict[str, StepResult] = {}
        self.parent = None
        self.current: Optional[str] = None  # the step running now (named when it fails)
        self.plan_only = False  # plan(): say what each step would do, run nothing
        self.stage1_cfg, self.stage2_cfg = self._load_stages()
        if cfg.gfid.extractor == "inception":  # the last step's file, checked before an hour of training
            from vitvq.evaluation.inception import InceptionWeightsError, resolve_inception_weights
            try:
                resolve_inception_weights(cfg.gfid.inception_weights)
            except InceptionWeightsError as e:
                raise ValueError(f"gfid.extractor=inception: {e} Or set gfid.extractor=inception-random for a run whose "
                                 f"gFID is not comparable to anything (a smoke run).") from None

    # -- before anything runs --
    def _load_stages(self) -> tuple[Any, Any]:
        from vitvq.trainer.config import Stage1Config
        from vitvq.trainer.stage2 import Stage2Config
        c = self.cfg
        for name, step in (("stage1", c.stage1), ("stage2", c.stage2)):
            if not Path(step.recipe).is_file():
                raise FileNotFoundError(f"{name}.recipe: {step.recipe} not found from {Path.cwd()} (paths in a pipeline "
                                        f"config are relative to the working directory: run from the repository "
                                        f"root, or give an absolute path)")
        s1 = load_job_config(Stage1Config, c.stage1.recipe, c.stage1.overrides)
        s2 = load_job_config(Stage2Config, c.stage2.recipe, c.stage2.overrides)
        check_prior_fits(s2.prior, s1.model.token_facts(), source="the stage-1 tokenizer", fix="stage2.overrides: [{}]",
                         what=f"stage2: the prior of {c.stage2.recipe} does not fit the stage-1 tokenizer of "
                              f"{c.stage1.recipe}")
        from vitvq.launch.orchestration.ray_train import parse_workers
        for name, step, scfg in (("stage1", c.stage1, s1), ("stage2", c.stage2, s2)):
            from vitvq.launch.orchestration.ray_train import check_request
            try:
                check_request(scfg.train, parse_workers(step.workers), step.gpus_per_worker)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        return s1, s2

    def data_spec(self, split: str) -> str:
        from vitvq.data.config import shard_spec
        given = self.cfg.encode.train_shards if split == "train" else self.cfg.encode.val_shards
        spec = given or shard_spec(self.stage1_cfg.data, split)
        if not spec:
            raise ValueError(f"encode.{split}_shards: the stage-1 recipe has no data.{split}_shards; set one of them")
        return str(spec)

    def dataset_id(self, spec: str) -> str:
        from vitvq.data.urls import index_checksum
        return index_checksum(spec, None) or spec

    # -- one step --
    def step(self, name: str, key: dict[str, Any], body: Callable[[Path, Any], dict[str, Any]],
             own_run: bool = False) -> StepResult:
        """Run ``body(folder, tracker)`` unless the step's output exists with this lineage. ``body`` returns
        ``{"outputs": {name: path}, "run_id": ..., "metrics": {...}}``; with ``own_run`` the body makes its own
        MLflow run (a training) and ``tracker`` is None."""
        lineage = lineage_hash(name, key)
        folder = self.root / f"{name}-{lineage[:12]}"
        done = read_manifest(folder, lineage)
        n = STEPS.index(name) + 1
        if done is None and self.plan_only:
            state = "resumes in" if folder.is_dir() else "runs into"
            self.say(f"[{n}/{len(STEPS)}] {name}: {state} {folder} (lineage {lineage[:12]})")
            raise PlanEnds(name)
        if done is not None:
            self.say(f"[{n}/{len(STEPS)}] {name}: skipped, output of lineage {lineage[:12]} exists ({folder})")
            res = StepResult(name, "skipped", lineage, folder, done["outputs"], done["sha256"], done.get("run_id"),
                             0.0, done.get("metrics", {}))
            self.results[name] = res
            return res
        self.say(f"[{n}/{len(STEPS)}] {name}: running (lineage {lineage[:12]}) in {folder}")
        self.current = name
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        tracker = None
        if not own_run:
            tracker = self.child_tracker(name, lineage)
        try:
            out = body(folder, tracker)
        except BaseException:
            if tracker is not None:
                tracker.close("FAILED")
            raise
        outputs = {k: str(Path(v).resolve()) for k, v in out["outputs"].items()}
        sha = {k: sha256_file(p) for k, p in outputs.items() if Path(p).is_file()}
        run_id = out.get("run_id") or (tracker.run_id if tracker is not None else None)
        metrics = out.get("metrics", {})
        if tracker is not None:
            tracker.set_tags({f"output.{k}": v for k, v in outputs.items()} | {f"sha256.{k}": v for k, v in sha.items()})
            if metrics:
                tracker.log_metrics(metrics, step=0)
            tracker.close("FINISHED")
        elif run_id and self.parent is not None:  # a training's own run: tag it as this step (it is a child already)
            self.parent.tag_other_run(run_id, {"pipeline.step": name, "pipeline.lineage": lineage})
        seconds = time.time() - t0
        write_manifest(folder, {"step": name, "lineage": lineage, "key": key, "outputs": outputs, "sha256": sha,
                                "run_id": run_id, "metrics": metrics, "seconds": round(seconds, 1),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        res = StepResult(name, "ran", lineage, folder, outputs, sha, run_id, seconds, metrics)
        self.results[name] = res
        self.say(f"[{n}/{len(STEPS)}] {name}: done in {seconds:.1f} s")
        return res

    def child_tracker(self, name: str, lineage: str) -> Any:
        from vitvq.trainer.tracking import make_tracker
        tags = {"pipeline.step": name, "pipeline.lineage": lineage, "pipeline.root": str(self.root)}
        if self.parent is not None and self.parent.run_id:
            tags["mlflow.parentRunId"] = self.parent.run_id
        return make_tracker(0, self.cfg.tracking, self.cfg.experiment, run_name=name, tags=tags)

    # -- the steps --
    def train_overrides(self, name: str, folder: Path) -> list[str]:
        c = self.cfg
        over = [f"train.out_dir={folder}", f"train.experiment={c.experiment}", f"train.run_name={name}",
                f"train.tracking={str(c.tracking).lower()}", f"train.progress={str(c.progress).lower()}"]
        if self.parent is not None and self.parent.run_id:
            over.append(f"train.parent_run_id={self.parent.run_id}")
        return over

    def train(self, name: str, step: TrainStep, cls: type, extra: list[str], folder: Path) -> dict[str, Any]:
        from vitvq.launch.orchestration import ray_train
        cfg = load_job_config(cls, step.recipe, step.overrides + extra + self.train_overrides(name, folder))
        result = ray_train.fit(cfg, ray_train.parse_workers(step.workers), gpus_per_worker=step.gpus_per_worker,
                               cpus_per_worker=step.cpus_per_worker, storage=str(folder / "ray"), name=name,
                               max_failures=step.max_failures)
        rv = result.return_value or {}
        metrics = {k: v for k, v in (rv.get("metrics") or {}).items() if isinstance(v, (int, float))}
        return {"outputs": {"run_dir": folder, "export": rv["export"]}, "run_id": rv.get("run_id"), "metrics": metrics}

    def run_stage1(self) -> StepResult:
        from vitvq.data.config import shard_spec
        from vitvq.trainer.config import Stage1Config
        data = {s: self.dataset_id(shard_spec(self.stage1_cfg.data, s) or "none") for s in ("train", "val")}
        key = {"config": training_key(self.stage1_cfg), "data": data}  # what the tokenizer trains on
        return self.step("stage1", key, lambda folder, _: self.train("stage1", self.cfg.stage1, Stage1Config, [],
                                                                      folder), own_run=True)

    def run_export(self, stage1: StepResult) -> StepResult:
        def body(folder: Path, tracker: Any) -> dict[str, Any]:
            import ray
            from vitvq.trainer.export import ExportConfig, export
            cfg = ExportConfig(run_dir=str(stage1.outputs["run_dir"]), out=str(folder / "tokenizer.pt"))
            task = ray.remote(num_cpus=1)(export)  # its own resources, on any node that sees the run
            path = ray.get(task.remote(cfg))["path"]
            tracker.log_params({"checkpoint_of": stage1.outputs["run_dir"]})
            return {"outputs": {"tokenizer": path}}
        return self.step("export", {"stage1": stage1.lineage}, body)

    def run_encode(self, tokenizer: StepResult) -> StepResult:
        e = self.cfg.encode
        specs = {s: self.data_spec(s) for s in ("train", "val")}
        key = {"tokenizer_sha256": tokenizer.sha256["tokenizer"], "data": {s: self.dataset_id(v) for s, v in specs.items()},
               "augment": e.augment, "limit": e.limit}

        def body(folder: Path, tracker: Any) -> dict[str, Any]:
            from vitvq.data.encode import EncodeConfig, encode
            outputs, metrics = {}, {}
            for split, spec in specs.items():
                cfg = EncodeConfig(**fields_of(e, PoolConfig), tokenizer=tokenizer.outputs["tokenizer"], shards=spec,
                                   out=str(folder), split=split, augment=e.augment if split == "train" else "center",
                                   limit=e.limit, progress=self.cfg.progress)
                index = encode(cfg)[split]
                outputs[f"{split}_index"] = index["index_path"]
                metrics.update({f"encode/{split}_samples": index["num_samples"],
                                f"encode/{split}_skipped": index["num_skipped"]})
                self.say(f"  {split}: {index['num_samples']} samples -> {index['index_path']}")
            tracker.log_params({**flatten({"encode": to_dict(e)}), "tokenizer": tokenizer.outputs["tokenizer"]})
            return {"outputs": outputs, "metrics": metrics}
        return self.step("encode", key, body)

    def run_stage2(self, tokenizer: StepResult, tokens: StepResult) -> StepResult:
        from vitvq.trainer.stage2 import Stage2Config
        extra = [f"tokenizer={tokenizer.outputs['tokenizer']}", f"tokens.train_tokens={tokens.outputs['train_index']}",
                 f"tokens.val_tokens={tokens.outputs['val_index']}"]
        key = {"config": training_key(self.stage2_cfg, drop=("tokenizer", "tokens.train_tokens", "tokens.val_tokens")),
               "tokenizer_sha256": tokenizer.sha256["tokenizer"], "tokens": tokens.sha256}
        return self.step("stage2", key, lambda folder, _: self.train("stage2", self.cfg.stage2, Stage2Config, extra,
                                                                      folder), own_run=True)

    def run_ref(self) -> Optional[StepResult]:
        g = self.cfg.gfid
        if g.ref:
            return None
        spec, side = self.data_spec("val"), self.stage1_cfg.model.image_size
        key = {"data": self.dataset_id(spec), "resolution": side, "extractor": g.extractor}

        def body(folder: Path, tracker: Any) -> dict[str, Any]:
            from vitvq.evaluation.jobs import RefStatsConfig, print_result, ref_stats
            out = folder / "ref.npz"
            cfg = RefStatsConfig(**self.eval_fields(), shards=spec, resolution=side, out=str(out),
                                 json=str(folder / "ref.json"))
            res = ref_stats(cfg)
            print_result(cfg, res, self.say)
            tracker.log_params({k: str(v) for k, v in res["protocol"].items()})
            return {"outputs": {"ref": out}, "metrics": {"ref/count": res["metrics"]["count"]}}
        return self.step("ref", key, body)

    def eval_fields(self) -> dict[str, Any]:
        """The fields the reference statistics and the gFID take from ``gfid``: its pool and its extractor."""
        from vitvq.evaluation.jobs import ExtractorSettings
        g = self.cfg.gfid
        return {**fields_of(g, PoolConfig), **fields_of(g, ExtractorSettings), "progress": self.cfg.progress}

    def run_sample(self, tokenizer: StepResult, prior: StepResult) -> StepResult:
        s = self.cfg.sample
        settings = {k: v for k, v in to_dict(s).items() if k not in ("workers", "cpus_per_worker", "gpus_per_worker")}
        key = {"prior_sha256": prior.sha256["export"], "tokenizer_sha256": tokenizer.sha256["tokenizer"], "settings": settings}

        def body(folder: Path, tracker: Any) -> dict[str, Any]:
            from vitvq.evaluation.jobs import SampleConfig, print_samples, sample
            npz = folder / "samples.npz"
            res = sample(SampleConfig(**fields_of(s, type(s)), prior=prior.outputs["export"],
                                      tokenizer=tokenizer.outputs["tokenizer"], out=str(npz),
                                      progress=self.cfg.progress))
            print_samples(res, self.say)
            p = res["protocol"]
            tracker.log_params({k: str(v) for k, v in p.items() if k not in ("class_list", "notes")})
            tracker.log_artifact(p["grid_png"], artifact_path="images")
            tracker.log_artifact(res["protocol_path"])
            return {"outputs": {"samples": npz, "grid": p["grid_png"], "protocol": res["protocol_path"]},
                    "metrics": {"sample/count": p["samples"], "sample/seconds": p["seconds"]}}
        return self.step("sample", key, body)

    def run_gfid(self, samples: StepResult, ref: Optional[StepResult]) -> StepResult:
        g = self.cfg.gfid
        ref_path = ref.outputs["ref"] if ref is not None else str(Path(g.ref).resolve())
        ref_sha = ref.sha256["ref"] if ref is not None else sha256_file(ref_path)
        key = {"samples_sha256": samples.sha256["samples"], "ref_sha256": ref_sha, "extractor": g.extractor,
               "splits": g.splits}

        def body(folder: Path, tracker: Any) -> dict[str, Any]:
            from vitvq.evaluation.jobs import GfidConfig, gfid, print_result
            out = folder / "gfid.json"
            cfg = GfidConfig(**self.eval_fields(), samples=samples.outputs["samples"], ref=ref_path, splits=g.splits,
                             json=str(out))
            res = gfid(cfg)
            print_result(cfg, res, self.say)
            tracker.set_tags({f"eval.protocol.{k}": json.dumps(v) if isinstance(v, (dict, list)) else v
                              for k, v in res["protocol"].items()})
            return {"outputs": {"gfid": out}, "metrics": {k: float(v) for k, v in res["metrics"].items()}}
        return self.step("gfid", key, body)

    # -- all of it --
    def plan(self) -> list[str]:
        """Say, step by step, what ``run`` would keep and what it would run; the walk ends at the first step to run
        (the lineage of the steps after it depends on files that step makes). Returns the steps that would run."""
        self.plan_only = True
        try:
            self._steps()
        except PlanEnds as e:
            later = list(STEPS[STEPS.index(e.step):])
            if len(later) > 1:
                self.say(f"then: {', '.join(later[1:])} (their lineage depends on outputs not made yet)")
            return later
        finally:
            self.plan_only = False
        return []

    def _steps(self) -> Any:
        stage1 = self.run_stage1()
        tokenizer = self.run_export(stage1)
        tokens = self.run_encode(tokenizer)
        prior = self.run_stage2(tokenizer, tokens)
        ref = self.run_ref()
        samples = self.run_sample(tokenizer, prior)
        return samples, self.run_gfid(samples, ref)

    def run(self) -> dict[str, StepResult]:
        from vitvq.trainer.tracking import git_commit, make_tracker
        from vitvq.launch.orchestration.cluster import check_multinode, check_visible_everywhere
        c = self.cfg
        self.root.mkdir(parents=True, exist_ok=True)
        # Before the parent run exists: a root a node cannot see, or one MLflow file per node, is refused here.
        (check_multinode if c.tracking else check_visible_everywhere)({"pipeline root": self.root})
        self.parent = make_tracker(0, c.tracking, c.experiment, run_name=c.run_name or c.recipe,
                                   tags={"pipeline.root": str(self.root), "git_commit": git_commit() or "unknown",
                                         "recipe": c.recipe})
        if self.parent.run_id:
            self.parent.log_params(flatten(c))
        status = "FAILED"
        try:
            samples, gfid = self._steps()
            self.parent.log_metrics({k: v for k, v in gfid.metrics.items() if k.startswith("eval/")}, step=0)
            if Path(samples.outputs["grid"]).is_file():
                self.parent.log_artifact(samples.outputs["grid"], artifact_path="images")
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.parent.set_tags({f"step.{r.name}.{k}": v for r in self.results.values()
                                  for k, v in (("status", r.status), ("lineage", r.lineage), ("run_id", r.run_id or "none"),
                                               ("folder", str(r.folder)))})
            self.parent.close(status)
        return self.results


class PlanEnds(Exception):
    """``Pipeline.plan`` reached a step that would run."""

    def __init__(self, step: str):
        super().__init__(step)
        self.step = step


__all__ = ["PipelineConfig", "TrainStep", "EncodeStep", "SampleStep", "GfidStep", "Pipeline", "StepResult",
           "load_pipeline_config", "lineage_hash", "read_manifest", "STEPS"]
