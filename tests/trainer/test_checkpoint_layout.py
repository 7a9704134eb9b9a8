"""The checkpoint folder's names (``trainer/checkpoint.py``): fixed on disk, ordered by the step they stand for.

Step folders are zero-padded to 8 digits, so a run past step 99_999_999 writes ``step_100000000``, which sorts by
name before ``step_99999999``: retention, partial-folder pruning, the listing of complete checkpoints and the
Ray resume note must order by the parsed step. Single-rank managers with no process group (``barrier`` and the
object collectives are no-ops then) and a stand-in engine that writes one file, so no DeepSpeed is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from vitvq.trainer.checkpoint import (CheckpointManager, is_tag, latest_file, meta_file, rank_file, step_folders,
                                      step_of, tag_of)
from vitvq.trainer.engine import DistInfo
from vitvq.launch.orchestration.ray_train import resume_note

PAST_PADDING = (99_999_998, 99_999_999, 100_000_000, 100_000_001)
"""Steps on both sides of the 8-digit padding: ``step_100000000`` sorts by name before ``step_99999999``."""


class FileEngine:
    """Stands in for a DeepSpeed engine: ``save_checkpoint`` writes one file in ``<dir>/<tag>``."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"client_state": client_state}, Path(save_dir) / tag / "model_states.pt")


def single_rank(out: Path, keep_last: int) -> CheckpointManager:
    return CheckpointManager(out, DistInfo(0, 1, 0, torch.device("cpu")), keep_last)


def make_folders(root: Path, steps: dict[int, bool]) -> None:
    """Step folders as saves leave them: ``{step: complete}`` (a complete one has its meta file)."""
    for step, complete in steps.items():
        (root / tag_of(step) / "generator").mkdir(parents=True)
        if complete:
            meta_file(root / tag_of(step)).write_text(json.dumps({"step": step, "world_size": 1}))


def names(root: Path) -> list[str]:
    return [p.name for p in step_folders(root)]


@pytest.mark.parametrize("step", [0, 8, 1000, 99_999_999, 100_000_000, 12_345_678_901])
def test_a_step_folder_name_gives_back_its_step(step: int) -> None:
    assert step_of(tag_of(step)) == step and is_tag(tag_of(step))


def test_names_on_disk_stay_those_of_existing_checkpoints(tmp_path: Path) -> None:
    """The folders of runs written before are found, resumed and pruned by these very names."""
    assert tag_of(1000) == "step_00001000" and tag_of(100_000_000) == "step_100000000"
    assert step_of("step_00001000") == 1000 and CheckpointManager.tag(8) == "step_00000008"
    assert rank_file(tmp_path / "step_00000008", 3) == tmp_path / "step_00000008" / "rank_00003.pt"
    assert meta_file(tmp_path / "step_00000008") == tmp_path / "step_00000008" / "meta.json"
    assert latest_file(tmp_path) == tmp_path / "latest"


@pytest.mark.parametrize("name", ["latest", "meta.json", "generator", "step_", "step_8", "step_0000008",
                                  "step_000000008", "step_00000008.tmp", "step_00000008 ", "Step_00000008",
                                  "00000008", "step_-0000001", "step_+0000008", "step_0000_008", "step_0000000\u0668"])
def test_names_that_are_not_step_folders_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a checkpoint step folder name"):
        step_of(name)
    assert not is_tag(name)


def test_a_negative_step_has_no_folder() -> None:
    with pytest.raises(ValueError, match="step is >= 0"):
        tag_of(-1)


