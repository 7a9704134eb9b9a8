"""trainer/metrics.py and models/inception.py: every number checked against an independent computation.

The extractor here is the tiny random one (labelled not comparable to published numbers): the real InceptionV3
weights cannot be downloaded on these machines. The statistics code is the same for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from vitvq.evaluation.inception import (WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_SHA256, WEIGHTS_SIZE, InceptionWeightsError,
                              build_extractor, resolve_inception_weights)
from vitvq.evaluation.data import open_npz_array
from vitvq.evaluation.workers import Source, WorkerPool, compute_ref_stats, evaluate_gfid
from vitvq.evaluation.metrics import (FIDStats, ISStats, ReconStats, RefStats, codebook_usage, fid_against, frechet_distance,
                             is_split_ids, load_ref_stats, lpips_per_image, protocol_mismatches, psnr_per_image,
                             save_ref_stats, ssim_per_image)



def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid / ADM's formula: numpy mean/cov and scipy.linalg.sqrtm (independent of our eigen method)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def features(seed: int, n: int = 400, d: int = 12, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix + shift


def accumulate(f: np.ndarray, batch_sizes: list[int]) -> FIDStats:
    stats, i = FIDStats.zeros(f.shape[1]), 0
    for b in batch_sizes:
        stats.update(torch.from_numpy(f[i:i + b]))
        i += b
    return stats


# -- FID ------------------------------------------------------------------------------------------------
def test_fid_from_stats_equals_numpy_scipy_and_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    f1, f2 = features(0), features(1, n=300, shift=0.7)
    s1, s2 = accumulate(f1, [100, 37, 263]), accumulate(f2, [300])
    mu, cov = s1.mean_cov()
    np.testing.assert_allclose(mu, f1.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f1, rowvar=False), rtol=1e-10, atol=1e-10)
    ours = frechet_distance(*s1.mean_cov(), *s2.mean_cov())
    assert ours == pytest.approx(scipy_fid(f1, f2), rel=1e-8)

    class Identity(torch.nn.Module):  # torchmetrics' FID on the same features, through its own states
        num_features = f1.shape[1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    tm = FrechetInceptionDistance(feature=Identity())
    tm.update(torch.from_numpy(f1), real=True)
    tm.update(torch.from_numpy(f2), real=False)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-8)


def test_fid_merge_is_exact_and_self_distance_zero():
    f = features(2, n=500)
    whole = accumulate(f, [500])
    parts = accumulate(f[0::3], [167]) + accumulate(f[1::3], [100, 67]) + accumulate(f[2::3], [166])
    assert parts.n == whole.n
    np.testing.assert_allclose(parts.outer, whole.outer, rtol=1e-12)
    assert frechet_distance(*parts.mean_cov(), *whole.mean_cov()) == pytest.approx(0.0, abs=1e-9)
    # Rank-deficient covariance (fewer samples than dimensions): the zero eigenvalues come out as round-off
    # (~1e-12 here) whose square roots add up, for every method; ours stays at that floor and real-valued.
    small = features(3, n=8, d=20)
    mu, cov = accumulate(small, [8]).mean_cov()
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-7 * np.trace(cov)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(scipy_fid(small, small), abs=1e-6)


def test_fid_of_real_photos_against_themselves_is_zero_and_other_class_is_not(cifar):
    pool = WorkerPool(0, extractor="tiny")
    cats, prot = compute_ref_stats(pool, Source(images=cifar("cat"), limit=200), 100, progress=False)
    assert prot["comparable_to_papers"] is False and "NOT comparable" in prot["implementation"]
    ref = RefStats(*cats.mean_cov(), prot)
    same = evaluate_gfid(pool, Source(images=cifar("cat"), limit=200), ref, 64, progress=False)
    other = evaluate_gfid(pool, Source(images=cifar("airplane"), limit=200), ref, 64, progress=False)
    assert abs(same.metrics["eval/fid"]) < 1e-8
    assert other.metrics["eval/fid"] > 1e3 * max(abs(same.metrics["eval/fid"]), 1e-9)


# -- Inception Score ---------------------------------------------------------------------------------
def is_by_hand(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over splits of a seed-2020 permutation, written out with numpy."""
    n = len(logits)
    x = logits[np.random.RandomState(2020).permutation(n)].astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        py = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_by_hand_any_worker_split():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.from_numpy(np.random.default_rng(4).normal(scale=3, size=(103, 7)))
    ids = is_split_ids(103, 10)
    assert np.bincount(ids).tolist() == [10, 10, 10, 11, 10, 10, 11, 10, 10, 11]  # k*N//10 chunks, as torch-fidelity
    merged = ISStats.zeros(7)
    for w in range(3):  # three "workers" with strided slices, each in two batches
        own = np.arange(w, 103, 3)
        part = ISStats.zeros(7)
        for chunk in (own[:10], own[10:]):
            part.update(logits[chunk], ids[chunk])
        merged = merged + part
    mean, std = merged.score()
    hand = is_by_hand(logits.numpy(), 10)
    assert mean == pytest.approx(hand[0], rel=1e-10) and std == pytest.approx(hand[1], rel=1e-8)
    tf = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(tf["inception_score_mean"], rel=1e-10)


