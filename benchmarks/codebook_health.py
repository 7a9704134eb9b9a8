"""Codebook health on real photographs: usage, perplexity and validation PSNR after a fixed number of steps.

    python benchmarks/codebook_health.py [--src ../shared/data/imagenet-sample] [--steps 200] [--only paper]
                                         [--backbone paper|demo]

Trains a demo-size ViT-VQGAN (``configs/stage1/demo.yaml`` at 64 px, batch 16) through the real launcher. The
default backbone keeps the paper's layout at demo size, 8 px patches, 4+4 blocks of width 128 and the per-patch
linear output: the quantizers are what this compares, and the paper's quantizer belongs with the paper's patches.
``--backbone demo`` takes the demo recipe's own (4 px patches, width 64, conv output head). It trains on the
ImageNet photographs (classes 0-899 for training with random crops, 900-999 held out for validation), once per
quantizer and variant:
- quantizers: the paper's (8192 codes x 32-d, l2-normalized) and the demo's (512 x 16);
- variants: nothing (random codes, gradient-learned), data init (k-means on the first batches' lookup vectors),
  restarts (codes unused in a window replaced by distinct encoder vectors of it; a check every 10 steps, once the
  window holds a token per code), both, EMA (moving-average codebook, random codes).
Prints one row per run: usage and perplexity over the trainer's health window (the last ``health_window`` steps,
default 100: a single 1024-token batch could use at most 1024 of 8192 codes), the same on the validation images,
validation PSNR, and the wall time. The LPIPS trunk is random (no weights on an offline machine): the perceptual
term is a fixed random network, the same for every row, so rows compare with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitvq.data.shards import WriteOptions, write_shards
from vitvq.data.sources import Listing, list_imagenet

ROOT = Path(__file__).resolve().parents[1]
QUANTIZERS = {"paper": ["model.quantizer.codebook_size=8192", "model.quantizer.code_dim=32"],
              "demo": ["model.quantizer.codebook_size=512", "model.quantizer.code_dim=16"]}
BACKBONES = {"paper": [f"model.{part}.{key}={value}" for part in ("encoder", "decoder")
                       for key, value in (("patch_size", 8), ("width", 128), ("mlp_dim", 512))]
             + ["model.decoder.conv_head=0"],
             "demo": []}
VQ = "model.quantizer.kind=vq"  # gradient-learned codes whatever the demo recipe's kind
VARIANTS = {
    "nothing": [VQ, "model.quantizer.init=random", "model.quantizer.restart_dead_codes=false"],
    "data init": [VQ, "model.quantizer.init=kmeans", "model.quantizer.restart_dead_codes=false"],
    "restarts": [VQ, "model.quantizer.init=random", "model.quantizer.restart_dead_codes=true"],
    "both": [VQ, "model.quantizer.init=kmeans", "model.quantizer.restart_dead_codes=true"],
    "EMA": ["model.quantizer.kind=ema", "model.quantizer.init=random", "model.quantizer.restart_dead_codes=false"],
}


def write_split(src: Path, out: Path) -> tuple[str, str]:
    """Shards of classes 0-899 (train) and 900-999 (val) of an ImageNet-layout folder; their index files."""
    listing = list_imagenet(src)
    for split, keep in (("train", lambda lab: lab < 900), ("val", lambda lab: lab >= 900)):
        part = Listing(listing.root, [i for i in listing.items if keep(i.label)], listing.classes, [])
        write_shards(part, out, WriteOptions(name="imagenet", split=split, shard_size=100, workers=1), progress=False)
    return str(out / "imagenet-train-index.json"), str(out / "imagenet-val-index.json")


def run(shards: tuple[str, str], out: Path, steps: int, overrides: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, str(ROOT / "launch/train_stage1.py"), "--config", str(ROOT / "configs/stage1/demo.yaml"),
           f"train.out_dir={out}", f"train.steps={steps}", "train.tracking=false", "train.progress=false",
           f"train.val_every={steps}", f"train.image_every={steps}", f"train.ckpt_every={steps}",
           "data.source=shards", f"data.train_shards={shards[0]}", f"data.val_shards={shards[1]}",
           "data.transform=random_resized_crop", "loss.lpips_pretrained_backbone=false", *overrides]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = {}
    for row in rows:
        if row["step"] == steps:
            last.update(row)
    return last, time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "imagenet-sample"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--only", choices=sorted(QUANTIZERS), default=None, help="one quantizer only")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="paper",
                   help="paper: 8 px patches, width 128, per-patch output; demo: the demo recipe's ViT")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for every run, e.g. model.quantizer.restart_window_uses=4")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    args = p.parse_args()
    if not Path(args.src).is_dir():
        sys.exit(f"photographs not found at {args.src}: pass --src with an ImageNet-layout folder")
    with tempfile.TemporaryDirectory(prefix="codebook_health") as tmp:
        shards = write_split(Path(args.src), Path(tmp) / "shards")
        extra = "".join(f", {kv}" for kv in args.set)
        print(f"{args.steps} steps, demo-size ViT ({args.backbone} backbone{extra}) at 64 px, batch 16, "
              "ImageNet photographs (900 train / 100 val)")
        head = (f"{'quantizer':<14}{'variant':<11}{'usage(win)':>11}{'ppl(win)':>10}{'val usage':>10}{'val ppl':>9}"
                f"{'val PSNR':>9}{'restarts':>9}{'seconds':>8}")
        print(head)
        for qname in ([args.only] if args.only else list(QUANTIZERS)):
            for vname in args.variants:
                m, secs = run(shards, Path(tmp) / f"{qname}-{vname}".replace(" ", "_"), args.steps,
                              BACKBONES[args.backbone] + QUANTIZERS[qname] + VARIANTS[vname] + args.set)
                label = "8192x32" if qname == "paper" else "512x16"
                print(f"{label:<14}{vname:<11}{m['codebook/usage']:>11.1%}{m['codebook/perplexity']:>10.1f}"
                      f"{m['val/codebook_usage']:>10.1%}{m['val/perplexity']:>9.1f}{m['val/psnr']:>9.2f}"
                      f"{m['codebook/restarts']:>9.0f}{secs:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
