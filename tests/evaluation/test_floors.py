"""benchmarks/tokenizer_floors.py: the no-network floors are exact where they must be (issue 23).

The benchmark is a script, not a package module: it is loaded from its file. No shared data is needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vitvq.evaluation.metrics import psnr_per_image

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "tokenizer_floors.py"
spec = importlib.util.spec_from_file_location("tokenizer_floors", PATH)
floors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floors)


def images_from_codes(values: torch.Tensor, codes: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, g p, g p) images whose p x p patches are ``values[codes]``, codes (B, g, g)."""
    b, g, _ = codes.shape
    return floors.from_patches(values[codes.reshape(b, g * g)], g * p, p)


@pytest.mark.parametrize("p", [2, 4])
def test_kmeans_recovers_k_distinct_patches_exactly(p: int) -> None:
    gen = torch.Generator().manual_seed(1)
    k = 16
    values = torch.rand(k, 3 * p * p, generator=gen) * 2 - 1  # K distinct patches in [-1, 1]
    held_codes = torch.randint(k, (6, 4, 4), generator=gen)
    train = images_from_codes(values, torch.randint(k, (20, 4, 4), generator=gen), p)
    held = images_from_codes(values, held_codes, p)
    pts = floors.to_patches(train, p)
    centres, iters = floors.fit_kmeans(pts.reshape(-1, pts.shape[-1]), k, iters=20, seed=0)
    rec, hist = floors.kmeans_reconstruct(held, centres, p)
    assert iters <= 1  # k-means++ picks each distinct patch once: the first update changes no assignment
    # Each centre is the mean of identical patches: exact up to the rounding of sum / count.
    assert torch.allclose(rec, held, atol=1e-6, rtol=0)
    assert psnr_per_image(rec, held).min().item() > 100
    assert floors.code_stats(hist)["usage"].item() == len(held_codes.unique()) / k

def test_block_means_exact_on_constant_blocks_and_patches_round_trip() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1
    assert torch.equal(floors.from_patches(floors.to_patches(x, 4), 8, 4), x)
    blocks = torch.nn.functional.interpolate(x[..., ::4, ::4], scale_factor=4, mode="nearest")
    assert torch.allclose(floors.block_means(blocks, 4), blocks, atol=1e-6)
    assert torch.allclose(floors.block_means(x, 4)[..., :4, :4].mean(), x[..., :4, :4].mean(), atol=1e-6)


def test_kmeans_fewer_distinct_points_than_centres() -> None:
    pts = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).repeat(8, 1)  # 2 distinct points, 4 centres
    centres, _ = floors.fit_kmeans(pts, 4, iters=5, seed=0)
    idx, dist = floors.nearest(pts, centres)
    assert dist.max().item() == 0
    assert len(idx.unique()) == 2


def test_export_layout_checked_and_reconstructed() -> None:
    from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
    tok = Tokenizer(TokenizerConfig.PRESETS["debug"]).eval()  # 32 px, 8 px patches, 64 codes: 96 bits per image
    with pytest.raises(SystemExit, match=r"rerun with --size 32 --patch 8 --codes 64"):
        floors.check_export(tok, "tok.pt", 64, 8, 512)
    with pytest.raises(SystemExit, match=r"4x4 tokens x log2\(64\) = 96 bits.*at 32 px \(--patch 4 --codes 64"):
        floors.check_export(tok, "tok.pt", 32, 4, 64)
    floors.check_export(tok, "tok.pt", 32, 8, 64)  # the same layout passes
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    rec, hist = floors.tokenizer_reconstruct(tok, x, batch=2)
    assert rec.shape == x.shape and hist.shape == (1, 64) and hist.sum() == 3 * 4 * 4