# -- reconstruction metrics --------------------------------------------------------------------------
def test_psnr_ssim_against_independent_implementations():
    from skimage.metrics import structural_similarity
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    a, b = ((x + 1) / 2).double().numpy(), ((y + 1) / 2).double().numpy()
    psnr = [10 * np.log10(1 / np.mean((a[i] - b[i]) ** 2)) for i in range(3)]
    np.testing.assert_allclose(psnr_per_image(y, x).numpy(), psnr, rtol=1e-5)
    ssim = [structural_similarity(b[i], a[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0, channel_axis=0) for i in range(3)]
    np.testing.assert_allclose(ssim_per_image(y, x).numpy(), ssim, atol=2e-6)
    assert float(ssim_per_image(x, x).min()) == pytest.approx(1.0, abs=1e-5)


def test_lpips_agrees_with_torchmetrics():
    from torchmetrics.functional.image.lpips import _LPIPS
    from vitvq.models.perceptual import PerceptualLoss
    with pytest.warns(UserWarning, match="RANDOM backbone"):
        ours = PerceptualLoss("vgg", pretrained_backbone=False)  # no VGG16 download here: same random trunk in both
    tm = _LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()
    state = {k.removeprefix("model."): v for k, v in ours.state_dict().items()}
    tm.load_state_dict({k: state[k] for k in tm.state_dict()}, strict=True)  # trunk copied; heads must be equal
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    np.testing.assert_allclose(lpips_per_image(ours, x, y).numpy(), tm(x, y).flatten().detach().numpy(), rtol=1e-5)


def test_codebook_usage_and_perplexity_by_hand():
    idx = torch.tensor([[[0, 0], [1, 3]], [[3, 3], [3, 0]]])  # (B=2, h=2, w=2) over a codebook of 8
    stats = ReconStats()
    x = torch.zeros(2, 3, 16, 16)
    stats.update(x, x, idx[:1], 8)
    stats.update(x, x, idx[1:], 8)
    p = np.array([3, 1, 0, 4, 0, 0, 0, 0]) / 8
    out = stats.summary()
    assert out["codebook_usage"] == pytest.approx(3 / 8)
    assert out["perplexity"] == pytest.approx(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    residual = codebook_usage(np.array([[1, 1, 0, 0], [1, 0, 0, 0]]))  # two depths: usage 1/2 and 1/4
    assert residual["codebook_usage"] == pytest.approx(0.375)
    assert residual["perplexity"] == pytest.approx(1.5)


# -- reference statistics ------------------------------------------------------------------------------
def test_ref_stats_roundtrip_and_adm_npz(tmp_path: Path):
    f1, f2 = features(5, n=200), features(6, n=150, shift=0.3)
    s1, s2 = accumulate(f1, [200]), accumulate(f2, [150])
    protocol = {"implementation": "tiny", "count": 200, "resolution": 32}
    path = save_ref_stats(tmp_path / "ref.npz", s1, protocol)
    ref = load_ref_stats(path)
    assert ref.protocol == protocol
    assert fid_against(s2, ref) == pytest.approx(frechet_distance(*s2.mean_cov(), *s1.mean_cov()), rel=1e-12)
    # ADM's reference batches hold mu and sigma (and activations), no protocol: read as they are.
    mu, sigma = s1.mean_cov()
    np.savez(tmp_path / "adm.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32), arr_0=f1)
    adm = load_ref_stats(tmp_path / "adm.npz")
    assert "protocol not recorded" in adm.protocol["source"]
    assert fid_against(s2, adm) == pytest.approx(fid_against(s2, ref), rel=1e-5)
    assert protocol_mismatches({"resolution": 256}, {"resolution": 32}) == ["resolution: reference 256 vs ours 32"]
    with pytest.raises(ValueError, match="mu"):
        np.savez(tmp_path / "bad.npz", arr_0=f1)
        load_ref_stats(tmp_path / "bad.npz")


def test_npz_images_memory_mapped_when_stored(tmp_path: Path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=arr)
    np.savez_compressed(tmp_path / "c.npz", arr_0=arr)
    stored, compressed = open_npz_array(tmp_path / "s.npz"), open_npz_array(tmp_path / "c.npz")
    assert isinstance(stored, np.memmap) and np.array_equal(stored, arr)
    assert np.array_equal(compressed, arr)


# -- Inception weights ---------------------------------------------------------------------------------
def test_missing_weights_error_says_what_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError) as e:
        resolve_inception_weights()
    msg = str(e.value)
    for needed in (WEIGHTS_FILE, WEIGHTS_SHA256, "95,628,359", "--inception-weights", WEIGHTS_ENV,
                   str(tmp_path / "torch" / "hub" / "checkpoints")):
        assert needed in msg
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(InceptionWeightsError, match="nowhere.pth does not exist"):
        resolve_inception_weights()


def test_wrong_weights_file_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    small = tmp_path / "small.pth"
    small.write_bytes(b"not inception")
    with pytest.raises(InceptionWeightsError, match="13 bytes, expected 95,628,359"):
        resolve_inception_weights(small)
    same_size = tmp_path / "zeros.pth"  # right size, wrong bytes: only the sha256 tells
    with open(same_size, "wb") as f:
        f.truncate(WEIGHTS_SIZE)
    with pytest.raises(InceptionWeightsError, match=f"expected {WEIGHTS_SHA256}"):
        resolve_inception_weights(same_size)
    # A wrong file in the hub cache is an error too, never skipped for a "default" download.
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / WEIGHTS_FILE).write_bytes(b"x")
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError, match=str(hub / WEIGHTS_FILE)):
        build_extractor("inception")


def test_inception_wrapper_shapes_and_labels():
    """torch-fidelity's real network (random weights here): pool3 2048-d and 1008 logits from uint8 images."""
    ext = build_extractor("inception-random")
    feats, logits = ext(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert ext.protocol["comparable_to_papers"] is False and "RANDOM weights" in ext.protocol["implementation"]
    assert "antialias off" in ext.protocol["inception_resize"]
    json.dumps(ext.protocol)
