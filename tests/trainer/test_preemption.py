"""Preemption and shared storage. SIGTERM to a 2-rank ``launch/torchrun.py`` mid-training (what a scheduler or Ray's downscale sends), then the
same command again, ends with the weights of an uninterrupted run; the MLflow run is marked KILLED in between
and continued, not duplicated.

launch/torchrun.py forwards SIGTERM to its workers; each rank's handler only sets a flag, the ranks agree at the end of
the step (one all-reduce), save that step's checkpoint, close the MLflow run as KILLED and exit with status 75, and
so does the launcher (torchrun itself would exit 1).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitvq.trainer.checkpoint import latest_file, meta_file, step_of, tag_of

pytestmark = pytest.mark.e2e  # 2-rank DeepSpeed runs
ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "train_stage1.py"
STEPS = 40


def command(out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "torchrun.py"), "--standalone", "--nproc_per_node", "2", str(LAUNCH),
            "--config", str(ROOT / "configs/stage1/debug.yaml"), f"train.out_dir={out}", "train.progress=false",
            f"train.steps={STEPS}", "train.ckpt_every=1000", "train.val_every=0", "train.image_every=1000",
            "train.log_every=1", "data.mode=epoch", "data.shuffle_buffer=16"]


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_saves_the_step_and_the_same_command_finishes_like_an_uninterrupted_run(
        tmp_path: Path, make_launch_env) -> None:
    from vitvq.trainer.tracking import mlflow_client
    env = make_launch_env(tmp_path)
    straight = tmp_path / "straight"
    res = subprocess.run(command(straight), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]

    out = tmp_path / "preempted"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while logged_steps(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-4000:]  # plain torchrun exits 1 here: a requeue-on-75 scheduler would not requeue
    assert "preempted: stopped by SIGTERM after step" in err, err[-4000:]
    latest = latest_file(out / "checkpoints").read_text().strip()
    stopped = step_of(latest)
    assert 3 <= stopped < STEPS, f"saved {latest}"
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("vitvq-stage1")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    preempted_run = next(r for r in runs.values() if r.info.status == "KILLED")

    res = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"resumed {latest} at step {stopped} on 2 rank(s)" in res.stdout  # said once (rank 0), never silent
    assert res.stdout.count("resumed step_") == 1
    assert json.loads(meta_file(out / "checkpoints" / tag_of(STEPS)).read_text())["step"] == STEPS
    a = torch.load(out / "tokenizer.pt", weights_only=False)["state_dict"]
    b = torch.load(straight / "tokenizer.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b), "weights after preemption + rerun differ from the uninterrupted run"
    again = client.get_run(preempted_run.info.run_id)
    assert again.info.status == "FINISHED" and len(client.search_runs([exp.experiment_id])) == 2  # continued


def test_an_out_dir_that_is_not_shared_by_every_rank_is_refused(tmp_path: Path, run_on_two_ranks) -> None:
    run_on_two_ranks(Path(__file__).with_name("shared_folder_worker.py"), tmp_path)
