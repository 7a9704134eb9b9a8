"""The floors a learned image tokenizer must clear, measured on held-out photographs (issue 23).

    python benchmarks/tokenizer_floors.py [--data imagenet|cifar10] [--patch 8] [--codes 512]
                                          [--export runs/demo/tokenizer.pt ...] [--grid floors.png]

A tokenizer spends ``tokens x log2(codes)`` bits on an image. Two baselines with no network at all:
- k-means: ``--codes`` K centres fitted (Lloyd, k-means++ init, seed ``--seed``) to the raw ``--patch`` px
  patches of the training crops, flattened RGB in [-1, 1]; each held-out patch becomes its nearest centre. At
  exactly the tokenizer's bits per image (``(size / patch)^2 x log2 K``), it is the floor: a trained encoder and
  decoder that do not beat it have learned nothing a per-patch lookup table does not give.
- block means: each patch replaced by its mean colour, unquantized (3 floats per patch: not a bit budget, a
  reference for how much of the PSNR is just the low frequencies).
Each ``--export`` (``tokenizer.pt`` from training or ``launch/export_tokenizer.py``) is run encode -> quantize ->
decode on the same crops and shown with its margin over the k-means floor. An export whose image size or bits
per image differ from the layout is refused, naming both and the flags that match it: a floor at other bits says
nothing about it.

Data (``--src`` defaults to ``../shared/data/<folder>``; a missing folder is an error naming it):
- ``imagenet``: ``imagenet-sample`` (one photograph per class; class index = sorted synset position). Held out:
  the 200 classes whose index % 5 == 0; the other 800 photographs are the k-means training crops.
- ``cifar10``: ``cifar10-test`` (32x32, 1000 per class; files sorted per class). Training crops: the first 200 of
  each class (2000); held out: the next 50 of each class (500). At the default ``--size 64`` they are upsampled
  by the same bicubic resize the data pipeline applies (``--size 32`` measures the native pixels; then
  ``--patch 4`` is the 8x8-token layout).
Every crop is the centred largest square resized to ``--size`` by ``vitvq.data.transforms.load_crop``, the
function training and evaluation use. Metrics, on the held-out crops: PSNR per image on [0, 1] pixels, then the
mean over images (``evaluation.metrics.psnr_per_image``, what evaluation reports); SSIM likewise
(``ssim_per_image``: torchmetrics' SSIM, data range 1, valid region); usage and perplexity of the codes on the
held-out patches (``models.codebook.code_stats``, the one definition). The table goes to stdout, k-means progress
to stderr. ``--grid`` writes 8 held-out crops (evenly through the split, so across classes) enlarged 3x without
smoothing: originals, k-means, block means, then each export, one row each.

Measured (512 centres, seed 0, 100 Lloyd iterations, 2 threads on a shared 2-core CPU), PSNR / SSIM:
ImageNet 8 px k-means 20.33 dB / 0.511, block means 18.57 / 0.356 (2 min); 4 px 23.38 / 0.708, 21.28 / 0.579
(2.5 min; the demo recipe after 150 of its 600 steps: 19.44, 3.9 dB under the floor). CIFAR-10 at 64 px: 8 px
23.30 / 0.652, 20.55 / 0.450 (2 min); 4 px 27.34 / 0.820, 24.60 / 0.717 (3.5 min).
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from vitvq.data.sources import SourceError, list_folder
from vitvq.data.transforms import load_crop, square_box, to_float
from vitvq.evaluation.metrics import psnr_per_image, ssim_per_image
from vitvq.evaluation.pictures import image_grid
from vitvq.models.codebook import code_histogram, code_stats
from vitvq.models.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"imagenet": "imagenet-sample", "cifar10": "cifar10-test"}
CIFAR_TRAIN, CIFAR_HELD_OUT = 200, 50  # per class, in sorted file order
GRID_IMAGES = 8


# -- data ---------------------------------------------------------------------------------------------------------
def split_paths(data: str, src: Path) -> tuple[list[Path], list[Path]]:
    """(training, held-out) image paths of the documented split of ``src``."""
    if not src.is_dir():
        raise SystemExit(f"data folder {src} not found: pass --src with the {FOLDERS[data]} folder "
                         f"(../shared/data/{FOLDERS[data]} next to the repository)")
    try:
        listing = list_folder(src)
    except SourceError as err:
        raise SystemExit(str(err)) from None
    train, held = [], []
    if data == "imagenet":
        for item in listing.items:
            (held if item.label % 5 == 0 else train).append(src / item.path)
    else:
        seen: dict[int, int] = {}
        for item in listing.items:  # sorted per class by list_folder
            rank = seen[item.label] = seen.get(item.label, -1) + 1
            if rank < CIFAR_TRAIN:
                train.append(src / item.path)
            elif rank < CIFAR_TRAIN + CIFAR_HELD_OUT:
                held.append(src / item.path)
    return train, held


def load_crops(paths: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) float in [-1, 1]: the centred largest square of each image, resized as training does."""
    crops = [load_crop(p.read_bytes(), size, partial(square_box, rng=None)) for p in paths]  # as data.stream
    return to_float(torch.stack(crops), "minus_one_one")


