"""The whole pipeline (``launch/pipeline.py``, ``launch/orchestration/pipeline.py``) on the tiny presets, on a real Ray
cluster (the session's: a head and two 1-CPU nodes on this machine, joined with ``--address``).

Three invocations of the real command share one output root and one MLflow store (SQLite in tmp): the first runs
every step, the second skips every step, the third changes the tokenizer's recipe and must re-run the tokenizer
and everything downstream of it (export, tokens, prior, samples, gFID) but not the reference statistics of the real
validation images. The MLflow tree is read back after each. The refusals before anything starts and the skip rule's
checks of the recorded outputs run without Ray.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "pipeline" / "debug.yaml")
STEPS = ("stage1", "export", "encode", "stage2", "ref", "sample", "gfid")
# The actor pools (encoding, sampling, the feature statistics) run in the pipeline's process: their Ray path is
# tested on the session's cluster by tests/data/test_tokens.py, tests/evaluation/test_sampling.py and
# test_eval_workers.py; here the trainings run as Ray Train jobs on it. Saves an actor start per pool step.
POOLS = ("encode.workers=0", "sample.workers=0", "gfid.workers=0")
CHANGED_TOKENIZER = "stage1.overrides=[train.steps=4,train.val_every=0,train.image_every=4,optim_g.lr=5.0e-4]"


def manifests(root: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in STEPS}
    for path in sorted(root.glob("*/step.json")):
        m = json.loads(path.read_text())
        out[m["step"]].append(m)
    return out


def runs(uri: str) -> tuple[object, list]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("vitvq-pipeline")
    return client, client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def pipeline(make_launch_env, tmp_path_factory: pytest.TempPathFactory, ray_cluster):
    """``pipeline(*overrides)``: one invocation of the real command from the repository root (the recipes' paths are
    relative to it), joining the session's Ray cluster (``--address``, as on a running cluster); returns the completed
    process."""
    tmp = tmp_path_factory.mktemp("pipeline")
    env = make_launch_env(tmp)
    root = tmp / "root"

    def invoke(*overrides: str) -> subprocess.CompletedProcess:
        ray_cluster.restore()
        cmd = [sys.executable, str(ROOT / "launch" / "pipeline.py"), "--config", CONFIG, "--address",
               ray_cluster.address, f"root={root}", "progress=false", *POOLS, *overrides]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-8000:]
        return res
    invoke.root, invoke.uri = root, env["MLFLOW_TRACKING_URI"]
    return invoke


def statuses(stdout: str) -> dict[str, str]:
    """Per step, 'ran' or 'skipped', from the summary table the command prints."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[0] in STEPS and parts[1] in ("ran", "skipped"):
            rows[parts[0]] = parts[1]
    return rows