def test_step_folders_are_ordered_by_step_and_other_entries_ignored(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert step_folders(root) == []  # no checkpoints folder yet (a read-only manager on a fresh run)
    make_folders(root, {100_000_000: True, 4: False, 99_999_999: True})
    (root / "step_notes").mkdir()
    (root / "step_00000006.old").mkdir()
    (root / "step_00000005").write_text("a file, not a folder")
    latest_file(root).write_text(tag_of(100_000_000))
    assert names(root) == [tag_of(4), tag_of(99_999_999), tag_of(100_000_000)]


@pytest.mark.parametrize("keep_last", [1, 2])
def test_retention_keeps_the_newest_by_step_across_the_padding(tmp_path: Path, keep_last: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITVQ_INJECT_FAULT", raising=False)
    ckpt = single_rank(tmp_path, keep_last)
    for i, step in enumerate(PAST_PADDING):
        folder = ckpt.save(step, {"generator": FileEngine()}, {"step": step}, {"data": {"batches": step}}, {})
        assert folder == ckpt.root / tag_of(step) and rank_file(folder, 0).is_file()
        assert names(ckpt.root) == [tag_of(s) for s in PAST_PADDING[max(0, i + 1 - keep_last):i + 1]]
        assert ckpt.latest() == (tag_of(step), json.loads(meta_file(folder).read_text()))


def test_a_save_prunes_partial_folders_older_than_it_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed save's folder older than the step just saved goes; one newer by step stays (not this save's to
    judge), although by name the two compare the other way round."""
    monkeypatch.delenv("VITVQ_INJECT_FAULT", raising=False)
    ckpt = single_rank(tmp_path, keep_last=3)
    make_folders(ckpt.root, {99_999_998: False, 100_000_001: False})
    ckpt.save(99_999_999, {"generator": FileEngine()}, {}, {"data": {}}, {})
    assert names(ckpt.root) == [tag_of(99_999_999), tag_of(100_000_001)]
    make_folders(ckpt.root, {99_999_990: False})
    ckpt.save(100_000_000, {"generator": FileEngine()}, {}, {"data": {}}, {})
    assert names(ckpt.root) == [tag_of(99_999_999), tag_of(100_000_000), tag_of(100_000_001)]


def test_prune_partial_removes_the_partial_step_folders_oldest_first(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    make_folders(root, {99_999_998: True, 99_999_999: False, 100_000_000: True, 100_000_001: False})
    (root / "step_notes").mkdir()  # not a step folder: never taken for a crashed save
    latest_file(root).write_text(tag_of(100_000_000))
    removed = CheckpointManager(tmp_path).prune_partial()
    assert [p.name for p in removed] == [tag_of(99_999_999), tag_of(100_000_001)]
    assert names(root) == [tag_of(99_999_998), tag_of(100_000_000)] and (root / "step_notes").is_dir()


def test_complete_names_the_complete_checkpoints_in_step_order(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    make_folders(root, {100_000_000: True, 99_999_999: True, 100_000_001: False, 4: True})
    latest_file(root).write_text(tag_of(100_000_000))
    ckpt = CheckpointManager(tmp_path)
    assert ckpt.complete() == (tag_of(100_000_000), {"step": 100_000_000, "world_size": 1})
    assert ckpt.complete(tag_of(99_999_999))[1]["step"] == 99_999_999
    done = [tag_of(4), tag_of(99_999_999), tag_of(100_000_000)]
    for missing in (tag_of(100_000_001), tag_of(5)):  # partial, absent
        with pytest.raises(FileNotFoundError, match=re.escape(f"complete ones: {done}")):
            ckpt.complete(missing)


def test_the_ray_resume_note_compares_steps_not_names(tmp_path: Path) -> None:
    """Ray's pointer one report behind ours across the padding is the lag the note explains."""
    root = tmp_path / "checkpoints"
    make_folders(root, {99_999_999: True, 100_000_000: True})
    latest_file(root).write_text(tag_of(100_000_000))
    pointer = {"tag": tag_of(99_999_999), "step": 99_999_999, "out_dir": str(tmp_path)}
    note = resume_note(tmp_path, pointer)
    assert note.startswith(f"resuming from {tag_of(100_000_000)}") and "had not registered the newer report" in note
