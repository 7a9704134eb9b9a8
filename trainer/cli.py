"""Shared command-line plumbing of the launchers: config loading with readable errors, the closing summary."""

from __future__ import annotations

import os
import sys
from typing import Any

from vitvq.configs import ConfigError
from vitvq.trainer.config import Stage1Config, load_stage1_config


def parse_config(path: str, overrides: list[str]) -> Stage1Config:
    """Load and validate; a bad value exits with the field's name instead of a traceback."""
    stray = [o for o in overrides if "=" not in o]
    if stray:
        sys.exit(f"error: unexpected argument(s) {stray}; overrides are written key=value, e.g. train.steps=100")
    try:
        return load_stage1_config(path, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


def print_summary(result: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    m = result.get("metrics", {})
    print(f"\ntrained {result['step']} steps; results in {result['out_dir']}")
    for key in ("train/total_loss", "val/psnr", "val/lpips", "val/codebook_usage"):
        if key in m:
            print(f"  {key:<22} {m[key]:.4f}")
    print(f"  reconstructions        {result['out_dir']}/reconstructions.png")
    print(f"  tokenizer export       {result['export']}")
    if result.get("run_id"):
        uri = result.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
        print(f"  MLflow run             {result['run_id']}")
        print(f"  see it with:           mlflow ui --backend-store-uri {uri}")
