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
The flags are the fields of ``data.encode.EncodeConfig`` (``--config FILE`` and dotted overrides work too).
"""

from __future__ import annotations

import os

from vitvq.configs.cli import ConfigParser
from vitvq.data.encode import EncodeConfig, encode, print_encoded


def main(argv: list[str] | None = None) -> dict:
    parser = ConfigParser(EncodeConfig, prog="launch/encode_tokens.py", description=__doc__)
    cfg = parser.config(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("runs as one process: use --workers N (Ray actors, --gpus-per-worker 1 on GPUs) instead of "
                     "torchrun")
    with parser.refusals():
        indexes = encode(cfg)
    for index in indexes.values():
        print_encoded(index)
    return next(iter(indexes.values()))  # the first split's index (train, for --shards demo)


if __name__ == "__main__":
    main()
