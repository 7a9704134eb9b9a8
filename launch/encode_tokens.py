"""Encode image shards into stage-2 token shards with a stage-1 tokenizer export, once, before training the prior.

    python launch/encode_tokens.py --tokenizer runs/demo/tokenizer.pt --shards demo --out tokens/demo
    python launch/encode_tokens.py --tokenizer runs/vit_ss_imagenet/tokenizer.pt \\
        --shards /shards/imagenet/imagenet-train-index.json --out /shards/imagenet-tok --augment tencrop
    python launch/encode_tokens.py --tokenizer tok.pt --shards /shards/imagenet/imagenet-val-index.json \\
        --split val --out /shards/imagenet-tok
    python launch/encode_tokens.py ... --workers 8 --gpus-per-worker 1 --device cuda   # 8 Ray actors, one GPU each

Writes one ``<name>-<split>-NNNNNN.tar`` per source shard and ``<name>-<split>-index.json`` into --out (format
in ``data/tokens.py``), then prints the overrides that point a stage-2 run at them. ``--shards demo`` encodes both splits (train
and val) of the built-in demo photographs (``data.source: demo`` in stage 1) at the tokenizer's image size. Re-running the same command keeps
the shards already encoded by this tokenizer and writes the rest. ``--workers 0`` (default) encodes in this
process; ``--workers N`` spreads the shards over N Ray actors (``--address`` for an existing cluster; the nodes
must share --out). Under torchrun use ``--workers`` instead: ``WORLD_SIZE > 1`` is refused.
"""

from __future__ import annotations

import argparse
import os
import time

from vitvq.data.encode import encode_tokens
from vitvq.evaluation.pool import add_worker_arguments


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer export (launch/export_tokenizer.py)")
    p.add_argument("--shards", required=True,
                   help="image shards: index .json, path, brace pattern or pipe: URL; 'demo' = the built-in photographs")
    p.add_argument("--index", default=None, help="index .json of --shards when they are pipe:/remote URLs")
    p.add_argument("--out", required=True, help="output folder for the token shards and their index")
    p.add_argument("--name", default=None, help="dataset name in the shard names (default: the source's)")
    p.add_argument("--split", default="train", help="split name in the shard names (train, val, ...)")
    p.add_argument("--augment", choices=["center", "flip", "tencrop"], default="center",
                   help="views per image: centered square (1), + its mirror (2), LlamaGen's ten-crop (10)")
    add_worker_arguments(p, workers=0)
    p.add_argument("--device", default="cpu", help="torch device of the tokenizer (cpu, cuda)")
    p.add_argument("--batch-size", type=int, default=64, help="images (views) per forward pass")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N samples (quick runs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("runs as one process: use --workers N (Ray actors, --gpus-per-worker 1 on GPUs) instead of torchrun")

    if args.shards == "demo":  # both splits of the built-in photographs, at the tokenizer's resolution
        from vitvq.data.builtin import ensure_demo_shards
        from vitvq.data.config import DataConfig
        from vitvq.models.export import read_export
        from vitvq.models.tokenizer import EXPORT_FORMAT
        size = int(read_export(args.tokenizer, EXPORT_FORMAT, "tokenizer")["config"]["image_size"])
        root = DataConfig.__dataclass_fields__["demo_root"].default
        return [encode(args, str(ensure_demo_shards(root, size, split)), split) for split in ("train", "val")][0]
    return encode(args, args.shards, args.split)


def encode(args: argparse.Namespace, shards: str, split: str) -> dict:
    t0 = time.perf_counter()
    index = encode_tokens(args.tokenizer, shards, args.out, name=args.name, split=split,
                          augment=args.augment, workers=args.workers, batch_size=args.batch_size, device=args.device,
                          address=args.address, cpus_per_worker=args.cpus_per_worker,
                          gpus_per_worker=args.gpus_per_worker, limit=args.limit, index=args.index,
                          progress=not args.no_progress)
    t = index["tokens"]
    print(f"{split}: {index['num_samples']} samples in {len(index['shards'])} shards ({index['written']} written, "
          f"{index['kept']} kept) in {time.perf_counter() - t0:.1f} s: {t['views']} views ({t['augment']}) of "
          f"{t['grid']}x{t['grid']} codes from {t['vocab_size']}; {index['num_skipped']} skipped")
    for s in index["skipped"][:10]:
        print(f"  skipped {s['src_shard']}:{s['src_key']}: {s['reason']}")
    print(f"index: {index['index_path']}")
    field = "train_tokens" if split == "train" else "val_tokens"
    print(f"stage-2 overrides: tokenizer={t['tokenizer']['path']} tokens.{field}={index['index_path']}")
    return index

if __name__ == "__main__":
    main()