@pytest.mark.e2e
def test_runs_once_skips_on_rerun_and_reruns_what_a_changed_tokenizer_feeds(pipeline, monkeypatch, capsys) -> None:
    # 1. Everything runs, once; each step's run is a child of the invocation's parent run.
    first = pipeline()
    assert statuses(first.stdout) == {s: "ran" for s in STEPS}, first.stdout[-3000:]
    made = manifests(pipeline.root)
    assert all(len(made[s]) == 1 for s in STEPS), {s: len(v) for s, v in made.items()}
    client, all_runs = runs(pipeline.uri)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in all_runs]
    parent = parents[0]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["pipeline.step"] for r in children) == sorted(STEPS)
    for child in children:
        m = made[child.data.tags["pipeline.step"]][0]
        assert child.data.tags["pipeline.lineage"] == m["lineage"] and m["run_id"] == child.info.run_id
        assert child.info.status == "FINISHED"
        assert parent.data.tags[f"step.{m['step']}.status"] == "ran"
        assert parent.data.tags[f"step.{m['step']}.run_id"] == child.info.run_id
    assert parent.info.status == "FINISHED" and "eval/fid" in parent.data.metrics
    # the trainings' runs are the trainers' own (their params are the recipes), nested by train.parent_run_id
    stage1_run = next(r for r in children if r.data.tags["pipeline.step"] == "stage1")
    assert stage1_run.data.tags["recipe"] == "debug" and stage1_run.data.tags["stage"] == "stage1"
    assert stage1_run.data.params["train.steps"] == "4" and stage1_run.data.params["train.parent_run_id"] == \
        parent.info.run_id
    # the prior trained on the tokens of the exported tokenizer, and sampling used both
    tok_sha = made["export"][0]["sha256"]["tokenizer"]
    index = json.loads(Path(made["encode"][0]["outputs"]["train_index"]).read_text())
    assert index["tokens"]["tokenizer"]["sha256"] == tok_sha
    protocol = json.loads(Path(made["sample"][0]["outputs"]["protocol"]).read_text())
    assert protocol["tokenizer_sha256"] == tok_sha and protocol["samples"] == 16
    gfid = json.loads(Path(made["gfid"][0]["outputs"]["gfid"]).read_text())
    assert gfid["protocol"]["sampling.prior_sha256"] == protocol["prior_sha256"]
    stamps = {p: p.stat().st_mtime_ns for p in pipeline.root.rglob("*") if p.is_file()}

    # 2. The same command again: every step is skipped, nothing is rewritten, no step run is made.
    second = pipeline()
    assert statuses(second.stdout) == {s: "skipped" for s in STEPS}, second.stdout[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    _, after = runs(pipeline.uri)
    assert len(after) == len(all_runs) + 1  # the new parent only
    new_parent = after[-1]
    assert all(new_parent.data.tags[f"step.{s}.status"] == "skipped" for s in STEPS)
    assert new_parent.data.tags["step.gfid.run_id"] == made["gfid"][0]["run_id"]  # where the output came from

    # --plan says the same without running anything; with another tokenizer recipe, that stage 1 would run first
    # (the launcher's main() in this process: a plan starts no Ray and no step, so a subprocess adds only imports)
    from vitvq.launch.pipeline import main
    monkeypatch.chdir(ROOT)

    def plan(*overrides: str) -> str:
        capsys.readouterr()
        assert main(["--config", CONFIG, f"root={pipeline.root}", "progress=false", *POOLS, "--plan", *overrides]) == {}
        return capsys.readouterr().out
    assert plan().count(": skipped, output of lineage") == len(STEPS)
    planned = plan(CHANGED_TOKENIZER)
    assert "[1/7] stage1: runs into" in planned and "then: export, encode, stage2, ref, sample, gfid" in planned
    assert len(list(pipeline.root.glob("stage1-*"))) == 1  # nothing made

    # 3. Another tokenizer recipe: it and everything fed by its codes run again; the real images' statistics not.
    third = pipeline(CHANGED_TOKENIZER)
    want = {s: "ran" for s in STEPS} | {"ref": "skipped"}
    assert statuses(third.stdout) == want, third.stdout[-3000:]
    made3 = manifests(pipeline.root)
    assert all(len(made3[s]) == (1 if s == "ref" else 2) for s in STEPS), {s: len(v) for s, v in made3.items()}
    new_tok = next(m for m in made3["export"] if m["lineage"] != made["export"][0]["lineage"])
    assert new_tok["sha256"]["tokenizer"] != tok_sha
    new_index = next(m for m in made3["encode"] if m["lineage"] != made["encode"][0]["lineage"])
    assert json.loads(Path(new_index["outputs"]["train_index"]).read_text())["tokens"]["tokenizer"]["sha256"] == \
        new_tok["sha256"]["tokenizer"]
    for s in STEPS:  # the first outputs are kept beside the new ones (another lineage, another folder)
        assert all(Path(m["outputs"][k]).exists() for m in made[s] for k in m["outputs"])


# -- without Ray ----------------------------------------------------------------------------------
def test_a_prior_that_does_not_fit_the_tokenizer_is_refused_before_anything_starts() -> None:
    from vitvq.launch.orchestration.pipeline import Pipeline, load_pipeline_config
    with pytest.raises(ValueError, match=r"prior.vocab_size=32 .* 64 codes: set stage2.overrides: \[prior.vocab_size=64\]"):
        Pipeline(load_pipeline_config(CONFIG, ["stage2.overrides=[prior.vocab_size=32]"]))
    with pytest.raises(ValueError, match=r"prior.grid=8 but the stage-1 tokenizer makes 4x4 codes at 32 px"):
        Pipeline(load_pipeline_config(CONFIG, ["stage2.overrides=[prior.grid=8]"]))
    with pytest.raises(ValueError, match=r"stage1: train.global_batch_size=4 cannot be kept at \[3\] worker"):
        Pipeline(load_pipeline_config(CONFIG, ["stage1.workers=1-3"]))


def test_every_pipeline_field_has_a_docstring_and_bad_values_name_the_field() -> None:
    import dataclasses
    import typing
    from vitvq.configs import ConfigError, field_docs
    from vitvq.launch.orchestration.pipeline import PipelineConfig, load_pipeline_config
    todo, seen = [PipelineConfig], set()
    while todo:
        cls = todo.pop()
        seen.add(cls)
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
        hints = typing.get_type_hints(cls)
        todo += [t for t in hints.values() if dataclasses.is_dataclass(t) and t not in seen]
    assert len(seen) == 5  # the config, TrainStep (both stages), EncodeStep, SampleStep, GfidStep
    for override, field in (("sample.top_p=0", "sample.top_p"), ("sample.classes=[1,1]", "sample.classes"),
                            ("sample.seed=-1", "sample.seed"), ("encode.workers=-1", "encode.workers"),
                            ("gfid.device=cuda", "gfid.device"), ("stage1.workers=2-1", "stage1.workers"),
                            ("stage2.gpus_per_worker=2", "stage2.gpus_per_worker"), ("stage1.recipe=", "stage1.recipe")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_pipeline_config(CONFIG, [override])


def test_a_step_whose_recorded_output_changed_or_vanished_runs_again(tmp_path: Path) -> None:
    from vitvq.data.shards import sha256_file
    from vitvq.launch.orchestration.pipeline import lineage_hash, read_manifest, write_manifest
    folder = tmp_path / "sample-x"
    folder.mkdir()
    out, run_dir = folder / "samples.npz", folder / "run"
    out.write_bytes(b"samples")
    run_dir.mkdir()
    lineage = lineage_hash("sample", {"prior_sha256": "a"})
    assert lineage != lineage_hash("sample", {"prior_sha256": "b"}) != lineage_hash("gfid", {"prior_sha256": "a"})
    write_manifest(folder, {"step": "sample", "lineage": lineage, "outputs": {"samples": str(out), "run": str(run_dir)},
                            "sha256": {"samples": sha256_file(out)}})
    assert read_manifest(folder, lineage) is not None
    assert read_manifest(folder, lineage_hash("sample", {"prior_sha256": "b"})) is None  # another input
    out.write_bytes(b"edited")
    assert read_manifest(folder, lineage) is None  # the file is not what the step wrote
    out.write_bytes(b"samples")
    shutil.rmtree(run_dir)
    assert read_manifest(folder, lineage) is None  # a folder output is gone
    run_dir.mkdir()
    (folder / "step.json").write_text("{trunc")
    assert read_manifest(folder, lineage) is None  # unreadable: run again (it is written last, atomically)
    assert not list(folder.glob("*.tmp"))


def test_an_http_address_submits_the_same_command_as_a_ray_job() -> None:
    from vitvq.launch.pipeline import build_parser, job_argv
    argv = ["--config", CONFIG, "--address", "http://127.0.0.1:8265", "--env", "MLFLOW_TRACKING_URI",
            "sample.per_class=2", "--env=HF_TOKEN"]
    assert job_argv(build_parser().parse_intermixed_args(argv), argv) == [
        "--address", "http://127.0.0.1:8265", "--env=MLFLOW_TRACKING_URI", "--env=HF_TOKEN", "--", "python",
        "launch/pipeline.py", "--config", CONFIG, "sample.per_class=2"]