# -- patches, k-means, block means ----------------------------------------------------------------------------------
def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, (H/p)(W/p), 3 p p) non-overlapping patches, row-major over the grid."""
    return F.unfold(x, p, stride=p).transpose(1, 2)


def from_patches(patches: torch.Tensor, size: int, p: int) -> torch.Tensor:
    """Inverse of :func:`to_patches`: (B, (size/p)^2, 3 p p) -> (B, 3, size, size)."""
    return F.fold(patches.transpose(1, 2), size, p, stride=p)


def nearest(points: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) index of each point's nearest centre and (N,) squared distance to it; fp32, in chunks of ``chunk``
    points so that the (chunk, K) distance block bounds the memory."""
    c = centres.float()
    c2 = c.square().sum(1)  # (K,)
    idx, dist = [], []
    for x in points.float().split(chunk):
        m, i = torch.addmm(c2, x, c.T, alpha=-2).min(1)  # (chunk, K) squared distances less |x|^2: same argmin
        idx.append(i)
        dist.append((m + x.square().sum(1)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans_plus_plus(points: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """(k, D) initial centres drawn from ``points`` with probability proportional to the squared distance to the
    nearest centre so far (Arthur & Vassilvitskii 2007). Once every point is a centre, the rest repeat points."""
    n, x2 = len(points), points.square().sum(1)  # (N,)

    def dist_to(i: int) -> torch.Tensor:  # (N,) squared distances to point i, as a matrix-vector product
        return torch.addmv(x2 + x2[i], points, points[i], alpha=-2).clamp_min(0)

    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = dist_to(chosen[0])
    for _ in range(k - 1):
        cum = d2.double().cumsum(0)  # (N,); inverse-CDF sampling (torch.multinomial is slower here)
        if cum[-1] > 0:
            u = torch.rand(1, generator=gen, dtype=torch.float64) * cum[-1]
            i = min(int(torch.searchsorted(cum, u, right=True)), n - 1)  # never a point at distance 0
        else:  # fewer distinct points than k: the extra centres stay empty
            i = int(torch.randint(n, (1,), generator=gen))
        chosen.append(i)
        d2 = torch.minimum(d2, dist_to(i))
    return points[chosen].clone()


def fit_kmeans(points: torch.Tensor, k: int, iters: int, seed: int,
               log: Optional[Callable[[str], None]] = None) -> tuple[torch.Tensor, int]:
    """(k, D) Lloyd centres of (N, D) ``points`` and the iterations run: k-means++ init, at most ``iters``
    assignment/update rounds, stopping when no assignment changes. An empty cluster keeps its centre."""
    if len(points) < k:
        raise SystemExit(f"{len(points)} training patches for {k} centres: lower --codes or use more data")
    points = points.float()
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    centres = kmeans_plus_plus(points, k, gen)
    if log:
        log(f"k-means++ init: {k} centres from {len(points)} patches of {points.shape[1]} values, "
            f"{time.time() - t0:.1f} s")
    prev, t0, last = None, time.time(), 0.0
    for it in range(1, iters + 1):
        assign, d2 = nearest(points, centres)
        changed = len(points) if prev is None else int((assign != prev).sum())
        if changed == 0:
            if log:
                log(f"k-means converged after {it - 1} iterations (no assignment changed), {time.time() - t0:.1f} s")
            return centres, it - 1
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).float()[:, None]  # (k, 1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        prev = assign
        now = time.time()
        if log and (now - last >= 5 or it in (1, iters)):
            rate = it / (now - t0)
            log(f"k-means {it}/{iters}: {changed / len(points):.2%} assignments changed, patch MSE "
                f"{d2.mean() / points.shape[1]:.5f}, {rate:.2f} it/s, at most {(iters - it) / rate:.0f} s left")
            last = now
    if log:
        log(f"k-means stopped at the --iters cap ({iters}), {time.time() - t0:.1f} s")
    return centres, iters


def kmeans_reconstruct(x: torch.Tensor, centres: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with each p x p patch replaced by its nearest centre, and the (K,) histogram of the centres used."""
    patches = to_patches(x, p)  # (B, n, 3 p p)
    idx, _ = nearest(patches.reshape(-1, patches.shape[-1]), centres)
    rec = from_patches(centres[idx].reshape(patches.shape), x.shape[-1], p)
    return rec, torch.bincount(idx, minlength=len(centres))


def block_means(x: torch.Tensor, p: int) -> torch.Tensor:
    """Each p x p patch of ``x`` replaced by its mean colour (flat blocks, unquantized)."""
    return F.interpolate(F.avg_pool2d(x, p), scale_factor=p, mode="nearest")


# -- exports -------------------------------------------------------------------------------------------------------
def export_bits(tok: Tokenizer) -> float:
    """Bits per image of a tokenizer at its own size: grid^2 x codes per position x log2(vocabulary)."""
    f = tok.token_facts()
    return f.grid ** 2 * f.codes_per_position * math.log2(f.vocab_size)


def check_export(tok: Tokenizer, path: str, size: int, patch: int, codes: int) -> None:
    """Refuse an export the layout's floor does not describe: another image size or other bits per image."""
    f = tok.token_facts()
    layout = f"{size // patch}x{size // patch} tokens x log2({codes}) = {(size // patch) ** 2 * math.log2(codes):g} " \
             f"bits per image at {size} px (--patch {patch} --codes {codes} --size {size})"
    levels = f" x {f.codes_per_position} levels" if f.codes_per_position > 1 else ""
    own = f"{f.grid}x{f.grid} tokens{levels} x log2({f.vocab_size}) = {export_bits(tok):g} bits per image at " \
          f"{f.image_size} px"
    flags = f"--size {f.image_size} --patch {f.image_size // f.grid} --codes {f.vocab_size}"
    if f.codes_per_position > 1:  # a residual quantizer: one k-means code per patch cannot match it level by level
        flags = f"--size {f.image_size} and a --patch and --codes with {export_bits(tok):g} bits per image"
    if f.image_size != size or export_bits(tok) != (size // patch) ** 2 * math.log2(codes):
        raise SystemExit(f"{path} spends {own}; this floor is {layout}: rerun with {flags}")

def load_exports(paths: list[str], size: int, patch: int, codes: int) -> list[tuple[str, Tokenizer]]:
    """The ``--export`` tokenizers, each checked against the layout; a clear exit for a file that is not one."""
    exports = []
    for path in paths:
        try:
            exports.append((path, Tokenizer.load_export(path)))
        except (FileNotFoundError, ValueError, RuntimeError) as err:  # missing, another format, other weights
            raise SystemExit(f"--export {path}: {str(err).splitlines()[0]}") from None
        except pickle.UnpicklingError:
            raise SystemExit(f"--export {path} is not a torch file: give a tokenizer export (a run's tokenizer.pt "
                             "or launch/export_tokenizer.py's output)") from None
        check_export(exports[-1][1], path, size, patch, codes)
    return exports


@torch.no_grad()
def tokenizer_reconstruct(tok: Tokenizer, x: torch.Tensor, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions of ``x`` (encode -> quantize -> decode) and the (levels, K) histogram of the codes used."""
    recs, hist = [], torch.zeros(tok.codes_per_position, tok.vocab_size, dtype=torch.long)
    for b in x.split(batch):
        q = tok.encode(b)
        recs.append(tok.to_image(tok.decode(q.quantized)).float())
        hist += code_histogram(q.indices, tok.vocab_size)
    return torch.cat(recs), hist


# -- report --------------------------------------------------------------------------------------------------------
def scores(rec: torch.Tensor, x: torch.Tensor, hist: Optional[torch.Tensor]) -> dict[str, float]:
    """Mean PSNR and SSIM over images (the project's definitions) and, for coded rows, usage and perplexity.
    Per image, so computed 100 images at a time: SSIM's intermediates on 500 crops at once took 2 GB."""
    pairs = list(zip(rec.split(100), x.split(100)))
    out = {"psnr": torch.cat([psnr_per_image(r, y) for r, y in pairs]).mean().item(),
           "ssim": torch.cat([ssim_per_image(r, y) for r, y in pairs]).mean().item()}
    if hist is not None:
        stats = code_stats(hist)
        out.update(usage=stats["usage"].item(), perplexity=stats["perplexity"].item())
    return out


def print_row(name: str, bits: str, s: dict[str, float], floor: Optional[float], secs: float) -> None:
    usage = f"{s['usage']:.1%}" if "usage" in s else "-"
    ppl = f"{s['perplexity']:.0f}" if "perplexity" in s else "-"
    margin = "(floor)" if floor is None else f"{s['psnr'] - floor:+.2f}"
    print(f"{name:<44}{bits:>11}{s['psnr']:>8.2f}{s['ssim']:>8.4f}{usage:>8}{ppl:>7}{margin:>9}{secs:>9.1f}",
          flush=True)


def write_grid(out: str, rows: list[torch.Tensor], names: list[str]) -> None:
    """One PNG, one row of ``GRID_IMAGES`` crops per method, enlarged 3x without smoothing so patches show."""
    big = F.interpolate(torch.cat(rows), scale_factor=3, mode="nearest")  # (rows x 8, 3, 3 size, 3 size)
    Image.fromarray(image_grid(big, GRID_IMAGES, pad=4, pad_value=255)).save(out)
    print(f"grid: {out} (rows: {', '.join(names)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=sorted(FOLDERS), default="imagenet", help="which split (see above)")
    ap.add_argument("--src", default=None, help="the data folder (default ../shared/data/imagenet-sample or "
                                                "../shared/data/cifar10-test, beside the repository)")
    ap.add_argument("--size", type=int, default=64, help="crop side in px (default 64)")
    ap.add_argument("--patch", type=int, default=8, help="patch side in px: 8 -> 8x8 tokens at 64 px, 4 -> 16x16")
    ap.add_argument("--codes", type=int, default=512, help="k-means centres K; bits per patch = log2(K)")
    ap.add_argument("--iters", type=int, default=100, help="cap on Lloyd iterations (stops earlier when no "
                                                           "assignment changes)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the k-means++ init")
    ap.add_argument("--export", action="append", default=[], metavar="PATH",
                    help="tokenizer export (tokenizer.pt) to put beside the floors; repeatable")
    ap.add_argument("--grid", default=None, metavar="OUT.png", help="PNG: 8 held-out crops, then one row "
                                                                    "per method (originals, k-means, block means, "
                                                                    "exports)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size, p, k = args.size, args.patch, args.codes
    if size % p:
        raise SystemExit(f"--patch {p} does not divide --size {size}: choose a patch side that tiles the crop")
    if k < 2:
        raise SystemExit(f"--codes {k}: a quantizer needs at least 2 codes")
    exports = load_exports(args.export, size, p, k)  # refused before the long part

    t0 = time.time()
    src = Path(args.src) if args.src else ROOT.parent / "shared" / "data" / FOLDERS[args.data]
    train_paths, held_paths = split_paths(args.data, src)
    train, held = load_crops(train_paths, size), load_crops(held_paths, size)
    load_s = time.time() - t0
    g, bits = size // p, (size // p) ** 2 * math.log2(k)
    print(f"{args.data}: {len(train)} training / {len(held)} held-out crops at {size} px ({src}), loaded in "
          f"{load_s:.1f} s; layout {g}x{g} tokens of {p} px x log2({k}) = {bits:g} bits per image", flush=True)

    t0 = time.time()
    pts = to_patches(train, p)
    centres, iters = fit_kmeans(pts.reshape(-1, pts.shape[-1]), k, args.iters, args.seed,
                                log=lambda s: print(s, file=sys.stderr, flush=True))
    fit_s = time.time() - t0
    print(f"k-means fitted on {pts.shape[0] * pts.shape[1]} training patches in {fit_s:.1f} s ({iters} Lloyd "
          f"iterations)", flush=True)
    print(f"{'method (held-out crops)':<44}{'bits/image':>11}{'PSNR':>8}{'SSIM':>8}{'usage':>8}{'ppl':>7}"
          f"{'margin':>9}{'seconds':>9}")
    t0 = time.time()
    km_rec, km_hist = kmeans_reconstruct(held, centres, p)
    km = scores(km_rec, held, km_hist)
    print_row(f"k-means {k} centres per {p} px patch", f"{bits:g}", km, None, time.time() - t0 + fit_s)
    t0 = time.time()
    bm_rec = block_means(held, p)
    print_row(f"block means {p} px (unquantized)", "3 floats/p", scores(bm_rec, held, None), km["psnr"],
              time.time() - t0)
    show = torch.linspace(0, len(held) - 1, GRID_IMAGES).long()  # evenly through the split: across the classes
    rows = [held[show], km_rec[show], bm_rec[show]]
    for path, tok in exports:
        t0 = time.time()
        rec, hist = tokenizer_reconstruct(tok, held)
        print_row(f"{Path(path).parent.name}/{Path(path).name} ({size // tok.token_grid()} px tokens)",
                  f"{export_bits(tok):g}", scores(rec, held, hist), km["psnr"], time.time() - t0)
        rows.append(rec[show].clamp(-1, 1))
    print("PSNR, SSIM: per image on [0, 1], mean over images; usage: codes used on the held-out crops / K; "
          "margin: PSNR over the k-means floor (dB); seconds: k-means includes its fit")
    if args.grid:
        write_grid(args.grid, rows, ["originals", "k-means", "block means"] + [path for path, _ in exports])


if __name__ == "__main__":
    main()
