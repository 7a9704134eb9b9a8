"""Remote shards over a real HTTP server on 127.0.0.1 (issue 20.6): training and validation shards read by URL with
``data.index`` naming both splits' indexes give the samples of the local shards; the stage-1 validation loader is
given the index (it was not, so remote validation shards failed at step 0)."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

from vitvq.data import DataConfig, build_eval_loader, build_train_stream
from vitvq.data.shards import WriteOptions, write_shards
from vitvq.data.sources import list_folder
from vitvq.data.urls import resolve_shards


def two_splits(root: Path, mk) -> tuple[Path, Path]:
    """Train (30 images, 3 shards) and val (12 images, 2 shards) of one dataset, each with its index."""
    out = root / "shards"
    for split, n, seed in (("train", 30, 0), ("val", 12, 1)):
        src = mk.make_folder(root / split, n, seed=seed)
        write_shards(list_folder(src), out, WriteOptions(name="two", split=split, shard_size=10), progress=False)
    return out / "two-train-index.json", out / "two-val-index.json"


def pattern(base: str, split: str, index: Path) -> str:
    n = len(json.loads(index.read_text())["shards"])
    return f"{base}/two-{split}-{{000000..{n - 1:06d}}}.tar"


def keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def test_train_and_val_shards_over_http_with_both_indexes(tmp_path: Path, mk, http_serve) -> None:
    train_index, val_index = two_splits(tmp_path, mk)
    base, both = http_serve(train_index.parent), f"{train_index}::{val_index}"
    cfg = DataConfig(train_shards=pattern(base, "train", train_index), val_shards=pattern(base, "val", val_index),
                     index=both, image_size=16, num_workers=0, shuffle_buffer=5)
    local = DataConfig(train_shards=str(train_index), image_size=16, num_workers=0, shuffle_buffer=5)
    remote, near = (build_train_stream(c, batch_size=5, rank=0, world_size=1, seed=0) for c in (cfg, local))
    assert [b["key"] for b in islice(remote, 6)] == [b["key"] for b in islice(near, 6)]
    val = build_eval_loader(cfg.val_shards, image_size=16, batch_size=4, rank=0, world_size=1, index=cfg.index)
    assert keys(val) == keys(build_eval_loader(str(val_index), image_size=16, batch_size=4, rank=0, world_size=1))
    assert len(keys(val)) == 12


def test_local_val_shards_keep_the_index_beside_them_when_given_the_train_index(tmp_path: Path, mk) -> None:
    train_index, val_index = two_splits(tmp_path, mk)
    listed = resolve_shards(pattern(str(val_index.parent), "val", val_index), str(train_index))
    entries = json.loads(val_index.read_text())["shards"]
    assert listed.counts == tuple(e["samples"] for e in entries)
    assert listed.sha256 == tuple(e["sha256"] for e in entries)  # verified like the training shards


@pytest.mark.e2e  # imports the trainer (DeepSpeed): about 10 s
def test_stage1_validation_reads_remote_val_shards_with_data_index(tmp_path: Path, mk, http_serve) -> None:
    import torch

    from vitvq.trainer.config import load_stage1_config
    from vitvq.trainer.engine import DistInfo
    from vitvq.trainer.stage1 import Stage1Task

    train_index, val_index = two_splits(tmp_path, mk)
    base = http_serve(train_index.parent)
    root = Path(__file__).resolve().parents[2]
    cfg = load_stage1_config(root / "configs/stage1/debug.yaml", [
        "data.source=shards", f"data.train_shards={pattern(base, 'train', train_index)}",
        f"data.val_shards={pattern(base, 'val', val_index)}", f"data.index={train_index}::{val_index}"])
    task = Stage1Task(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    assert task.has_validation
    loader = task._val_loader(4, 0, 1)  # the loader validate() reads: failed with "no sample count" before
    size = cfg.data.image_size
    assert keys(loader) == keys(build_eval_loader(str(val_index), image_size=size, batch_size=4, rank=0, world_size=1))


def test_evaluation_workers_read_remote_shards_with_the_index(tmp_path: Path, mk, http_serve) -> None:
    """The rFID of a training (``trainer/stage1.py``'s background evaluator) reads the validation shards through
    ``evaluation.workers``: with remote shards it needs the index as well, or it fails as validation did."""
    from vitvq.evaluation.data import Source
    from vitvq.evaluation.workers import EvalWorker, Job
    train_index, val_index = two_splits(tmp_path, mk)
    spec, both = pattern(http_serve(val_index.parent), "val", val_index), f"{train_index}::{val_index}"
    worker = EvalWorker(extractor="tiny")
    with pytest.raises(Exception, match="no sample count for remote shard"):
        worker.start(Job(Source(shards=spec, resolution=16), batch_size=4), rank=0, world_size=1)
    assert worker.start(Job(Source(shards=spec, resolution=16, index=both), batch_size=4), rank=0, world_size=1) == 12


def test_shard_errors_never_print_the_credentials_of_a_shard_spec() -> None:
    """Every refusal of a shard spec quotes it (``data.val_shards='...' holds no samples``); the spec may carry a
    password or a signature, and the message reaches logs and tracebacks."""
    from vitvq.data.urls import ShardError
    from vitvq.data.verify import mismatch
    for spec in ("pipe:curl -s -u me:s3cr3t-VAL-17 https://host/x-{000000..000003}.tar",
                 "https://host/x-000000.tar?X-Amz-Signature=s3cr3t-VAL-17&X-Amz-Date=1"):
        assert "s3cr3t-VAL-17" not in str(ShardError(f"data.val_shards={spec!r} holds no samples"))
        assert "s3cr3t-VAL-17" not in str(mismatch(spec, "a" * 64, "b" * 64))
