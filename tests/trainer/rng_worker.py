"""Build the Trainer of a stage-2 recipe on every rank and record torch's first draws of training (the stream
dropout masks come from): rank 0 writes ``{"rank_0": [...], "rank_1": [...]}`` to ``--out``.

Started by tests/trainer/test_stage2.py under ``torchrun --nproc_per_node 2``.
"""

from __future__ import annotations

import argparse
import json

import torch

from vitvq.trainer.config import load_job_config
from vitvq.trainer.engine import all_gather_object, shutdown_distributed
from vitvq.trainer.stage2 import Stage2Config
from vitvq.trainer.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    trainer = Trainer(load_job_config(Stage2Config, args.config, args.overrides))
    trainer.build()
    draws = all_gather_object(torch.rand(8).tolist())
    if trainer.dist.is_main:
        with open(args.out, "w") as f:
            json.dump({f"rank_{r}": d for r, d in enumerate(draws)}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
