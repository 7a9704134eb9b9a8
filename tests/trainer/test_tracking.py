"""Tests for trainer/tracking.py against a real MLflow SQLite store in a temp folder: params (batched, cut to
MLflow's limit), tags, metrics, images, resume of the same run, the null tracker and make_tracker."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network on CI machines

from mlflow.tracking import MlflowClient  # noqa: E402  (tests read the store back independently)

from vitvq.trainer.tracking import MLflowTracker, NullTracker, git_commit, make_tracker, to_uint8_image  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One store for the module: creating the SQLite schema takes seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def download(client: MlflowClient, run_id: str, artifact: str, dst: Path) -> np.ndarray:
    return np.asarray(Image.open(client.download_artifacts(run_id, artifact, str(dst))))


def test_new_run_records_params_tags_metrics_images(uri: str, tmp_path: Path) -> None:
    flat = {f"model.blocks.{i}.width": 8 * i for i in range(150)}  # > MLflow's 100 params per request
    flat.update({"data.train_shards": "s" * 7000, "model.patch": (8, 8), "train.resume": None})
    tracker = MLflowTracker("track-new", run_name="demo", tracking_uri=uri, tags={"git_commit": "abc", "world_size": 2})
    tracker.log_params(flat)
    tracker.log_metrics({"train/total_loss": 0.5, "perf/images_per_s": 10}, step=1)
    tracker.log_metrics({"train/total_loss": torch.tensor(0.25)}, step=2)
    tracker.log_metrics({"train/total_loss": float("inf")}, step=3)  # logged as NaN, not 1.8e308
    img = np.zeros((16, 24, 3), np.uint8)
    img[4:8, :, 0] = 255
    img[:, 10:12, 2] = 77
    tracker.log_image(img, "reconstructions", step=7)
    tracker.log_image(torch.from_numpy(img), "from_torch", step=8)
    tracker.log_image(Image.fromarray(img), "from_pil", step=9)
    tracker.close("FINISHED")

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "demo" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "track-new"
    params = run.data.params
    assert len(params) == 153
    assert params["model.blocks.149.width"] == "1192" and params["model.patch"] == "(8, 8)"
    assert params["train.resume"] == "None"
    assert len(params["data.train_shards"]) == 6000 and params["data.train_shards"] == "s" * 5997 + "..."
    assert run.data.tags["git_commit"] == "abc" and run.data.tags["world_size"] == "2"
    loss = history(client, tracker.run_id, "train/total_loss")
    assert [s for s, _ in loss] == [1, 2, 3] and loss[0][1] == 0.5 and loss[1][1] == 0.25 and math.isnan(loss[2][1])
    assert history(client, tracker.run_id, "perf/images_per_s") == [(1, 10.0)]
    names = sorted(a.path for a in client.list_artifacts(tracker.run_id, "images"))
    assert names == ["images/from_pil_step0000009.png", "images/from_torch_step0000008.png",
                     "images/reconstructions_step0000007.png"]
    for i, name in enumerate(names):
        np.testing.assert_array_equal(download(client, tracker.run_id, name, tmp_path / str(i)), img)


def test_artifact_and_figure(uri: str, tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "tokenizer.pt").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure()
    plt.plot([0, 1], [1, 0])
    with MLflowTracker("track-new", tracking_uri=uri) as tracker:
        tracker.log_artifact(tmp_path / "config.json")
        tracker.log_artifact(tmp_path / "export", artifact_path="export")
        tracker.log_figure(fig, "curve", step=3)
    plt.close(fig)
    client = MlflowClient(uri)
    top = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert top == {"config.json", "export", "figures"}
    assert [a.path for a in client.list_artifacts(tracker.run_id, "export")] == ["export/tokenizer.pt"]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "figures")] == ["figures/curve_step0000003.png"]
    assert Path(client.download_artifacts(tracker.run_id, "export/tokenizer.pt", str(tmp_path))).read_bytes() \
        == b"weights"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_resume_continues_the_same_run(uri: str) -> None:
    first = MLflowTracker("track-resume", run_name="r", tracking_uri=uri, tags={"world_size": "2", "recipe": "demo"})
    first.log_params({"train.lr": 1e-4, "train.steps": 10})
    first.log_metrics({"train/total_loss": 1.0}, step=1)
    first.log_metrics({"train/total_loss": 0.8}, step=2)
    first.close("FAILED")  # the job crashed
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "FAILED"

    second = MLflowTracker("track-resume", run_name="ignored", tracking_uri=uri, run_id=first.run_id,
                           tags={"world_size": "1", "recipe": "demo", "resumed_from": "ckpt-2"})
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.log_params({"train.lr": 1e-4, "train.steps": 20, "train.new_field": True})  # steps changed: no crash
    second.log_metrics({"train/total_loss": 0.6}, step=3)
    second.close()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params == {"train.lr": "0.0001", "train.steps": "10", "train.new_field": "True"}
    tags = run.data.tags
    assert tags["resume.count"] == "1" and tags["resume.1.train.steps"] == "20"
    assert "resume.1.train.lr" not in tags  # same value: nothing recorded
    assert tags["world_size"] == "2" and tags["resume.1.world_size"] == "1"  # the original stays
    assert tags["resumed_from"] == "ckpt-2" and "resume.1.recipe" not in tags
    assert history(client, first.run_id, "train/total_loss") == [(1, 1.0), (2, 0.8), (3, 0.6)]
    exp = client.get_experiment_by_name("track-resume")
    assert len(client.search_runs([exp.experiment_id])) == 1  # one run, not a split one

    third = MLflowTracker("track-resume", tracking_uri=uri, run_id=first.run_id)
    third.log_params({"train.steps": 30})
    third.close("KILLED")
    run = client.get_run(first.run_id)
    assert run.data.tags["resume.count"] == "2" and run.data.tags["resume.2.train.steps"] == "30"
    assert run.data.params["train.steps"] == "10" and run.info.status == "KILLED"


def test_resume_of_a_run_the_store_lacks_starts_a_new_run(uri: str) -> None:
    with pytest.warns(UserWarning, match="not in"):
        tracker = MLflowTracker("track-resume", tracking_uri=uri, run_id="0" * 32)
    assert tracker.run_id != "0" * 32
    assert MlflowClient(uri).get_run(tracker.run_id).data.tags["resume.missing_run_id"] == "0" * 32
    tracker.close()


@pytest.mark.parametrize("exc, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_context_manager_records_failures(uri: str, exc: type, status: str) -> None:
    with pytest.raises(exc):
        with MLflowTracker("track-ctx", tracking_uri=uri) as tracker:
            raise exc()
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == status
    with pytest.raises(ValueError, match="status"):
        tracker.close("DONE")


def test_null_tracker_and_make_tracker(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for tracker in (make_tracker(rank=1, enabled=True, experiment="track-null", tracking_uri=uri),
                    make_tracker(rank=0, enabled=False, experiment="track-null", tracking_uri=uri)):
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        with tracker as t:
            t.log_params({"a": 1})
            t.set_tags({"b": 2})
            t.log_metrics({"c": 3.0}, step=1)
            t.log_image(np.zeros((2, 2, 3), np.uint8), "x", step=1)
            t.log_artifact("/nonexistent")
            t.log_figure(None, "f")
    assert MlflowClient(uri).get_experiment_by_name("track-null") is None  # nothing was written

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # no argument: the environment variable decides
    tracker = make_tracker(rank=0, enabled=True, experiment="track-env")
    assert isinstance(tracker, MLflowTracker) and tracker.tracking_uri == uri
    tracker.close()
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"


def test_to_uint8_image() -> None:
    chw = torch.tensor([[[0.0, 0.5], [1.0, 2.0]]] * 3)  # (3, 2, 2) floats in [0, 1], one out of range
    out = to_uint8_image(chw)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], [[0, 128], [255, 255]])  # round(0.5 * 255) = 128; 2.0 clipped
    assert to_uint8_image(np.full((3, 4, 1), 7, np.uint8)).shape == (3, 4)
    with pytest.raises(ValueError, match="shape"):
        to_uint8_image(np.zeros((2, 2, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_uint8_image(np.zeros((2, 2, 3), np.int64))


def test_git_commit_and_cheap_import() -> None:
    commit = git_commit()
    if (REPO / ".git").exists():
        assert commit is not None and re.fullmatch(r"[0-9a-f]{40}", commit)
    else:
        assert commit is None
    # Importing the module must not import MLflow (seconds) on ranks that never track.
    code = "import sys, trainer.tracking; sys.exit('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_no_warning_for_long_params(uri: str) -> None:
    # We cut long values ourselves, so MLflow has nothing to truncate (and to warn about).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with MLflowTracker("track-new", tracking_uri=uri) as tracker:
            tracker.log_params({"long": "y" * 10000})
    assert MlflowClient(uri).get_run(tracker.run_id).data.params["long"] == "y" * 5997 + "..."
