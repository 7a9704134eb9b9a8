"""Write a dataset as webdataset shards plus an index, once, before training.

    python launch/prepare_data.py imagenet --src /data/imagenet/train --out /shards/imagenet
    python launch/prepare_data.py imagenet --src /data/imagenet/val --labels LOC_val_solution.csv \\
        --split val --out /shards/imagenet
    python launch/prepare_data.py ffhq --src /data/ffhq/images1024x1024 --out /shards/ffhq --resize 256
    python launch/prepare_data.py folder --src /data/my_photos --out /shards/photos --workers 8

Writes ``<name>-<split>-NNNNNN.tar`` and ``<name>-<split>-index.json`` into --out; train with
``data.train_shards=/shards/imagenet/imagenet-train-index.json``. Re-running the same command completes
what is missing (after a crash or a deleted shard) and leaves complete shards untouched. Bad files are
converted when a correct image can be had and otherwise skipped; all are listed in the index. A source that does
not exist or holds no image, and a run that writes no sample at all, exit with status 1 and say why.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from vitvq.data.shards import WriteOptions, write_shards
from vitvq.data.sources import SourceError, list_ffhq, list_folder, list_imagenet


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GB)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["imagenet", "ffhq", "folder"], help="input layout")
    p.add_argument("--src", required=True, help="input folder (ffhq: folder or .zip)")
    p.add_argument("--out", required=True, help="output folder for the shards and the index")
    p.add_argument("--split", default="train", help="split name in the shard names (train, val, ...)")
    p.add_argument("--name", default=None, help="dataset name in the shard names (default: the kind, or the "
                                                "folder name for 'folder')")
    p.add_argument("--labels", default=None, help="imagenet val: '<file> <synset|index>' lines or LOC_val_solution.csv")
    p.add_argument("--synsets", default=None, help="imagenet val: synset list pinning the class order")
    p.add_argument("--resize", type=int, default=None, help="re-encode with this shorter side (default: keep "
                                                             "the original bytes)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    p.add_argument("--shard-bytes", type=parse_bytes, default=parse_bytes("1GB"),
                   help="max source bytes per shard (e.g. 500MB)")
    p.add_argument("--workers", type=int, default=2, help="parallel writer processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle before sharding")
    p.add_argument("--no-shuffle", action="store_true", help="keep the listing order (class-sorted shards)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    try:
        if args.kind == "imagenet":
            listing = list_imagenet(args.src, args.labels, args.synsets)
        elif args.kind == "ffhq":
            listing = list_ffhq(args.src)
        else:
            listing = list_folder(args.src)
    except SourceError as e:
        raise SystemExit(f"prepare_data {args.kind}: {e}") from None
    name = args.name or (Path(args.src).name if args.kind == "folder" else args.kind)
    opts = WriteOptions(name=name, split=args.split, resize=args.resize, quality=args.quality,
                        lossless=args.kind == "ffhq",  # FFHQ is stored losslessly (PNG when re-encoded)
                        shard_size=args.shard_size, shard_bytes=args.shard_bytes, workers=max(1, args.workers),
                        seed=None if args.no_shuffle else args.seed)
    t0 = time.perf_counter()
    index = write_shards(listing, args.out, opts, kind=args.kind, args={"src": str(args.src), "labels": args.labels},
                         progress=not args.no_progress)
    dt = time.perf_counter() - t0
    written, done_files = index["written"], index["written_files"]
    print(f"{index['num_samples']} samples, {index['num_classes']} classes, {len(index['shards'])} shards "
          f"({written} written, {len(index['shards']) - written} kept) in {dt:.1f} s"
          + (f" ({done_files / dt:.0f} images/s)" if written else ""))
    print(f"{index['num_skipped']} skipped, {len(index['converted'])} converted; details in "
          f"{Path(args.out) / f'{name}-{args.split}-index.json'}")
    for s in index["skipped"][:10]:
        print(f"  skipped {s['path']}: {s['reason']}")
    if index["num_samples"] == 0:  # every image unreadable: nothing to train on, so not a success
        raise SystemExit(f"prepare_data {args.kind}: none of the {len(listing.items)} images in {args.src} could be "
                         "written (all unreadable, reasons above and in the index): check the source files")
    return index


if __name__ == "__main__":
    main()
