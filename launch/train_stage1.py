"""Train a stage-1 tokenizer (ViT-VQGAN, VQGAN or VQ-VAE) on DeepSpeed.

    python launch/train_stage1.py --config configs/stage1/demo.yaml                  # one process (CPU or GPU)
    deepspeed --num_gpus 8 launch/train_stage1.py --config configs/stage1/vit_ss_imagenet.yaml data.train_shards=...
    torchrun --nproc_per_node 8 launch/train_stage1.py --config ... train.steps=1000

Rerunning the same command resumes from the latest complete checkpoint in ``train.out_dir``.
"""

from __future__ import annotations

from vitvq.trainer.cli import launch
from vitvq.trainer.config import Stage1Config


def main(argv: list[str] | None = None) -> dict:
    return launch(Stage1Config, __doc__, "configs/stage1/demo.yaml", argv)


if __name__ == "__main__":
    main()
