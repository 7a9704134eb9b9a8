"""Data throughput: our shard stream vs torchvision ImageFolder vs bare PIL decoding, on real photographs.

    python benchmarks/data_throughput.py [--src ../shared/data/imagenet-sample] [--size 256] [--repeats 2]

All three read the same ImageNet JPEGs (imagenet-sample: 1000 photographs, mostly about 500x375) with
one worker process and produce the same thing: decode, resize the shorter side to ``--size`` (bicubic,
antialiased), random ``--size`` crop, random horizontal flip, float tensor in [-1, 1], batches of 32.
- ours: ``build_train_stream`` over shards written by the shard writer (timed too), with and without the check
  of each shard against its index's sha256 (``data.verify_shards``; each pass starts a fresh worker, which
  verifies every shard it opens: the first epoch's cost, later epochs pay none);
- ImageFolder: ``torchvision.datasets.ImageFolder`` + ``Resize/RandomCrop/RandomHorizontalFlip/ToTensor/
  Normalize`` in a ``DataLoader``;
- PIL decode: ``Image.open(...).convert("RGB")`` of the same bytes in memory, no resize: the decode cost
  every full-resolution pipeline pays (our draft decoding can beat it on large photos).
Each figure is the best of ``--repeats`` passes over the images, counting from the second batch so that
worker start-up is not measured. Prints images/s and the ratios.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitvq.data import DataConfig, build_train_stream
from vitvq.data.shards import WriteOptions, sha256_file, write_shards
from vitvq.data.sources import list_imagenet

BATCH = 32


def rate(batches, total: int) -> float:
    """Images/s from the second batch to the end of ``total`` images."""
    seen, t0 = 0, None
    for b in batches:
        n = b[0].shape[0] if isinstance(b, (list, tuple)) else b["image"].shape[0]
        if t0 is None:
            t0 = time.perf_counter()
        else:
            seen += n
        if seen + BATCH >= total:
            break
    return seen / (time.perf_counter() - t0)


def bench_writer(src: Path, out: Path, workers: int) -> tuple[float, Path]:
    listing = list_imagenet(src)
    nbytes = sum(i.size for i in listing.items)
    t0 = time.perf_counter()
    index = write_shards(listing, out, WriteOptions(name="imagenet", shard_size=125, workers=workers), progress=False)
    dt = time.perf_counter() - t0
    print(f"shard writer ({workers} process{'es' if workers > 1 else ''}): {index['num_samples']} images, "
          f"{nbytes / 1e6:.0f} MB in {dt:.2f} s = {index['num_samples'] / dt:.0f} images/s, "
          f"{nbytes / 1e6 / dt:.0f} MB/s "
          "(every image fully decoded to check it)")
    return index["num_samples"] / dt, out / "imagenet-train-index.json"


def bench_ours(index: Path, size: int, total: int, verify: bool = True) -> float:
    cfg = DataConfig(train_shards=str(index), image_size=size, transform="resize_crop", flip=True, num_workers=1,
                     shuffle_buffer=250, verify_shards=verify)
    stream = build_train_stream(cfg, batch_size=BATCH, rank=0, world_size=1, seed=0)
    return rate(iter(stream), total)


def bench_imagefolder(src: Path, size: int, total: int) -> float:
    from torchvision import datasets, transforms as T
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.RandomCrop(size),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ds = datasets.ImageFolder(str(src), transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=1)
    return rate(iter(loader), total)


def bench_sha256(index: Path) -> float:
    """MB/s of hashing the shards (what verification adds per shard, on one core)."""
    shards = sorted(index.parent.glob("*.tar"))
    t0 = time.perf_counter()
    for path in shards:
        sha256_file(path)
    return sum(p.stat().st_size for p in shards) / 1e6 / (time.perf_counter() - t0)


def bench_pil(src: Path) -> float:
    from PIL import Image
    blobs = [p.read_bytes() for p in sorted(src.glob("*/*"))]
    t0 = time.perf_counter()
    for b in blobs:
        Image.open(io.BytesIO(b)).convert("RGB")
    return len(blobs) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-sample"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    src = Path(args.src)
    if not src.is_dir():
        sys.exit(f"no photographs at {src}: pass --src <ImageNet-layout folder>")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        writer1, index = bench_writer(src, Path(tmp) / "w1", 1)
        writer2, _ = bench_writer(src, Path(tmp) / "w2", 2)
        total = sum(1 for _ in src.glob("*/*"))
        shard_mb = sum(p.stat().st_size for p in index.parent.glob("*.tar")) / 1e6
        res = {"ours": 0.0, "ours_unverified": 0.0, "imagefolder": 0.0, "pil": 0.0, "sha256_MBps": 0.0}
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
            res["ours"] = max(res["ours"], bench_ours(index, args.size, total))
            res["ours_unverified"] = max(res["ours_unverified"], bench_ours(index, args.size, total, verify=False))
            res["sha256_MBps"] = max(res["sha256_MBps"], bench_sha256(index))
            res["imagefolder"] = max(res["imagefolder"], bench_imagefolder(src, args.size, total))
            res["pil"] = max(res["pil"], bench_pil(src))
    print(f"{total} photographs from {src.name}, decode + resize {args.size} + random crop + flip + float, "
          f"1 worker, batch {BATCH}, best of {args.repeats}:")
    print(f"  ours (shards, draft decode, crop-then-resize): {res['ours']:7.1f} images/s")
    hash_s, decode_s = shard_mb / res["sha256_MBps"], total / res["ours_unverified"]
    print(f"  ours without shard verification:               {res['ours_unverified']:7.1f} images/s "
          f"(verified / unverified = {res['ours'] / res['ours_unverified']:.2f}x)")
    print(f"  verification, first epoch: sha256 of {shard_mb:.0f} MB of shards at {res['sha256_MBps']:.0f} MB/s = "
          f"{hash_s:.2f} s per worker per epoch, {100 * hash_s / decode_s:.1f}% of the {decode_s:.1f} s of reading")
    print(f"  torchvision ImageFolder (same transforms):     {res['imagefolder']:7.1f} images/s")
    print(f"  bare PIL decode of the same bytes (ceiling):   {res['pil']:7.1f} images/s")
    print(f"  ours / ImageFolder = {res['ours'] / res['imagefolder']:.2f}x   ours / PIL decode = "
          f"{res['ours'] / res['pil']:.2f}x   ImageFolder / PIL decode = {res['imagefolder'] / res['pil']:.2f}x")
    return {**res, "writer_1proc": writer1, "writer_2proc": writer2}


if __name__ == "__main__":
    main()
