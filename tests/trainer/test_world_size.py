"""Resizing a run in the middle of an epoch, both ways, with the global batch kept (README, "Changing the world size").

Real DeepSpeed ZeRO-2 engines (the debug recipe's generator and discriminator) on gloo CPU ranks under ``torchrun``,
driven by ``world_size_worker.py``, which records every batch's sample keys and reads the engines' fp32 state with
DeepSpeed's own getters. 18 samples in 4 shards, micro-batch 2, global batch 4: on 2 ranks an epoch is 4 batches
per rank (16 samples, 2 left out), on 1 rank 9 batches (all 18) at accumulation 2. Each direction resumes the step-6
checkpoint of an uninterrupted run (epoch 1, part read) and is compared with the uninterrupted runs of both sizes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vitvq.trainer.checkpoint import latest_file, rank_file, tag_of

pytestmark = pytest.mark.e2e  # 2-rank DeepSpeed runs
WORKER = Path(__file__).with_name("world_size_worker.py")
STEPS, SAVED = 14, 6  # the source checkpoint: step 6, in epoch 1 on either size
# The recipe's codebook care (k-means init, dead-code restarts) on an EMA codebook, whose codes are buffers, not
# parameters; restarts every 4 steps, so that the step-6 checkpoint holds the restart pools of steps 5 and 6.
CODEBOOK = ("model.quantizer.kind=ema", "model.quantizer.init=kmeans", "model.quantizer.restart_dead_codes=true",
            "model.quantizer.restart_every=4")


def same(a, b, where: str = "") -> None:
    """Exact equality of nested dicts / lists of tensors and plain values, naming the first difference."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run(ranks: int, out: Path, record: Path, env: dict, index: Path, *extra: str,
        check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(WORKER),
           "--out", str(out), "--record", str(record), *extra, "data.source=shards", f"data.train_shards={index}",
           "data.mode=epoch", "data.num_workers=0", "data.shuffle_buffer=4", *CODEBOOK,
           f"train.steps={STEPS}", f"train.ckpt_every={SAVED}", "train.keep_last=5", "train.tracking=false",
           "train.progress=false", "train.val_every=0", "train.image_every=100"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 or not check, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def batches(record: Path) -> dict[int, dict[int, tuple[int, int, list[str]]]]:
    """{rank: {stream batch index: (step, epoch, keys)}} of what each rank consumed."""
    return {int(f.stem.removeprefix("keys_rank")): {i: (step, epoch, keys)
                                                    for step, i, epoch, keys in json.loads(f.read_text())}
            for f in sorted(record.glob("keys_rank*.json"))}


