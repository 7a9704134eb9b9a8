"""The Trainer serves any task: a non-GAN task with one engine trains, checkpoints, resumes exactly and exports.

``tests/trainer/toy_task.py`` is the task (least squares on one DeepSpeed engine); it plugs into
``trainer.task.STAGES`` and runs through the same ``train(cfg)`` as stage 1, on 2 gloo ranks under torchrun.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitvq.trainer.checkpoint import meta_file, tag_of

pytestmark = pytest.mark.e2e  # 2-rank DeepSpeed runs
TOY = Path(__file__).with_name("toy_task.py")


def run(out: Path, env: dict, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(env, **({"VITVQ_INJECT_FAULT": fault} if fault else {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TOY),
           f"train.out_dir={out}", "train.tracking=false", "train.progress=false"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_a_second_task_trains_resumes_and_exports_through_the_same_trainer(tmp_path: Path, torchrun_env: dict,
                                                                           losses) -> None:
    straight = tmp_path / "straight"
    res = run(straight, torchrun_env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    want = {s: r["train/loss"] for s, r in losses(straight, ("train/loss",)).items()}
    assert sorted(want) == list(range(1, 7)) and want[6] < want[1]  # it learns
    row = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/loss", "train/lr", "perf/samples_per_s", "perf/step_s"} <= set(row)
    assert not (straight / "images").exists() and not (straight / "reconstructions.png").exists()
    meta = json.loads(meta_file(straight / "checkpoints" / tag_of(6)).read_text())
    assert meta["stage"] == "toy" and meta["config"]["dim"] == 8

    interrupted = tmp_path / "interrupted"
    res = run(interrupted, torchrun_env, fault="step@5")  # dies after step 5: step 4 is the latest checkpoint
    assert res.returncode != 0 and "injected fault step@5" in res.stderr
    res = run(interrupted, torchrun_env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    got = {s: r["train/loss"] for s, r in losses(interrupted, ("train/loss",)).items()}
    assert got == want  # the redone steps 5-6 logged last
    a = torch.load(straight / "toy.pt", weights_only=False)["state_dict"]
    b = torch.load(interrupted / "toy.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
