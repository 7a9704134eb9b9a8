"""Training stream: exactly-once epochs over ranks x workers, resampling, exact resume, pipe: URLs, bad samples."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch

from vitvq.data import DataConfig, ShardError, build_eval_loader, build_train_stream
from vitvq.data.shards import WriteOptions, write_shards
from vitvq.data.sources import list_folder
from vitvq.data.urls import count_tar


def cfg_for(spec: str | Path, **kw) -> DataConfig:
    base = dict(train_shards=str(spec), image_size=16, num_workers=2, shuffle_buffer=7)
    return DataConfig(**{**base, **kw})


def take(stream, n: int) -> list[dict]:
    return list(islice(stream, n))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
                                    and x["key"] == y["key"] for x, y in zip(a, b))


def test_epoch_mode_every_sample_once_over_2_ranks_x_2_workers(syn_index: Path) -> None:
    cfg = cfg_for(syn_index)
    streams = [build_train_stream(cfg, batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    # 83 samples over 2 ranks x 2 workers x batch 4: K = 83 // 16 = 5 batches per worker, 3 left out.
    assert [s.batches_per_epoch for s in streams] == [10, 10] and streams[0].dropped_per_epoch == 3
    epochs = []
    for epoch in range(2):
        keys = []
        for s in streams:
            batches = take(s, s.batches_per_epoch)
            assert len(batches) == 10 and all(b["image"].shape == (4, 3, 16, 16) for b in batches)
            keys += [k for b in batches for k in b["key"]]
        assert len(keys) == len(set(keys)) == 80  # each sample at most once, all but the 3 left out
        epochs.append(keys)
    assert epochs[0] != epochs[1] and set(epochs[0]) != set(epochs[1])  # new order and new left-out tail


def test_resampled_mode_keeps_going(syn_index: Path) -> None:
    s = build_train_stream(cfg_for(syn_index, mode="resampled", num_workers=0), batch_size=8, rank=0,
                           world_size=1, seed=0)
    batches = take(s, 3 * s.batches_per_epoch + 1)
    keys = [k for b in batches for k in b["key"]]
    assert len(batches) == 31 and s.epoch == 3
    assert len(set(keys)) < len(keys)  # shards drawn with replacement repeat samples


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_mid_epoch_is_exact(syn_index: Path, mode: str) -> None:
    cfg = cfg_for(syn_index, mode=mode, num_workers=2, transform="random_resized_crop")
    kw = dict(batch_size=8, rank=1, world_size=2, seed=7)
    whole = take(build_train_stream(cfg, **kw), 9)  # 83 // (2 x 2 x 8) = 2 per worker: 4 batches per epoch
    first = build_train_stream(cfg, **kw)
    head = take(first, 3)  # workers have prefetched more than this; the state counts what we received
    state = json.loads(json.dumps(first.state_dict()))  # travels through a checkpoint as plain data
    assert state["batches"] == 3 and state["samples_consumed"] == 24
    resumed = build_train_stream(cfg, **kw, state=state)
    assert same(head + take(resumed, 6), whole)
    # Odd resume point: the worker that produced the last consumed batch is not the next one.
    state = json.loads(json.dumps(resumed.state_dict()))
    assert state["batches"] == 9 and state["epoch"] == 2
    again = take(build_train_stream(cfg, **kw, state=state), 2)
    assert same(again, take(build_train_stream(cfg, **kw), 11)[9:])


def test_state_of_one_rank_restores_another(syn_index: Path) -> None:
    # Every rank consumes the same number of batches, so rank 0's state restores rank 1 exactly.
    cfg = cfg_for(syn_index, num_workers=2)
    r0 = build_train_stream(cfg, batch_size=4, rank=0, world_size=2, seed=1)
    take(r0, 4)
    r1 = build_train_stream(cfg, batch_size=4, rank=1, world_size=2, seed=1, state=r0.state_dict())
    assert same(take(r1, 3), take(build_train_stream(cfg, batch_size=4, rank=1, world_size=2, seed=1), 7)[4:])



@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_another_world_size_starts_every_rank_at_the_next_epoch(syn_index: Path, old_world: int, new_world: int,
                                                                caplog) -> None:
    # The policy after a resize (README, "Changing the world size"): the interrupted epoch's unread samples are
    # passed over, every new rank starts the next epoch of the new layout, whose samples are then read once each.
    cfg, kw = cfg_for(syn_index, num_workers=2), dict(batch_size=4, seed=1)
    old = build_train_stream(cfg, rank=0, world_size=old_world, **kw)
    done = 3 if old_world == 2 else 6  # into epoch 1: 83 // (2 x 2 x 4) = 5 per worker, 10 per epoch on 2 ranks
    take(old, old.batches_per_epoch + done)
    state = json.loads(json.dumps(old.state_dict()))
    assert state["epoch"] == 1 and state["batch_in_epoch"] == done
    with caplog.at_level(logging.WARNING, logger="vitvq.data.stream"):
        new = [build_train_stream(cfg, rank=r, world_size=new_world, state=state, **kw) for r in range(new_world)]
    assert {(s.epoch, s.batches % s.batches_per_epoch) for s in new} == {(2, 0)}
    keys = [k for s in new for b in take(s, s.batches_per_epoch) for k in b["key"]]
    per_epoch = new[0].batches_per_epoch * 4 * new_world
    assert len(keys) == len(set(keys)) == per_epoch == 83 - new[0].dropped_per_epoch
    fresh = [build_train_stream(cfg, rank=r, world_size=new_world, epoch=2, **kw) for r in range(new_world)]
    assert keys == [k for s in fresh for b in take(s, s.batches_per_epoch) for k in b["key"]]
    unread = old.batches_per_epoch * 4 * old_world - done * 4 * old_world
    lines = [r.message for r in caplog.records if "continuing" in r.message]
    assert lines == [f"world size {old_world} -> {new_world} (epoch 1, {100 * done // old.batches_per_epoch}% read): "
                     f"continuing at the start of epoch 2; {unread} samples of epoch 1 not read"]  # rank 0 only


def test_another_world_size_at_an_epoch_boundary_passes_nothing_over_and_resampled_keeps_its_position(
        syn_index: Path, caplog) -> None:
    cfg, kw = cfg_for(syn_index, num_workers=2), dict(batch_size=4, seed=1)
    old = build_train_stream(cfg, rank=0, world_size=2, **kw)
    take(old, 2 * old.batches_per_epoch)
    with caplog.at_level(logging.WARNING, logger="vitvq.data.stream"):
        new = build_train_stream(cfg, rank=0, world_size=1, state=old.state_dict(), **kw)
    assert new.epoch == 2 and new.batches == 2 * new.batches_per_epoch
    assert "continuing at the start of epoch 2; no sample passed over" in caplog.text
    # Resampled mode has no epochs to finish: the new layout's streams continue at the same nominal position.
    cfg = cfg_for(syn_index, num_workers=2, mode="resampled")
    old = build_train_stream(cfg, rank=0, world_size=2, **kw)
    take(old, 13)
    new = build_train_stream(cfg, rank=0, world_size=1, state=old.state_dict(), **kw)
    assert new.batches == 26 and new.state_dict()["samples_consumed"] == 13 * 4 * 2
    assert same(take(new, 2), take(build_train_stream(cfg, rank=0, world_size=1, **kw), 28)[26:])

def test_pipe_url_reads_the_same_samples(syn_index: Path) -> None:
    shards = json.loads(syn_index.read_text())["shards"]
    pattern = f"{syn_index.parent}/syn-train-{{000000..{len(shards) - 1:06d}}}.tar"
    plain = cfg_for(pattern, num_workers=0)
    piped = cfg_for(f"pipe:cat {pattern}", index=str(syn_index), num_workers=0)
    a = build_train_stream(plain, batch_size=8, rank=0, world_size=1, seed=0)
    b = build_train_stream(piped, batch_size=8, rank=0, world_size=1, seed=0)
    assert same(take(a, a.batches_per_epoch), take(b, b.batches_per_epoch))


def test_bad_samples_are_skipped_counted_and_replaced(tmp_path: Path, syn_index: Path, mk, caplog) -> None:
    out = tmp_path / "shards"
    shutil.copytree(syn_index.parent, out)
    index = json.loads((out / syn_index.name).read_text())
    # Shard 0: one image member replaced by garbage (same key); shard 1: the tar cut off halfway.
    with tarfile.open(out / index["shards"][0]["name"]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(out / index["shards"][0]["name"], "w") as tar:
        for m, data in members:
            data = b"\xff\xd8garbage" if m.name == members[0][0].name else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    cut = out / index["shards"][1]["name"]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    # Batch 1 on one worker: all 83 samples in the epoch, none left out, so the count is exact. The shards no longer
    # match their index's sha256, so verification (test_verify.py) is off: this is what an unverified read survives.
    cfg = cfg_for(out / syn_index.name, num_workers=1, verify_shards=False)  # counts from the index: cut shard short
    s = build_train_stream(cfg, batch_size=1, rank=0, world_size=1, seed=0)
    batches = take(s, s.batches_per_epoch)
    assert len(batches) == 83 and all(b["image"].shape[0] == 1 for b in batches)  # replaced, not dropped
    with pytest.warns(UserWarning, match="damaged"):
        readable = count_tar(str(cut))
    missing = index["shards"][1]["samples"] - readable
    assert s.skipped in (1 + missing, 2 + missing) and missing >= 3  # a half-cut member may count as read
    assert s.state_dict()["skipped"] == s.skipped  # counted in the worker, carried to the training process
    with caplog.at_level(logging.WARNING, logger="vitvq.data.cursor"):  # in-process: the warnings are visible
        s0 = build_train_stream(cfg_for(out / syn_index.name, num_workers=0, verify_shards=False), batch_size=1,
                                rank=0, world_size=1, seed=0)
        assert same(take(s0, s0.batches_per_epoch), batches)
    assert s0.skipped == s.skipped
    assert any("skipping bad sample" in r.message for r in caplog.records)
    assert any("gave" in r.message and "samples expected" in r.message for r in caplog.records)


def test_refusals_say_what_to_change(tmp_path: Path, syn_index: Path, mk) -> None:
    with pytest.raises(ShardError, match="matches no shard file"):
        build_train_stream(cfg_for(tmp_path / "nothing-{000000..000009}.tar"), batch_size=4, rank=0, world_size=1,
                           seed=0)
    with pytest.raises(ShardError, match=r"at least world_size x num_workers = 4 x 4 = 16.*--shard-size"):
        build_train_stream(cfg_for(syn_index, num_workers=4), batch_size=1, rank=0, world_size=4, seed=0)
    with pytest.raises(ShardError, match="set data.index"):
        build_train_stream(cfg_for(f"pipe:cat {syn_index.parent}/syn-train-000000.tar"), batch_size=1, rank=0,
                           world_size=1, seed=0)
    with pytest.raises(ShardError, match="lower the batch size"):
        build_train_stream(cfg_for(syn_index), batch_size=64, rank=0, world_size=1, seed=0)
    # the same shard count is fine in resampled mode
    build_train_stream(cfg_for(syn_index, num_workers=4, mode="resampled"), batch_size=1, rank=0, world_size=4, seed=0)


def test_eval_loader_every_sample_once_center_crop(syn_index: Path) -> None:
    total = json.loads(syn_index.read_text())["num_samples"]
    keys, first = [], None
    for rank in range(2):
        loader = build_eval_loader(str(syn_index), image_size=16, batch_size=6, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        keys += [k for b in batches for k in b["key"]]
        first = first or batches[0]
    assert len(keys) == len(set(keys)) == total
    again = next(iter(build_eval_loader(str(syn_index), image_size=16, batch_size=6, rank=0, world_size=2)))
    assert same([again], [first])  # no randomness in evaluation


def test_a_shard_written_with_a_corrupt_member_is_still_counted_by_index(tmp_path: Path, mk) -> None:
    src = mk.make_folder(tmp_path / "src", 12, classes=2)
    (src / "class0" / "zz_bad.jpg").write_bytes(b"not a jpeg")  # skipped by the writer, listed in the index
    index = write_shards(list_folder(src), tmp_path / "out", WriteOptions(name="x", shard_size=4), progress=False)
    assert index["num_samples"] == 12 and index["num_skipped"] == 1
    s = build_train_stream(cfg_for(tmp_path / "out" / "x-train-index.json", num_workers=0), batch_size=4, rank=0,
                           world_size=1, seed=0)
    assert s.num_classes == 2 and s.skipped == 0 and len(take(s, 3)) == 3
