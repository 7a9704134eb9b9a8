"""Shared command-line plumbing of the launchers: config loading with readable errors, the closing summary."""

from __future__ import annotations

import os
import sys
from typing import Any

from vitvq.configs import ConfigError
from vitvq.trainer.config import C, load_job_config


def parse_config(cls: type[C], path: str, overrides: list[str]) -> C:
    """Load and validate a recipe of job schema ``cls``; a bad value exits with the field's name, not a traceback."""
    stray = [o for o in overrides if "=" not in o]
    if stray:
        sys.exit(f"error: unexpected argument(s) {stray}; overrides are written key=value, e.g. train.steps=100")
    try:
        return load_job_config(cls, path, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


def print_summary(result: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"\ntrained {result['step']} steps; results in {result['out_dir']}")
    for label, value in result.get("summary", []):  # the task's lines: its metrics, pictures and export
        print(f"  {label:<22} {value}")
    if result.get("run_id"):
        uri = result.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
        print(f"  MLflow run             {result['run_id']}")
        print(f"  see it with:           mlflow ui --backend-store-uri {uri}")
