"""Train the stage-2 prior (an autoregressive transformer over a tokenizer's codes) on DeepSpeed.

    python launch/train_stage2.py --config configs/stage2/demo.yaml                 # one process (CPU or GPU)
    deepspeed --num_gpus 8 launch/train_stage2.py --config configs/stage2/vim_base_imagenet.yaml \\
        tokenizer=runs/vit_ss/tokenizer.pt tokens.train_tokens=tokens/imagenet-train-index.json
    torchrun --nproc_per_node 8 launch/train_stage2.py --config ... train.steps=1000

The token shards come from ``launch/encode_tokens.py``; the run refuses tokens encoded by another tokenizer
export than ``tokenizer``. Rerunning the same command resumes from the latest complete checkpoint in
``train.out_dir``.
"""

from __future__ import annotations

from vitvq.trainer.cli import launch
from vitvq.trainer.stage2 import Stage2Config


def main(argv: list[str] | None = None) -> dict:
    return launch(Stage2Config, __doc__, "configs/stage2/demo.yaml", argv)


if __name__ == "__main__":
    main()
