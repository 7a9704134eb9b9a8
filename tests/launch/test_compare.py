"""Tests for launch/compare.py on a real MLflow SQLite store: the differing params, the latest metrics, the
printed table, the PNG of curves, and the script run as a command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network on CI machines

from vitvq.launch.compare import DEFAULT_METRICS, differing_params, fetch_runs, latest_metrics, main  # noqa: E402
from vitvq.trainer.tracking import MLflowTracker, mlflow_client  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXP = "cmp-stage1"
SAME = {"model.arch": "vit", "model.encoder.width": 64, "train.steps": 5, "data.pixel_range": "[-1, 1]"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """Two runs that differ in two config values; run b also logged a metric run a did not."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    ids = []
    for name, lr, size, scale in (("run-a", 1e-4, 32, 1.0), ("run-b", 2e-4, 64, 0.5)):
        with MLflowTracker(EXP, run_name=name, tracking_uri=uri) as tracker:
            tracker.log_params({**SAME, "optim.lr": lr, "data.image_size": size})
            for step in range(1, 6):
                tracker.log_metrics({"train/total_loss": scale / step, "train/rec_loss": scale / step / 2}, step)
            tracker.log_metrics({"val/psnr": 20.0 + 10 * (1 - scale)}, step=5)
            if name == "run-b":
                tracker.log_metrics({"train/perplexity": 123.0}, step=5)
        ids.append(tracker.run_id)
    with MLflowTracker("cmp-other", run_name="elsewhere", tracking_uri=uri) as tracker:  # must not show up
        tracker.log_params({"optim.lr": 1.0})
    return uri, ids


def cells(output: str, label: str) -> list[str]:
    """The cells of the table row that starts with ``label``."""
    rows = [line.split() for line in output.splitlines() if line.split()[:1] == [label]]
    assert len(rows) == 1, f"{label!r} appears {len(rows)} times in:\n{output}"
    return rows[0][1:]


def test_query_functions(store: tuple[str, list[str]]) -> None:
    uri, ids = store
    runs = fetch_runs(mlflow_client(uri), EXP)
    assert [r.info.run_id for r in runs] == ids  # oldest first, the other experiment left out
    assert differing_params(runs) == {"data.image_size": ["32", "64"], "optim.lr": ["0.0001", "0.0002"]}
    assert set(differing_params(runs, all_params=True)) == set(SAME) | {"data.image_size", "optim.lr"}
    latest = latest_metrics(runs, DEFAULT_METRICS)
    assert list(latest) == ["train/total_loss", "train/rec_loss", "train/perplexity", "val/psnr"]  # given order
    assert latest["train/total_loss"] == [pytest.approx(1.0 / 5), pytest.approx(0.5 / 5)]  # the last step's
    assert latest["train/perplexity"] == [None, 123.0] and latest["val/psnr"] == [20.0, 25.0]
    # Selection by id prefix, in the order given; unknown and ambiguous prefixes are errors.
    assert [r.info.run_id for r in fetch_runs(mlflow_client(uri), EXP, [ids[1][:6], ids[0]])] == ids[::-1]
    with pytest.raises(SystemExit, match="no run"):
        fetch_runs(mlflow_client(uri), EXP, ["zzzz"])
    with pytest.raises(SystemExit, match="ambiguous"):
        fetch_runs(mlflow_client(uri), EXP, [""])
    with pytest.raises(SystemExit, match="cmp-other"):  # a missing experiment lists the ones there are
        fetch_runs(mlflow_client(uri), "no-such-experiment")


def test_table_lists_exactly_the_differing_params(store: tuple[str, list[str]], capsys: pytest.CaptureFixture) \
        -> None:
    uri, ids = store
    assert main(["--experiment", EXP, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert cells(out, "run") == ["run-a", "run-b"]
    assert cells(out, "id") == [ids[0][:8], ids[1][:8]]
    assert cells(out, "status") == ["FINISHED", "FINISHED"]
    assert cells(out, "optim.lr") == ["0.0001", "0.0002"]
    assert cells(out, "data.image_size") == ["32", "64"]
    assert "params that differ (2 of 6)" in out
    for key in SAME:
        assert key not in out
    assert cells(out, "train/total_loss") == ["0.2", "0.1"]
    assert cells(out, "train/rec_loss") == ["0.1", "0.05"]
    assert cells(out, "train/perplexity") == ["-", "123"]
    assert cells(out, "val/psnr") == ["20", "25"]
    assert "val/lpips" not in out and "elsewhere" not in out  # not logged; another experiment

    main(["--experiment", EXP, "--tracking-uri", uri, "--all-params", "--metrics", "val/psnr", "val/fid"])
    out = capsys.readouterr().out
    assert cells(out, "model.encoder.width") == ["64", "64"] and cells(out, "val/psnr") == ["20", "25"]
    assert "train/total_loss" not in out and "not logged by any of these runs: val/fid" in out


def test_plot_writes_a_png(store: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri, _ = store
    path = tmp_path / "plots" / "curves.png"
    main(["--experiment", EXP, "--tracking-uri", uri, "--plot", str(path),
          "--metrics", "train/total_loss", "val/psnr", "train/perplexity"])
    assert f"wrote {path}" in capsys.readouterr().out
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] >= 200 and img.shape[1] >= 3 * 300  # three subplots side by side
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20 and img.std() > 5  # lines, text and colours

    main(["--experiment", EXP, "--tracking-uri", uri, "--plot", str(tmp_path / "none.png"), "--metrics", "x/y"])
    assert "no metric to plot" in capsys.readouterr().out and not (tmp_path / "none.png").exists()


def test_script_prints_the_table(store: tuple[str, list[str]]) -> None:
    uri, ids = store
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "launch/compare.py", "--experiment", EXP, "--tracking-uri", uri],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert cells(proc.stdout, "optim.lr") == ["0.0001", "0.0002"]
    assert cells(proc.stdout, "id") == [ids[0][:8], ids[1][:8]]
    assert cells(proc.stdout, "train/total_loss") == ["0.2", "0.1"]
    print(proc.stdout)  # the sample shown with -s
