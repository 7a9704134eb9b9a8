"""Damaged checkpoints and full disks (issue 20, items 3 and 7): named, and never resumed from.

A save records every file's size and sha256 in ``meta.json`` (``trainer/integrity.py``); a resume checks them and
falls back to the newest intact checkpoint, saying so. A save that cannot write (a full disk, which PyTorch's
writer reports as ``unexpected pos``) names the folder, the free space and what a checkpoint takes, keeps
``latest`` on the previous checkpoint, and a rerun deletes partial step folders before it writes anything.

The quick tests use single-rank managers without a process group and a stand-in engine that writes one file;
the end-to-end ones run the real launcher (``launch/train_stage1.py``, one rank, two DeepSpeed ZeRO-2 engines,
the debug recipe with checkpoints at steps 4 and 8) as a subprocess. The full-disk tests mount a small tmpfs
(root only; skipped otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from vitvq.trainer.checkpoint import (CheckpointManager, CheckpointWriteError, check_shared_folder, latest_file,
                                      meta_file, rank_file, step_folders, tag_of)
from vitvq.trainer.engine import DistInfo
from vitvq.trainer.integrity import folder_bytes

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "train_stage1.py"
RUN = ("train.progress=false", "train.tracking=false", "train.val_every=0", "train.image_every=100",
       "data.mode=epoch", "data.shuffle_buffer=16")
MODEL_FILE = "generator/mp_rank_00_model_states.pt"
OPTIM_FILE = "generator/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FileEngine:
    """Stands in for a DeepSpeed engine: ``save_checkpoint`` writes ``<dir>/<tag>/model_states.pt`` of about
    ``nbytes`` bytes."""

    def __init__(self, nbytes: int = 4096):
        self.nbytes = nbytes

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        weights = torch.arange(self.nbytes // 4, dtype=torch.float32)
        torch.save({"client_state": client_state, "w": weights}, Path(save_dir) / tag / "model_states.pt")


def single_rank(out: Path, keep_last: int = 2) -> CheckpointManager:
    return CheckpointManager(out, DistInfo(0, 1, 0, torch.device("cpu")), keep_last)


def save(ckpt: CheckpointManager, step: int, nbytes: int = 4096) -> Path:
    return ckpt.save(step, {"generator": FileEngine(nbytes)}, {"step": step}, {"data": {"batches": step}}, {})


def flip_a_weight_bit(path: Path) -> None:
    """Flip one exponent bit of a float in the largest tensor that ``path`` (a torch.save file) holds: its raw bytes
    sit uncompressed in the zip, and ``torch.load`` reads the changed value without complaint."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    tensors = [v for v in (state.get("module") or state).values() if isinstance(v, torch.Tensor)]
    t = max(tensors, key=torch.Tensor.numel).contiguous()
    raw = bytearray(path.read_bytes())
    at = raw.find(t.numpy().tobytes())
    assert at >= 0, f"the bytes of a tensor of {path} were not found in it"
    raw[at + 4 * (t.numel() // 2) + 3] ^= 0x40  # the high exponent bit of the middle value (little-endian)
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def garbage_meta(folder: Path) -> None:
    meta_file(folder).write_bytes(b'{"step": 8, "world_size"\x00\x17 garbage')


# -- quick: the manager alone ----------------------------------------------------------------------------------
def test_a_save_records_the_size_and_sha256_of_every_file(tmp_path: Path) -> None:
    import hashlib
    folder = save(single_rank(tmp_path), 4)
    files = json.loads(meta_file(folder).read_text())["files"]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.name != "meta.json")
    assert sorted(files) == on_disk == ["generator/model_states.pt", "rank_00000.pt"]
    for name, rec in files.items():
        data = (folder / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@pytest.mark.parametrize("damage, why", [
    (lambda f: flip_a_weight_bit(f / "generator/model_states.pt"), "generator/model_states.pt: sha256 mismatch"),
    (lambda f: truncate(f / "rank_00000.pt"), "rank_00000.pt: 7"),
    (lambda f: (f / "generator/model_states.pt").unlink(), "generator/model_states.pt: missing"),
    (garbage_meta, "meta.json: not valid JSON"),
    (lambda f: meta_file(f).write_text("[8]"), "meta.json: not a checkpoint description"),
], ids=["flipped-bit", "truncated", "missing-file", "garbage-meta", "meta-not-an-object"])
def test_a_damaged_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path, capsys, damage: Callable,
                                                                       why: str) -> None:
    ckpt = single_rank(tmp_path, keep_last=3)
    for step in (4, 6, 8):
        save(ckpt, step)
    damage(ckpt.root / tag_of(8))
    capsys.readouterr()
    tag, meta = single_rank(tmp_path).latest()
    assert (tag, meta["step"]) == (tag_of(6), 6)
    said = capsys.readouterr().out
    assert f"checkpoint {tag_of(8)} is damaged ({why}" in said, said
    assert f"resuming from {tag_of(6)} instead; delete or move {ckpt.root / tag_of(8)} to silence this" in said
    assert latest_file(ckpt.root).read_text() == tag_of(8)  # nothing is changed on disk: the damage stays to see
    assert CheckpointManager(tmp_path).complete() == (tag, meta)  # read-only (exports): the same choice
    with pytest.raises(RuntimeError, match=f"{tag_of(8)} is damaged"):
        CheckpointManager(tmp_path).complete(tag_of(8))


def test_with_no_intact_checkpoint_left_the_error_names_every_damaged_file(tmp_path: Path) -> None:
    ckpt = single_rank(tmp_path)
    for step in (4, 8):
        save(ckpt, step)
    garbage_meta(ckpt.root / tag_of(8))
    truncate(ckpt.root / tag_of(4) / "generator/model_states.pt")
    with pytest.raises(RuntimeError, match=r"no intact checkpoint in .*step_00000008 \(meta.json: not valid JSON.*"
                                           r"step_00000004 \(generator/model_states.pt: \d+ bytes, \d+ written "
                                           r"\(truncated\)\)"):
        single_rank(tmp_path).latest()


def test_checkpoints_written_before_checksums_resume_unchecked_and_say_so_once(tmp_path: Path, capsys) -> None:
    ckpt = single_rank(tmp_path)
    folder = save(ckpt, 4)
    meta = json.loads(meta_file(folder).read_text())
    del meta["files"]  # as an older vitvq wrote it
    meta_file(folder).write_text(json.dumps(meta))
    capsys.readouterr()
    reader = single_rank(tmp_path)
    assert reader.latest() == (tag_of(4), meta) and reader.complete() == (tag_of(4), meta)
    said = capsys.readouterr().out
    assert said.count("no checksums recorded") == 1, said


def test_universal_format_folders_made_at_resume_do_not_break_the_check(tmp_path: Path, capsys) -> None:
    """``convert_to_universal`` writes ``<engine>_universal`` (through ``.tmp``) into the step folder at a resume on
    another world size: derived files, never listed, so neither they nor their leftovers count as damage."""
    ckpt = single_rank(tmp_path)
    folder = save(ckpt, 4)
    for derived in ("generator_universal/zero/w/fp32.pt", "generator_universal.tmp/zero/w/fp32.pt"):
        (folder / derived).parent.mkdir(parents=True)
        (folder / derived).write_bytes(b"derived")
    capsys.readouterr()
    assert single_rank(tmp_path).latest()[0] == tag_of(4)
    assert capsys.readouterr().out == ""


# -- full disks ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(kib)``: a fresh tmpfs of ``kib`` KiB, unmounted at teardown (root only)."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): needs CAP_SYS_ADMIN")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> None:
    """A partial file that grows until the disk is full, as a save killed on a full disk leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    assert shutil.disk_usage(path.parent).free < 65536


def test_a_full_disk_is_named_and_latest_kept(small_disk: Callable[[int], Path]) -> None:
    out = small_disk(1024)
    ckpt = single_rank(out, keep_last=1)
    save(ckpt, 4, nbytes=300_000)
    with pytest.raises(CheckpointWriteError) as caught:
        save(ckpt, 8, nbytes=900_000)  # PyTorch's writer fails with "unexpected pos ..." partway
    msg = str(caught.value)
    assert "No space left on device" in msg and str(ckpt.root / tag_of(8)) in msg, msg
    assert re.search(rf"\d+\.\d KiB are free on that filesystem now.*takes 3\d\d\.\d KiB \({tag_of(4)}\)", msg), msg
    assert f"still names {tag_of(4)}" in msg and "train.keep_last" in msg, msg
    assert latest_file(ckpt.root).read_text() == tag_of(4)
    assert [p.name for p in step_folders(ckpt.root)] == [tag_of(4)], "the partial folder was left on the full disk"
    assert single_rank(out).latest()[0] == tag_of(4)


def test_a_starting_run_deletes_partial_folders_before_it_writes_anything(small_disk: Callable[[int], Path]) -> None:
    """The disk is full because a killed save's partial folder filled it: the run's first write (the shared-storage
    probe) would fail, so the partial folder goes first."""
    out = small_disk(512)
    root = out / "checkpoints"
    save(single_rank(out), 4)
    fill(root / tag_of(8) / "generator" / "model_states.pt")
    check_shared_folder(out, DistInfo(0, 1, 0, torch.device("cpu")))  # no process group: a group of one
    assert [p.name for p in step_folders(root)] == [tag_of(4)]


# -- end to end: the real launcher -----------------------------------------------------------------------------
def launch(out: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCH), "--config", str(ROOT / "configs/stage1/debug.yaml"), f"train.out_dir={out}",
           *RUN, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def same_weights(a: Path, b: Path) -> bool:
    x, y = (torch.load(p / "tokenizer.pt", weights_only=False)["state_dict"] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, make_launch_env) -> dict:
    return {k: v for k, v in make_launch_env(tmp_path_factory.mktemp("mlflow")).items() if k != "VITVQ_INJECT_FAULT"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, env: dict) -> Path:
    """8 steps uninterrupted, keeping both checkpoints (steps 4 and 8)."""
    out = tmp_path_factory.mktemp("reference")
    res = launch(out, env, "train.keep_last=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert [p.name for p in step_folders(out / "checkpoints")] == [tag_of(4), tag_of(8)]
    return out


@pytest.mark.e2e
def test_a_damaged_checkpoint_is_skipped_for_the_older_intact_one(reference: Path, env: dict, tmp_path: Path,
                                                                  losses) -> None:
    """End to end with one damage, a flipped bit (the one that resumed silently); every kind of damage (truncated,
    missing, garbage meta.json) takes the same fallback path, each checked in process above."""
    out, why = tmp_path / "run", f"{MODEL_FILE}: sha256 mismatch"
    shutil.copytree(reference, out)
    flip_a_weight_bit(out / "checkpoints" / tag_of(8) / MODEL_FILE)
    res = launch(out, env, "train.keep_last=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    said = f"checkpoint {tag_of(8)} is damaged ({why}"
    assert said in res.stdout and f"resuming from {tag_of(4)} instead" in res.stdout, res.stdout[-3000:]
    assert f"resumed {tag_of(4)} at step 4" in res.stdout, res.stdout[-3000:]
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train/total_loss" in line]
    assert rows == list(range(1, 9)), f"steps 5-8 are not each logged once: {rows}"
    got, want = losses(out), losses(reference)
    assert all(got[s] == want[s] for s in range(1, 9)), "the resumed run's losses differ from the uninterrupted run's"
    assert same_weights(out, reference), "the run did not resume from the step-4 weights"


@pytest.mark.e2e
def test_a_save_on_a_full_disk_is_named_and_the_rerun_frees_the_partial_folder(
        reference: Path, env: dict, small_disk: Callable[[int], Path], losses) -> None:
    ckpt_bytes = folder_bytes(reference / "checkpoints" / tag_of(4))
    run_bytes = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())  # both checkpoints, all else
    tokenizer = (reference / "tokenizer.pt").stat().st_size
    disk = small_disk((run_bytes >> 10) + 1024)  # a keep_last=1 run fits, with 1 MiB to spare (tmpfs pages)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (ckpt_bytes // 2 + tokenizer + (1 << 20)))  # leaves about half a checkpoint free
    out = disk / "run"
    res = launch(out, env, "train.keep_last=1")
    assert res.returncode != 0, res.stdout[-3000:]
    error = res.stderr[-6000:]
    assert "CheckpointWriteError" in error and "No space left on device" in error, error
    assert f"{out / 'checkpoints' / tag_of(8)}" in error and " free on that filesystem now" in error, error
    assert f"still names {tag_of(4)}" in error, error
    assert latest_file(out / "checkpoints").read_text() == tag_of(4)
    # A save killed on the full disk instead (no handler ran): its partial folder is what fills the disk.
    filler.unlink()
    fill(out / "checkpoints" / tag_of(8) / OPTIM_FILE)
    res = launch(out, env, "train.keep_last=1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert f"resumed {tag_of(4)}" in res.stdout
    assert latest_file(out / "checkpoints").read_text() == tag_of(8)
    assert rank_file(out / "checkpoints" / tag_of(8), 0).is_file()
    got, want = losses(out), losses(reference)
    assert all(got[s] == want[s] for s in range(1, 9)) and same_weights(out, reference)