def per_epoch(*runs: dict) -> dict[int, Counter]:
    """Sample keys read in each epoch, over all ranks of all ``runs`` (a multiset: repeats would count twice)."""
    out: dict[int, Counter] = {}
    for got in runs:
        for ranks in got.values():
            for _, epoch, keys in ranks.values():
                out.setdefault(epoch, Counter()).update(keys)
    return out


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np
    from PIL import Image

    from vitvq.data.shards import WriteOptions, write_shards
    from vitvq.data.sources import list_folder
    root, rng = tmp_path_factory.mktemp("shards"), np.random.default_rng(0)
    for i in range(18):
        folder = root / "src" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((40, 40), Image.Resampling.BICUBIC).save(folder / f"img{i:02d}.jpg")
    write_shards(list_folder(root / "src"), root / "shards", WriteOptions(name="ws", shard_size=5), progress=False)
    return root / "shards" / "ws-train-index.json"  # shards of 5, 5, 5, 3


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, make_launch_env) -> dict:
    return make_launch_env(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, index: Path, env: dict) -> dict[int, SimpleNamespace]:
    """{world size: the uninterrupted run}, each dumping its engines' state at the step-6 checkpoint."""
    runs = {}
    for ranks in (2, 1):
        root = tmp_path_factory.mktemp(f"straight{ranks}")
        run(ranks, root / "out", root / "record", env, index, "--dump-at", str(SAVED))
        runs[ranks] = SimpleNamespace(out=root / "out", record=root / "record", batches=batches(root / "record"))
    return runs


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_a_resize_mid_epoch_keeps_the_state_and_reads_every_sample_of_the_next_epoch_once(
        old: int, new: int, uninterrupted: dict[int, SimpleNamespace], index: Path, env: dict, tmp_path: Path) -> None:
    source, reference = uninterrupted[old], uninterrupted[new]
    tag = tag_of(SAVED)
    out, record = tmp_path / "out", tmp_path / "record"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source.out / "checkpoints" / tag, out / "checkpoints" / tag)
    latest_file(out / "checkpoints").write_text(tag)
    if (old, new) == (2, 1):  # the policy that stops instead, saying what to run (the same code either way)
        refused = run(new, out, tmp_path / "refused", env, index, "train.on_world_size_change=refuse", check=False)
        assert refused.returncode != 0 and "written by 2 ranks and this run has 1" in refused.stderr
        assert "train.on_world_size_change=convert" in refused.stderr
        assert not (out / "checkpoints" / f"{tag}" / "generator_universal").exists()  # nothing converted
    res = run(new, out, record, env, index)
    log = res.stdout + res.stderr

    # (a) Right after the conversion, before any step: every trained tensor of both engines, its Adam moments and
    # step count, the learning rate and the schedule's position are the source's at the checkpoint. The universal
    # format copies fp32 values (merged, then sliced anew), so equality is exact.
    want = torch.load(source.record / f"engines_step{SAVED}.pt", weights_only=False)
    got = torch.load(record / "engines_resumed.pt", weights_only=False)
    assert want.keys() == got.keys() == {"generator", "discriminator", "task"}
    for name in ("generator", "discriminator"):
        assert got[name]["params"].keys() == want[name]["params"].keys()
        for param, tensors in want[name]["params"].items():
            for what, a, b in zip(("fp32 weight", "exp_avg", "exp_avg_sq"), tensors, got[name]["params"][param]):
                assert torch.equal(a, b), f"{name}.{param}: {what} differs from the source checkpoint's"
        assert got[name]["adam_steps"] == want[name]["adam_steps"] == [float(SAVED)]
        assert got[name]["lr"] == want[name]["lr"]  # the universal load copies it into the optimizer's groups
        assert got[name]["schedule_step"] == want[name]["schedule_step"] == SAVED  # the next steps' lr
        assert got[name]["global_steps"] == want[name]["global_steps"] == SAVED
    # Every buffer (the EMA codes, cluster sizes and sums, the restart window, the k-means flag) and the task state
    # (codebook-health window, LeCam averages) are the source's: DeepSpeed's universal load restores none of them.
    assert "codebook initialised by k-means" not in log
    flags = [v for k, v in want["generator"]["buffers"].items() if k.endswith("codebook.initialized")]
    assert flags and all(bool(f) for f in flags), "the source's codebook was not k-means initialised"
    for name in ("generator", "discriminator"):
        same(want[name]["buffers"], got[name]["buffers"], f"{name} buffers")
    same(want["task"], got["task"], "task state")
    # Restart pools: the old ranks' pools joined in rank order and dealt out row by row, none lost or repeated.
    old_pools = [torch.load(source.record / f"pools_step{SAVED}_rank{r}.pt") for r in range(old)]
    new_pools = [torch.load(record / f"pools_resumed_rank{r}.pt") for r in range(new)]
    assert all(p is not None for pools in old_pools for p in pools)  # the checkpoint holds vectors to share
    for c in range(len(old_pools[0])):
        joined = torch.cat([pools[c] for pools in old_pools])
        for r in range(new):
            assert torch.equal(new_pools[r][c], joined[r::new]), f"codebook {c}: rank {r}'s pool"
    starts = [json.loads((record / f"start_rank{r}.json").read_text()) for r in range(new)]
    assert all(s["accumulation"] == 2 // new for s in starts)  # global batch 4 = micro 2 x ranks x accumulation

    # Every rank starts at the same epoch, the one after the interrupted epoch 1; on 1 -> 2 rank 1 has no rank file.
    assert rank_file(source.out / "checkpoints" / tag, 1).exists() == (old == 2)
    assert {(s["epoch"], s["batches"]) for s in starts} == {(2, 2 * starts[0]["batches_per_epoch"])}
    resized = batches(record)
    assert sorted(resized) == list(range(new))
    assert all(min(e for _, e, _ in ranks.values()) == 2 for ranks in resized.values())

    # (b) The epoch after the resize reads every sample of that epoch (as the new layout defines it: the
    # uninterrupted run of that size) exactly once, in the same order on each rank; so does every batch both read.
    after = per_epoch(resized)[2]
    assert after == per_epoch(reference.batches)[2] and set(after.values()) == {1}
    assert len(after) == (18 if new == 1 else 16)
    for r, ranks in resized.items():
        both = sorted(set(ranks) & set(reference.batches[r]))
        assert len(both) >= 9 // new and all(ranks[i][2] == reference.batches[r][i][2] for i in both)
    # Before the resize (the source run up to its checkpoint) plus after: the epochs both runs completed are those
    # of the uninterrupted runs; the interrupted epoch's unread samples are passed over, none is read twice.
    before = {r: {i: b for i, b in ranks.items() if b[0] <= SAVED} for r, ranks in source.batches.items()}
    whole, full = per_epoch(before, resized), per_epoch(source.batches)
    assert whole[0] == full[0] and whole[2] == per_epoch(reference.batches)[2]
    assert all(set(c.values()) == {1} for c in whole.values())
    read, epoch1 = sum(whole[1].values()), sum(full[1].values())
    assert set(whole[1]) < set(full[1]) and 0 < read < epoch1

    # (c) The run's log states the policy, with the numbers of the interrupted epoch.
    assert f"resumed {tag} written by {old} ranks on {new} at step {SAVED}" in log
    assert (f"world size {old} -> {new} (epoch 1, {100 * read // epoch1}% read): continuing at the start of epoch 2; "
            f"{epoch1 - read} samples of epoch 1 not read") in log
