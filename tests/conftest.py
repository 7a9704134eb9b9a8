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
    """Environment for launching ranks in subprocesses: no inherited rank variables, one thread per rank, an
    MLflow store in ``folder``. The launched scripts import ``vitvq`` from the (editable) install."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
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


@pytest.fixture(scope="session")
def run_on_two_ranks():
    """``run_on_two_ranks(worker, out, *args)``: ``torchrun --nproc_per_node 2 worker --out out *args``, asserting
    success (the output tail in the message otherwise)."""
    import subprocess
    import sys

    def run(worker: Path, out: Path, *args: str, timeout: int = 900) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
               "--out", str(out), *args]
        res = subprocess.run(cmd, env=launch_env(out), capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return run


PHOTO_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="session")
def cifar(tmp_path_factory: pytest.TempPathFactory):
    """``cifar(cls)`` -> a folder of real 32 px photographs of that class (``cifar()`` -> their root).

    The CIFAR-10 test split from ../shared/data when it is there; otherwise 240 crops per class name of one of
    scikit-image's sample photographs (real photos that ship with the installed package), so the evaluation
    tests run on any clone. Different class names come from different photos, as different classes differ.
    """
    root = SHARED_DATA / "cifar10-test"
    if not root.is_dir():
        import numpy as np
        from PIL import Image

        from vitvq.data.builtin import skimage_photos
        root = tmp_path_factory.mktemp("photos")
        photos = skimage_photos()
        rng = np.random.default_rng(0)
        for k, cls in enumerate(PHOTO_CLASSES):
            im = Image.open(photos[k % len(photos)]).convert("RGB")
            (root / cls).mkdir()
            for i in range(240):
                side = int(min(im.size) * rng.uniform(0.2, 0.6))
                x, y = (int(rng.integers(0, d - side + 1)) for d in im.size)
                crop = im.crop((x, y, x + side, y + side)).resize((32, 32), Image.Resampling.BICUBIC)
                crop.save(root / cls / f"{i:04d}.jpg", quality=95)
    return lambda cls="": str(root / cls)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real photographs not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA
