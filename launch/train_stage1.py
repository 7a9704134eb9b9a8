"""Train a stage-1 tokenizer (ViT-VQGAN, VQGAN or VQ-VAE) on DeepSpeed.

    python launch/train_stage1.py --config configs/stage1/demo.yaml                  # one process (CPU or GPU)
    deepspeed --num_gpus 8 launch/train_stage1.py --config configs/stage1/vit_ss_imagenet.yaml data.train_shards=...
    torchrun --nproc_per_node 8 launch/train_stage1.py --config ... train.steps=1000

Rerunning the same command resumes from the latest complete checkpoint in ``train.out_dir``.
"""

from __future__ import annotations

import argparse

from vitvq.trainer.cli import parse_config, print_summary
from vitvq.trainer.config import Stage1Config
from vitvq.trainer.trainer import train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/stage1/demo.yaml")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args, unknown = parser.parse_known_args(argv)
    cfg = parse_config(Stage1Config, args.config, args.overrides + unknown)
    result = train(cfg)
    print_summary(result)
    return result


if __name__ == "__main__":
    main()
