"""Shared command-line plumbing of the launchers: config loading with readable errors, the closing summary."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

from vitvq.configs import ConfigError
from vitvq.configs.redact import redact
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
        print(f"  {label:<22} {redact(str(value))}")
    if result.get("run_id"):
        uri = result.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
        print(f"  MLflow run             {result['run_id']}")
        print(f"  see it with:           mlflow ui --backend-store-uri {redact(uri)}")


def launch(cls: type, description: str, example: str, argv: Optional[list[str]] = None) -> dict[str, Any]:
    """The body of every training launcher: ``--config`` + dotted overrides -> ``train(cfg)`` -> the summary."""
    from vitvq.trainer.trainer import train
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"recipe YAML, e.g. {example}")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args, unknown = parser.parse_known_args(argv)
    cfg = parse_config(cls, args.config, args.overrides + unknown)
    result = train(cfg)
    print_summary(result)
    return result
