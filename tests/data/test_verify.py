"""Shard verification (issue 20.5): a shard that differs from its index stops training and evaluation with its name,
both sha256 and the fix, in the training process and in DataLoader workers, for local, pipe: and HTTP shards;
``verify_shards=false`` reads it as before."""

from __future__ import annotations

import json
import re
import shutil
from itertools import islice
from pathlib import Path

import pytest

from vitvq.data import DataConfig, build_eval_loader, build_train_stream
from vitvq.data.shards import sha256_file
from vitvq.data.verify import ShardMismatch, forget_verified


def tampered(syn_index: Path, tmp_path: Path, how: str) -> tuple[Path, dict, str]:
    """A copy of the synthetic shards with shard 3 changed; returns (index path, its shard-3 entry, actual sha256)."""
    out = tmp_path / "shards"
    shutil.copytree(syn_index.parent, out)
    entries = json.loads((out / syn_index.name).read_text())["shards"]
    target = out / entries[3]["name"]
    if how == "swapped":  # another shard under its name: other images, a plausible tar
        shutil.copyfile(out / entries[4]["name"], target)
    else:  # one byte of image data changed: same size, same sample count
        data = bytearray(target.read_bytes())
        data[2000] ^= 0x01
        target.write_bytes(bytes(data))
    return out / syn_index.name, entries[3], sha256_file(target)


def read_epoch(spec: str, workers: int, **kw) -> int:
    cfg = DataConfig(train_shards=spec, image_size=16, num_workers=workers, shuffle_buffer=7, **kw)
    stream = build_train_stream(cfg, batch_size=1, rank=0, world_size=1, seed=0)  # batch 1: every sample read
    return sum(b["image"].shape[0] for b in islice(stream, stream.batches_per_epoch))


def expect_mismatch(excinfo: pytest.ExceptionInfo, entry: dict, actual: str) -> None:
    text = str(excinfo.value)
    assert entry["name"] in text and entry["sha256"] in text and actual in text
    assert re.search(r"re-run the same launch/prepare_data\.py", text) and "data.verify_shards=false" in text


@pytest.mark.parametrize("how", ["swapped", "byte"])
@pytest.mark.parametrize("spec", ["index", "pattern"])
def test_a_changed_shard_stops_training_with_its_name_both_sha256_and_the_fix(syn_index: Path, tmp_path: Path,
                                                                               how: str, spec: str) -> None:
    forget_verified()
    index, entry, actual = tampered(syn_index, tmp_path, how)
    assert actual != entry["sha256"]
    given = str(index) if spec == "index" else f"{index.parent}/syn-train-{{000000..000008}}.tar"
    with pytest.raises(ShardMismatch) as excinfo:
        read_epoch(given, workers=0)
    expect_mismatch(excinfo, entry, actual)


def test_a_changed_shard_stops_a_dataloader_worker_and_the_flag_skips_the_check(syn_index: Path,
                                                                                tmp_path: Path) -> None:
    forget_verified()
    index, entry, actual = tampered(syn_index, tmp_path, "byte")
    with pytest.raises(ShardMismatch) as excinfo:  # raised in the worker, re-raised by the DataLoader
        read_epoch(str(index), workers=1)
    expect_mismatch(excinfo, entry, actual)
    assert read_epoch(str(index), workers=0, verify_shards=False) == 83  # a trusted store: read as it is


def test_shards_are_checked_on_first_open_in_each_process(syn_index: Path, tmp_path: Path) -> None:
    forget_verified()
    out = tmp_path / "copy"
    shutil.copytree(syn_index.parent, out)
    assert read_epoch(str(out / syn_index.name), workers=0) == 83  # untouched shards pass
    tampered_in_place = out / json.loads(syn_index.read_text())["shards"][3]["name"]
    data = bytearray(tampered_in_place.read_bytes())
    data[2000] ^= 0x01
    tampered_in_place.write_bytes(bytes(data))
    assert read_epoch(str(out / syn_index.name), workers=0) == 83  # verified already: not hashed again here
    forget_verified()  # as a new process would
    with pytest.raises(ShardMismatch):
        read_epoch(str(out / syn_index.name), workers=0)


def test_a_changed_remote_shard_stops_pipe_and_http_reads_and_evaluation(syn_index: Path, tmp_path: Path,
                                                                         http_serve) -> None:
    forget_verified()
    index, entry, actual = tampered(syn_index, tmp_path, "swapped")
    pattern = "syn-train-{000000..000008}.tar"
    for spec in (f"pipe:cat {index.parent}/{pattern}", f"{http_serve(index.parent)}/{pattern}"):
        with pytest.raises(ShardMismatch) as excinfo:
            read_epoch(spec, workers=0, index=str(index))
        expect_mismatch(excinfo, entry, actual)
        loader = build_eval_loader(spec, image_size=16, batch_size=8, rank=0, world_size=1, index=str(index))
        with pytest.raises(ShardMismatch):
            list(loader)
        unchecked = build_eval_loader(spec, image_size=16, batch_size=8, rank=0, world_size=1, index=str(index),
                                      verify=False)
        assert sum(b["image"].shape[0] for b in unchecked) + unchecked.skipped == 83  # read as before
