"""Checkpoints that lose nothing: exact resume, a crash in the middle of a save (another world size:
``test_world_size.py``).

Every run here is the real launcher (``launch/train_stage1.py``) under ``torchrun`` on 2 gloo ranks with two
DeepSpeed ZeRO-2 engines, the debug recipe, and the built-in demo shards. Losses are compared through the
``metrics.jsonl`` the trainer writes beside its checkpoints (the same values it sends to MLflow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitvq.trainer.checkpoint import latest_file, meta_file, rank_file, tag_of

pytestmark = pytest.mark.e2e  # 2-rank DeepSpeed runs
ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "train_stage1.py"
COMMON = ("train.progress=false", "train.val_every=0", "train.image_every=100", "data.mode=epoch",
          "data.shuffle_buffer=16")  # conftest.DEBUG_RUN: the session's stage1_reference was run with them
LOSSES = ("train/total_loss", "train/rec_loss", "train/g_loss", "train/disc_loss", "train/quant_loss")


def launch(out: Path, env: dict, ranks: int, *overrides: str, fault: str | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    env = dict(env)
    if fault:
        env["VITVQ_INJECT_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(LAUNCH), "--config", str(ROOT / "configs/stage1/debug.yaml"), f"train.out_dir={out}",
           "train.tracking=false", *COMMON, *overrides]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def latest(out: Path) -> str:
    return latest_file(out / "checkpoints").read_text().strip()


@pytest.fixture(scope="module")
def straight(stage1_reference) -> Path:
    """The uninterrupted run: the session's (the same recipe, overrides and ranks as :func:`launch`; MLflow
    tracking on there changes no loss or weight)."""
    assert stage1_reference.common == COMMON
    return stage1_reference.out


@pytest.fixture(scope="module")
def torchrun_env(tmp_path_factory: pytest.TempPathFactory, make_launch_env) -> dict:  # module-scoped
    return make_launch_env(tmp_path_factory.mktemp("mlflow"))


def test_stop_resume_and_crash_during_save_give_the_uninterrupted_losses(straight: Path, tmp_path: Path,
                                                                          torchrun_env: dict, losses) -> None:
    want = losses(straight)
    assert sorted(want) == list(range(1, 9))
    out = tmp_path / "interrupted"
    # 1. Dies after step 6: the step-4 checkpoint is the latest; steps 5-6 are lost and must be redone.
    res = launch(out, torchrun_env, 2, fault="step@6", check=False)
    assert res.returncode != 0 and "injected fault step@6" in res.stderr
    assert latest(out) == tag_of(4)
    # 2. Resumes at 4, then dies in the middle of writing the step-8 checkpoint (engines written, rank files not).
    res = launch(out, torchrun_env, 2, fault="save@8", check=False)
    assert res.returncode != 0 and "injected fault save@8" in res.stderr
    assert latest(out) == tag_of(4), "a half-written checkpoint became the latest"
    assert not meta_file(out / "checkpoints" / tag_of(8)).exists()
    # 3. Resumes at 4 again and finishes; a partial folder a crashed save of another step left is pruned.
    partial = out / "checkpoints" / tag_of(3)
    (partial / "generator").mkdir(parents=True)
    launch(out, torchrun_env, 2)
    assert latest(out) == tag_of(8)
    assert not partial.exists(), "a partial checkpoint folder (no meta.json) was not pruned"
    got = losses(out)
    for step in range(1, 9):
        assert got[step] == want[step], f"step {step}: resumed {got[step]} != uninterrupted {want[step]}"
    # The weights are the same too: the exports of both runs hold identical tensors.
    a = torch.load(straight / "tokenizer.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "tokenizer.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_resumed_run_does_not_initialise_the_codebook_again(tmp_path: Path, torchrun_env: dict) -> None:
    out, km = tmp_path / "kmeans", ("model.quantizer.init=kmeans", "model.quantizer.kmeans_points=256")
    res = launch(out, torchrun_env, 1, *km, fault="step@6", check=False)
    assert res.returncode != 0 and "codebook initialised by k-means on 256 lookup vectors" in res.stdout
    res = launch(out, torchrun_env, 1, *km)  # resumes at step 4: the initialised codebook is in the checkpoint
    assert "codebook initialised" not in res.stdout
    assert json.loads(meta_file(out / "checkpoints" / latest(out)).read_text())["step"] == 8


def test_a_resume_between_two_codebook_restarts_restarts_the_same_codes(straight: Path, tmp_path: Path,
                                                                         torchrun_env: dict, losses) -> None:
    """The debug recipe checks for dead codes every 2 steps and draws their new vectors from each rank's pool of
    recent encoder outputs. A checkpoint at step 3 sits between two checks: the pools must come back with it (each
    rank's file), or the restarts at step 4 differ (or do not happen) and so does everything after."""
    out = tmp_path / "odd"
    res = launch(out, torchrun_env, 2, "train.ckpt_every=3", fault="step@5", check=False)
    assert res.returncode != 0 and latest(out) == tag_of(3)
    pools = torch.load(rank_file(out / "checkpoints" / tag_of(3), 1), weights_only=False)["task"]
    assert pools["restart_pools"][0] is not None  # rank 1's own vectors since the check at step 2
    launch(out, torchrun_env, 2, "train.ckpt_every=3")
    got, want = losses(out), losses(straight)
    for step in range(1, 9):
        assert got[step] == want[step], f"step {step}: resumed {got[step]} != uninterrupted {want[step]}"
