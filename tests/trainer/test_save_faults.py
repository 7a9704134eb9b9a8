"""One rank killed or slowed in the middle of a checkpoint save: ``latest`` keeps naming the previous complete one.

The real launcher (``launch/train_stage1.py``) under ``torchrun`` on 2 gloo ranks, two ZeRO-2 engines, the debug
recipe (8 steps, a checkpoint every 4) with dropout in the encoder and decoder, so that the runs also draw from
the global torch RNG after init and a resume must restore it (the debug recipe draws nothing else after init).
The fault is ``VITVQ_INJECT_FAULT=save@8,rank=1,...`` (``trainer/checkpoint.py``, ``maybe_fault``): on rank 1
only, inside ``CheckpointManager.save`` of step 8, after that rank has written its engine files and before it
writes its rank file; rank 0 goes on to write all of its own files and waits at the barrier before ``latest``.

- slowed: rank 1 sleeps 6 s there. ``latest`` must not move while rank 1's files are incomplete (watched while
  the run goes on, and by modification times afterwards), and ``meta.json`` lists the sha256 of every file of
  every rank. The run is otherwise undisturbed, so its losses are
  the uninterrupted reference for the killed run.
- killed: rank 1 SIGKILLs itself there (no exception handler, no exit hook runs; rank 0 then fails at the
  barrier and torchrun stops it). ``latest`` must still name step 4; the partial step-8 folder must not be
  resumed from and must be gone once the rerun has saved; the rerun of the same command resumes at step 4,
  redoes steps 5-8 and ends with the uninterrupted run's losses and weights, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitvq.data.shards import sha256_file
from vitvq.trainer.checkpoint import CheckpointManager, latest_file, meta_file, rank_file, step_folders, tag_of

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "train_stage1.py"
LOSSES = ("train/total_loss", "train/rec_loss", "train/g_loss", "train/disc_loss", "train/quant_loss")
SLEEP_S = 6.0


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(LAUNCH),
            "--config", str(ROOT / "configs/stage1/debug.yaml"), f"train.out_dir={out}", "train.progress=false",
            "train.tracking=false", "train.val_every=0", "train.image_every=100", "data.mode=epoch",
            "data.shuffle_buffer=16", "model.encoder.dropout=0.1", "model.decoder.dropout=0.1"]


def environment(env: dict, fault: str | None) -> dict:
    env = {k: v for k, v in env.items() if k != "VITVQ_INJECT_FAULT"}
    return {**env, "VITVQ_INJECT_FAULT": fault} if fault else env


def latest(out: Path) -> str | None:
    pointer = latest_file(out / "checkpoints")
    return pointer.read_text().strip() if pointer.is_file() else None


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, make_launch_env) -> dict:
    return make_launch_env(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def slowed(tmp_path_factory: pytest.TempPathFactory, env: dict) -> tuple[Path, list[dict]]:
    """A run whose rank 1 stalls in the middle of the step-8 save, watched every 50 ms while it runs."""
    out = tmp_path_factory.mktemp("slowed")
    ckpt = out / "checkpoints" / tag_of(8)
    proc = subprocess.Popen(command(out), env=environment(env, f"save@8,rank=1,sleep={SLEEP_S}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[dict] = []
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            pointer = latest(out)  # read first: a file seen below existed no later than this pointer value
        except FileNotFoundError:  # replaced at this very moment
            continue
        seen.append({"latest": pointer, "rank0": rank_file(ckpt, 0).is_file(),
                     "rank1": rank_file(ckpt, 1).is_file(), "meta": meta_file(ckpt).is_file()})
        time.sleep(0.05)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-6000:]
    return out, seen


@pytest.mark.e2e
def test_a_slow_rank_delays_latest_until_its_files_are_written(slowed: tuple[Path, list[dict]]) -> None:
    out, seen = slowed
    root = out / "checkpoints"
    assert latest(out) == tag_of(8)
    # Watched: rank 0 had finished its files while rank 1 slept, and latest still named step 4 then.
    stalled = [s for s in seen if s["rank0"] and not s["rank1"]]
    assert len(stalled) >= 3, f"the stall of rank 1 was not observed: {len(stalled)} of {len(seen)} looks"
    assert all(s["latest"] == tag_of(4) and not s["meta"] for s in stalled), \
        [s for s in stalled if s["latest"] != tag_of(4) or s["meta"]][:3]
    assert all(s["rank1"] and s["meta"] for s in seen if s["latest"] == tag_of(8)), \
        "latest named step 8 before every rank's files were there"
    # And on disk: the pointer and meta.json were written after the last of rank 1's files.
    rank1_files = [rank_file(root / tag_of(8), 1), *(root / tag_of(8)).glob("*/zero_pp_rank_1_*")]
    assert len(rank1_files) == 3  # its rank file and its two engine shards
    last = max(p.stat().st_mtime for p in rank1_files)
    for p in (latest_file(root), meta_file(root / tag_of(8))):
        assert p.stat().st_mtime >= last, f"{p.name} written {last - p.stat().st_mtime:.2f} s before rank 1's files"
    # meta.json lists every file of every rank (rank 1 hashes its own) with its size and sha256.
    folder = root / tag_of(8)
    files = json.loads(meta_file(folder).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert sorted(files) == sorted(on_disk) and all(p.relative_to(folder).as_posix() in files for p in rank1_files)
    assert all(files[n] == {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for n, p in on_disk.items())


@pytest.mark.e2e
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_latest(
        slowed: tuple[Path, list[dict]], env: dict, tmp_path: Path, losses) -> None:
    want = losses(slowed[0])
    assert sorted(want) == list(range(1, 9))
    out = tmp_path / "killed"
    root = out / "checkpoints"
    res = subprocess.run(command(out), env=environment(env, "save@8,rank=1,kill"), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode != 0 and "SIGKILL" in res.stderr, res.stderr[-4000:]
    # Rank 1 died after writing its engine shards of step 8 and before its rank file; nothing named step 8 complete.
    partial = root / tag_of(8)
    assert sorted(p.name for p in partial.glob("*/zero_pp_rank_1_*")) == ["zero_pp_rank_1_mp_rank_00_optim_states.pt"] * 2
    assert not rank_file(partial, 1).exists() and not meta_file(partial).exists()
    assert latest(out) == tag_of(4), "a checkpoint with a dead rank's files missing became the latest"
    assert CheckpointManager(out).latest()[0] == tag_of(4)
    leftover = partial / "generator" / "left-by-the-crashed-save"
    leftover.touch()  # anything of the crashed attempt must be gone from the step-8 checkpoint the rerun writes

    res = subprocess.run(command(out), env=environment(env, None), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert latest(out) == tag_of(8)
    assert meta_file(partial).is_file() and rank_file(partial, 1).is_file()
    assert not leftover.exists(), "the partial step-8 folder of the crashed save was reused, not replaced"
    assert f"resumed {tag_of(4)} at step 4" in res.stdout, f"the rerun did not resume at step 4: {res.stdout[-3000:]}"
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train/total_loss" in line]
    assert rows == list(range(1, 9)), f"steps 5-8 are not each logged once (the resume drops the redone ones): {rows}"
    got = losses(out)
    for step in range(1, 9):
        assert got[step] == want[step], f"step {step}: resumed {got[step]} != uninterrupted {want[step]}"
    a = torch.load(slowed[0] / "tokenizer.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "tokenizer.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ"


def test_fault_specs_pick_their_rank_and_action(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitvq.trainer.checkpoint import InjectedFault, maybe_fault
    monkeypatch.setenv("RANK", "0")
    for spec in ("save@8,rank=1,kill", "save@7", "step@8"):  # another rank, another step, another place
        monkeypatch.setenv("VITVQ_INJECT_FAULT", spec)
        maybe_fault("save", 8)
    monkeypatch.setenv("VITVQ_INJECT_FAULT", "save@8,rank=0,sleep=0.2")
    t0 = time.monotonic()
    maybe_fault("save", 8)  # stalls, then goes on
    assert time.monotonic() - t0 >= 0.2
    for spec in ("save@8", "save@8,rank=0"):
        monkeypatch.setenv("VITVQ_INJECT_FAULT", spec)
        with pytest.raises(InjectedFault, match=spec):
            maybe_fault("save", 8)


def test_a_starting_run_prunes_the_folders_of_crashed_saves(tmp_path: Path) -> None:
    """Rank 0's checkpoint manager removes, at start, every step folder without meta.json (older or newer than
    ``latest``) and keeps the complete ones; a read-only manager (exports, tools) deletes nothing."""
    import torch
    from vitvq.trainer.checkpoint import CheckpointManager
    from vitvq.trainer.engine import DistInfo
    root = tmp_path / "checkpoints"
    for step, complete in ((4, True), (6, False), (8, True), (12, False)):
        folder = root / tag_of(step)
        (folder / "generator").mkdir(parents=True)
        if complete:
            meta_file(folder).write_text("{}")
    latest_file(root).write_text(tag_of(8))
    CheckpointManager(tmp_path)  # read-only
    assert [p.name for p in step_folders(root)] == [tag_of(4), tag_of(6), tag_of(8), tag_of(12)]
    CheckpointManager(tmp_path, DistInfo(1, 2, 1, torch.device("cpu")))  # not rank 0: leaves it to rank 0
    assert len(step_folders(root)) == 4
    CheckpointManager(tmp_path, DistInfo(0, 2, 0, torch.device("cpu")))
    assert [p.name for p in step_folders(root)] == [tag_of(4), tag_of(8)]
    assert latest_file(root).read_text() == tag_of(8)
