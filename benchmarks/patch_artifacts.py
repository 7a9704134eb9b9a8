"""How blocky are a tokenizer's reconstructions? Patch-grid figures on the demo's validation crops.

    python benchmarks/patch_artifacts.py runs/demo/tokenizer.pt [more exports ...] [--patch 8] [--grid out.png]

For each tokenizer export (and, first, for three references computed from the photographs themselves) prints,
on the built-in demo photographs' 512 validation crops (64 px, ``~/.cache/vitvq/demo``, written on first use):
- PSNR on [0, 1] pixels;
- detail: the reconstruction's mean within-patch variance over the original's, square-rooted (flat blocks 0,
  the photographs 1), in ``--patch`` px patches;
- border ratio: mean |difference| of neighbouring pixels across the borders of the export's own token patches
  over the same inside them, both directions (the photographs ~1, flat blocks unbounded).
The references: flat blocks of each ``--patch`` patch's mean colour, the bilinear upsampling of those means (what
smoothing alone gives), and the best per-patch code of ``--codes`` (512): k-means (Lloyd, 15 iterations) on the
raw patches of 4096 training crops, decoded without context. That last one bounds what a tokenizer with that
many codes per patch reaches when each patch is decoded from its own token alone. ``--grid`` writes the first 8
crops above each export's reconstructions, enlarged 3x without smoothing so the patch grid shows. No library
computes these patch-grid figures; they are a few lines of tensor code.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from PIL import Image

from vitvq.data.builtin import ensure_demo_shards
from vitvq.data.stream import build_eval_loader
from vitvq.evaluation.pictures import image_grid
from vitvq.models.losses import psnr
from vitvq.models.tokenizer import Tokenizer


def load_split(root: str, split: str, limit: int) -> torch.Tensor:
    index = ensure_demo_shards(root, 64, split)
    loader = build_eval_loader(str(index), image_size=64, batch_size=256, rank=0, world_size=1, index=str(index),
                               pixel_range="zero_one")
    return torch.cat([b["image"] for b in loader])[:limit]  # (N, 3, 64, 64) in [0, 1]


def detail(rec: torch.Tensor, x: torch.Tensor, p: int) -> float:
    def within(t: torch.Tensor) -> torch.Tensor:
        return t.unfold(2, p, p).unfold(3, p, p).var(dim=(-1, -2)).mean()  # (B, C, h, w, p, p) -> scalar
    return math.sqrt(within(rec) / within(x))


def border_ratio(t: torch.Tensor, p: int) -> float:
    dx = (t[..., :, 1:] - t[..., :, :-1]).abs()  # (B, C, H, W-1): column j is the step from pixel j to j+1
    dy = (t[..., 1:, :] - t[..., :-1, :]).abs()
    border = torch.arange(dx.shape[-1]) % p == p - 1  # steps from the last pixel of a patch to the next patch
    across = dx[..., border].mean() + dy[..., border, :].mean()
    inside = dx[..., ~border].mean() + dy[..., ~border, :].mean()
    return (across / inside.clamp_min(1e-12)).item()


def patch_kmeans(train: torch.Tensor, val: torch.Tensor, p: int, k: int, iters: int = 15) -> torch.Tensor:
    """``val`` with each p x p patch replaced by its nearest of k centres fitted to ``train``'s patches."""
    gen = torch.Generator().manual_seed(0)
    pts = F.unfold(train, p, stride=p).transpose(1, 2).reshape(-1, 3 * p * p)  # (B * h * w, 3 p p)
    centres = pts[torch.randperm(len(pts), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(pts, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, pts)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    vp = F.unfold(val, p, stride=p).transpose(1, 2)  # (B, h * w, 3 p p)
    coded = centres[torch.cdist(vp.reshape(-1, vp.shape[-1]), centres).argmin(1)].reshape(vp.shape)
    return F.fold(coded.transpose(1, 2), val.shape[-1], p, stride=p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="*", help="tokenizer exports (a run's tokenizer.pt, launch/export_tokenizer.py)")
    ap.add_argument("--patch", type=int, default=8, help="patch side of the references and of the detail figure")
    ap.add_argument("--codes", type=int, default=512, help="centres of the per-patch k-means reference")
    ap.add_argument("--data", default="~/.cache/vitvq/demo", help="where the demo shards live (written if missing)")
    ap.add_argument("--grid", default=None, help="PNG of the first 8 crops above each export's reconstructions")
    args = ap.parse_args()
    p = args.patch
    val = load_split(args.data, "val", 512)
    print(f"{len(val)} validation crops, 64 px; detail in {p} px patches")
    print(f"{'reconstruction':<46}{'PSNR':>7}{'detail':>8}{'border':>8}")

    def row(name: str, rec: torch.Tensor, grid: int) -> None:
        db, ratio = psnr(rec, val).mean().item(), border_ratio(rec, grid)
        db_s = "exact" if db >= 99 else f"{db:.2f}"  # the 1e-10 MSE floor: the photographs themselves
        ratio_s = f"{ratio:.2f}" if ratio < 1e3 else ">1000"  # flat blocks: nothing inside to divide by
        print(f"{name:<46}{db_s:>7}{detail(rec, val, p):>8.3f}{ratio_s:>8}", flush=True)

    means = F.avg_pool2d(val, p)
    row(f"photographs (borders every {p} px)", val, p)
    row(f"flat {p} px patch means", F.interpolate(means, scale_factor=p, mode="nearest"), p)
    row(f"bilinear {p} px patch means", F.interpolate(means, scale_factor=p, mode="bilinear", align_corners=False), p)
    row(f"{args.codes}-centre k-means per {p} px patch", patch_kmeans(load_split(args.data, "train", 4096), val, p,
                                                                    args.codes), p)
    rows = [val[:8]]
    for path in args.exports:
        tok = Tokenizer.load_export(path)
        if tok.cfg.image_size != 64:
            raise SystemExit(f"{path} is a {tok.cfg.image_size} px tokenizer; the demo crops are 64 px")
        with torch.no_grad():
            patch = 64 // tok.token_grid()  # pixels per token along a side
            rec = torch.cat([(tok.reconstruct(b * 2 - 1) + 1) / 2 for b in val.split(64)]).clamp(0, 1)
        row(f"{path} ({patch} px tokens)", rec, patch)
        rows.append(rec[:8])
    if args.grid:
        big = F.interpolate(torch.cat(rows), scale_factor=3, mode="nearest")  # (8 (1 + exports), 3, 192, 192)
        Image.fromarray(image_grid(big * 2 - 1, 8, pad=4, pad_value=255)).save(args.grid)  # white between
        print(f"grid: {args.grid} (originals, then one row per export)")


if __name__ == "__main__":
    main()
