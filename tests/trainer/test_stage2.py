"""Stage 2 through the real launcher: exact resume on 2 gloo ranks, the lineage and shape checks, the demo recipe
end to end into a real SQLite MLflow store.

The tokens are real: the built-in demo photographs encoded by a (randomly initialised) tokenizer export with
``launch/encode_tokens.py``'s encoder (the ``stage2_data`` fixture in tests/conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitvq.data import TokenLineageError
from vitvq.models.prior import Prior
from vitvq.trainer.checkpoint import latest_file, tag_of
from vitvq.trainer.config import load_job_config
from vitvq.trainer.engine import DistInfo
from vitvq.trainer.stage2 import Stage2Config, Stage2Task

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "train_stage2.py"
LOSSES = ("train/loss", "train/token_accuracy")


def data_overrides(data: dict) -> list[str]:
    return [f"tokenizer={data['tokenizer']}", f"tokens.train_tokens={data['train']}",
            f"tokens.val_tokens={data['val']}"]


def launch(out: Path, env: dict, ranks: int, data: dict, *overrides: str, fault: str | None = None,
           check: bool = True, recipe: str = "debug") -> subprocess.CompletedProcess:
    env = dict(env)
    if fault:
        env["VITVQ_INJECT_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(LAUNCH),
           "--config", str(ROOT / f"configs/stage2/{recipe}.yaml"), *data_overrides(data), f"train.out_dir={out}",
           "train.progress=false", *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


@pytest.mark.e2e
def test_resume_after_a_crash_gives_the_uninterrupted_losses(tmp_path: Path, stage2_data: dict,
                                                             torchrun_env: dict, losses) -> None:
    """Label dropout, token and residual dropout on (the debug preset's 0.1): the resumed run must draw the same."""
    common = ("train.tracking=false", "train.val_every=0", "train.image_every=100", "tokens.mode=epoch")
    straight = tmp_path / "straight"
    launch(straight, torchrun_env, 2, stage2_data, *common)
    want = losses(straight, LOSSES)
    assert sorted(want) == list(range(1, 9))
    out = tmp_path / "interrupted"
    res = launch(out, torchrun_env, 2, stage2_data, *common, fault="step@6", check=False)
    assert res.returncode != 0 and "injected fault step@6" in res.stderr
    assert latest_file(out / "checkpoints").read_text().strip() == tag_of(4)
    launch(out, torchrun_env, 2, stage2_data, *common)
    got = losses(out, LOSSES)
    assert got == want, f"resumed losses differ:\n{got}\n{want}"
    assert Prior.load_export(out / "prior.pt").cfg == Prior.load_export(straight / "prior.pt").cfg
    a, b = (torch.load(p / "prior.pt", weights_only=False)["state_dict"] for p in (out, straight))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's final weights differ"


@pytest.mark.e2e
def test_each_rank_draws_its_own_dropout_masks(tmp_path: Path, stage2_data: dict, run_on_two_ranks) -> None:
    """The models are initialised alike on every rank, but training's draws (dropout, label noise aside) must not
    be: one torch seed on every rank would give every micro-batch of a global batch the same dropout masks."""
    out = tmp_path / "draws.json"
    run_on_two_ranks(Path(__file__).with_name("rng_worker.py"), out, "--config", str(ROOT / "configs/stage2/debug.yaml"),
                     *data_overrides(stage2_data), f"train.out_dir={tmp_path / 'run'}", "train.tracking=false",
                     "train.progress=false")
    draws = json.loads(out.read_text())
    assert draws["rank_0"] != draws["rank_1"], "every rank draws the same dropout masks"


def _task(data: dict, *overrides: str) -> Stage2Task:
    cfg = load_job_config(Stage2Config, ROOT / "configs/stage2/debug.yaml", [*data_overrides(data), *overrides])
    return Stage2Task(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


def test_tokens_of_another_tokenizer_are_refused_naming_both_files(stage2_data: dict, tmp_path: Path) -> None:
    other = tmp_path / "other_tokenizer.pt"
    payload = torch.load(stage2_data["tokenizer"], weights_only=False)
    first = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][first] = payload["state_dict"][first] + 1.0  # another model, same architecture
    torch.save(payload, other)
    with pytest.raises(TokenLineageError) as e:
        _task(stage2_data, f"tokenizer={other}")
    assert str(other) in str(e.value) and str(stage2_data["tokenizer"]) in str(e.value)
    assert _task(stage2_data).lineage["tokenizer_sha256"] == stage2_data["tokenizer_sha256"]


@pytest.mark.parametrize("override,field", [("prior.vocab_size=128", "prior.vocab_size"), ("prior.grid=8", "prior.grid"),
                                            ("prior.num_classes=10", "prior.num_classes")])
def test_a_prior_of_another_shape_than_the_tokens_is_refused(stage2_data: dict, override: str, field: str) -> None:
    overrides = [override, "samples.classes=[0]"] if "num_classes" in override else [override]
    with pytest.raises(ValueError, match=field):
        _task(stage2_data, *overrides)


def test_missing_tokenizer_says_what_to_give(stage2_data: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        _task(stage2_data, f"tokenizer={tmp_path / 'nope.pt'}")


@pytest.mark.e2e
def test_demo_recipe_records_everything_in_mlflow(tmp_path: Path, stage2_demo_data: dict, make_launch_env) -> None:
    """The README's stage-2 command at a reduced step count, one process, into a real MLflow store."""
    from vitvq.trainer.tracking import mlflow_client
    env = make_launch_env(stage2_demo_data["mlflow_dir"], threads=2)  # the store holding the tokenizer's run
    out = tmp_path / "prior"
    cmd = [sys.executable, str(LAUNCH), "--config", str(ROOT / "configs/stage2/demo.yaml"),
           *data_overrides(stage2_demo_data), f"train.out_dir={out}", "train.progress=false", "train.steps=4",
           "train.log_every=2", "train.val_every=2", "train.val_batches=1", "train.image_every=4",
           "train.ckpt_every=4", "samples.per_class=2", "samples.classes=[0,1]"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "mlflow ui --backend-store-uri" in res.stdout and str(out / "samples.png") in res.stdout
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("vitvq-stage2").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["prior.vocab_size"] == "512" and run.data.params["recipe"] == "demo"
    tags = run.data.tags
    assert tags["stage"] == "stage2" and tags["tokenizer_sha256"] == stage2_demo_data["tokenizer_sha256"]
    assert len(tags["tokens_index_sha256"]) == 64
    for key in ("train/loss", "train/token_accuracy", "train/lr", "train/grad_norm", "perf/tokens_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [2, 4], key
    for key in ("val/loss", "val/token_accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 2, 4], key
    first = client.get_metric_history(run.info.run_id, "val/loss")[0].value
    assert first == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=1e-4)  # zero head: uniform at step 0
    images = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
    assert {"images/samples_step0000000.png", "images/samples_step0000004.png"} <= images, images
    assert {a.path for a in client.list_artifacts(run.info.run_id, "export")} == {"export/prior.pt"}
    prior = Prior.load_export(out / "prior.pt")
    assert prior.export_extra["tokenizer_sha256"] == stage2_demo_data["tokenizer_sha256"]
    assert prior.export_extra["mlflow_run_id"] == run.info.run_id
    stage1 = client.get_run(stage2_demo_data["stage1_run_id"])  # the link back from the tokenizer's run
    assert stage1.data.tags[f"prior_run.{run.info.run_id}"] == str(out)
    assert tags["tokenizer_mlflow_run_id"] == stage2_demo_data["stage1_run_id"]
