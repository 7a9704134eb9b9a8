"""Shared fixtures: environment for multi-process launches, the real-data folder, quiet MLflow and Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed JIT-builds its CPU communication op once; keep the build between test runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vitvq" / "torch_extensions"))


def launch_env(folder: Path, threads: int = 1) -> dict:
    """Environment for launching ranks in subprocesses: repo importable, no inherited rank variables, an
    MLflow store in ``folder``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(threads)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    return env


@pytest.fixture
def torchrun_env(tmp_path: Path) -> dict:
    return launch_env(tmp_path)


@pytest.fixture(scope="session")
def make_launch_env():
    """:func:`launch_env` for module-scoped fixtures (test modules cannot import conftest in importlib mode)."""
    return launch_env


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real photographs not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA
