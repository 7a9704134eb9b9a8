"""trainer/eval_workers.py on a real Ray local cluster: results independent of the number of workers, rFID of a
tokenizer checked by hand, shards and folders giving the same statistics, the asynchronous evaluator.

The session's Ray cluster (``ray_cluster`` in tests/conftest.py: two 1-CPU nodes; actors take 0.25 CPU so that
pools of 1, 2 and 3 fit at once);
the extractor is the tiny random one, NOT comparable to published numbers (no Inception weights here).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitvq.evaluation.data import load_image
from vitvq.evaluation.async_eval import AsyncEvaluator
from vitvq.evaluation.workers import Source, WorkerPool, compute_ref_stats, evaluate_gfid, evaluate_rfid
from vitvq.evaluation.metrics import RefStats

CPUS = 0.25
pytestmark = pytest.mark.e2e  # Ray actors on the session's cluster (ray_cluster, tests/conftest.py)


@pytest.fixture(scope="module")
def pools(ray_cluster):
    out = {0: WorkerPool(0, extractor="tiny")}
    out.update({w: WorkerPool(w, extractor="tiny", cpus_per_worker=CPUS) for w in (1, 2, 3)})
    yield out
    for p in out.values():
        p.close()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.PRESETS["debug"])  # 32 px ViT, freshly initialised
    return str(tok.save_export(tmp_path_factory.mktemp("tok") / "tok.pt", {"step": 123}))


def test_one_two_three_workers_give_the_same_fid_and_is(cifar, pools):
    cats, prot = compute_ref_stats(pools[0], Source(images=cifar("cat"), limit=100), 50, progress=False)
    ref = RefStats(*cats.mean_cov(), prot)
    samples = Source(images=cifar(), limit=101)  # 101: slices of unequal length for 2 and 3 workers
    results = {w: evaluate_gfid(pool, samples, ref, batch_size=16, progress=False) for w, pool in pools.items()}
    base = results[0].metrics
    assert base["eval/fid"] > 0 and base["eval/is"] > 1
    for w, r in results.items():
        assert r.protocol["count"] == 101
        # Sums merge exactly; what differs is float32 round-off of the extractor on differently composed batches.
        assert r.metrics["eval/fid"] == pytest.approx(base["eval/fid"], rel=1e-8), w
        assert r.metrics["eval/is"] == pytest.approx(base["eval/is"], rel=1e-9), w
        assert r.metrics["eval/is_std"] == pytest.approx(base["eval/is_std"], rel=1e-6, abs=1e-12), w


def test_rfid_with_two_workers_matches_in_process_and_hand(cifar, pools, export, tmp_path: Path):
    from vitvq.models.tokenizer import Tokenizer
    src = Source(images=cifar("ship"), limit=40)
    recons = tmp_path / "recons"
    two = evaluate_rfid(pools[2], export, src, batch_size=16, lpips="random", save_recons=str(recons), progress=False)
    one = evaluate_rfid(pools[0], export, src, batch_size=7, lpips="random", progress=False)
    assert two.step == 123 and two.protocol["resolution"] == 32 and "RANDOM" in two.protocol["lpips"]
    for k, v in one.metrics.items():
        assert two.metrics[k] == pytest.approx(v, rel=1e-6), k
    # By hand, straight through the tokenizer: per-image PSNR, codebook usage, the saved PNGs.
    files = sorted(Path(src.images).glob("*.jpg"))[:40]
    x = torch.from_numpy(np.stack([load_image(f, 32) for f in files])).permute(0, 3, 1, 2).float() / 127.5 - 1
    tok = Tokenizer.load_export(export)
    with torch.no_grad():
        dec, q = tok(x)
        rec = tok.to_image(dec)
    a, b = ((x + 1) / 2).double().numpy(), ((rec + 1) / 2).clamp(0, 1).double().numpy()
    psnr = np.mean([10 * np.log10(1 / np.mean((a[i] - b[i]) ** 2)) for i in range(40)])
    assert two.metrics["eval/psnr"] == pytest.approx(psnr, rel=1e-5)
    used = len(np.unique(q.indices.numpy())) / tok.vocab_size
    assert two.metrics["eval/codebook_usage"] == pytest.approx(used)
    saved = sorted(recons.glob("*.png"))
    assert len(saved) == 40
    png = np.asarray(Image.open(recons / "000007.png"))
    expect = ((rec[7] + 1) / 2).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(png.astype(int) - expect.astype(int)).max() <= 1  # rounding of the last float bit at most


def test_shards_and_folder_give_the_same_statistics(cifar, pools, tmp_path: Path):
    from vitvq.data.shards import WriteOptions, write_shards
    from vitvq.data.sources import list_folder
    from vitvq.data.urls import index_path
    listing = list_folder(cifar("frog"))
    listing.items = listing.items[:96]  # the original JPEG bytes go into the shards unchanged (no resize)
    write_shards(listing, tmp_path, WriteOptions(name="frog", split="val", shard_size=32), progress=False)
    index = str(index_path(tmp_path, "frog", "val"))
    folder, pf = compute_ref_stats(pools[0], Source(images=cifar("frog"), limit=96, resolution=32), 32, False)
    shards, ps = compute_ref_stats(pools[2], Source(shards=index, resolution=32), 16, False)
    assert shards.n == folder.n == 96
    np.testing.assert_allclose(shards.sum, folder.sum, rtol=1e-9)
    np.testing.assert_allclose(shards.outer, folder.outer, rtol=1e-9)
    assert pf["crop"] == ps["crop"]  # so a ref from one and an rFID from the other are comparable


def test_async_evaluator_returns_at_once_and_matches_sync(cifar, ray_cluster, pools, export, tmp_path: Path):
    src = Source(images=cifar("truck"), limit=48)
    ev = AsyncEvaluator(src, workers=1, extractor="tiny", lpips="off", batch_size=16, cpus_per_worker=CPUS)
    t0 = time.time()
    ev.submit(export, step=10)
    ev.submit(tmp_path / "missing.pt", step=20)
    ev.submit(export, step=30)
    assert time.time() - t0 < 1.0  # training goes on while the pool starts and evaluates
    got, deadline = [], time.time() + 240
    while len(got) < 3 and time.time() < deadline:
        got += ev.poll()
        time.sleep(0.2)
    ev.close()
    assert [r.step for r in got] == [10, 20, 30]
    assert got[1].error and "not found" in got[1].error and not got[1].metrics
    sync = evaluate_rfid(pools[0], export, src, batch_size=16, lpips="off", progress=False)
    for r in (got[0], got[2]):
        assert r.error is None
        assert set(r.metrics) == set(sync.metrics)
        for k, v in sync.metrics.items():
            assert r.metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        assert r.protocol["reference"].startswith("the evaluated originals")

