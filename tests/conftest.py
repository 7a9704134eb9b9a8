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


def _tokens_for(root: Path, tokenizer, image_size: int, limit: dict, extra: dict | None = None) -> dict:
    """Export ``tokenizer`` into ``root`` and encode the built-in demo photographs at ``image_size`` with it (the
    first ``limit[split]`` samples of each split, None for all): the stage-2 tests' real tokens."""
    from vitvq.data import encode_tokens, ensure_demo_shards
    from vitvq.data.shards import sha256_file
    path = tokenizer.save_export(root / "tokenizer.pt", extra)
    out = {"tokenizer": str(path), "tokenizer_sha256": sha256_file(path)}
    for split in ("train", "val"):
        shards = str(ensure_demo_shards("~/.cache/vitvq/demo", image_size, split))
        out[split] = encode_tokens(path, shards, root / "tokens", split=split, limit=limit[split],
                                   progress=False)["index_path"]
    return out


@pytest.fixture(scope="session")
def stage2_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tokens of every demo photograph (32 px) from an untrained debug tokenizer (64 codes, 4x4 grid), as
    configs/stage2/debug.yaml expects: {"tokenizer", "tokenizer_sha256", "train", "val"} (paths as str)."""
    import torch

    from vitvq.configs import from_dict
    from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
    torch.manual_seed(0)
    return _tokens_for(tmp_path_factory.mktemp("stage2"), Tokenizer(from_dict(TokenizerConfig, "debug")), 32,
                       {"train": None, "val": None})


@pytest.fixture(scope="session")
def stage2_demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tokens of the demo photographs (64 px, 512 train and 128 val) from an untrained tokenizer of the stage-1
    demo recipe's shape (512 codes, 8x8 grid), whose export names a stage-1 MLflow run in the store at
    ``mlflow_dir`` (``launch_env(mlflow_dir)`` points there): configs/stage2/demo.yaml's inputs."""
    import torch

    from vitvq.models.tokenizer import Tokenizer
    from vitvq.trainer.config import load_stage1_config
    from vitvq.trainer.tracking import MLflowTracker
    root = tmp_path_factory.mktemp("stage2-demo")
    stage1 = MLflowTracker("vitvq-stage1", run_name="demo", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    stage1.close()
    torch.manual_seed(0)
    cfg = load_stage1_config(ROOT / "configs/stage1/demo.yaml")
    data = _tokens_for(root, Tokenizer(cfg.model), 64, {"train": 512, "val": 128}, {"mlflow_run_id": stage1.run_id})
    return {**data, "mlflow_dir": root, "stage1_run_id": stage1.run_id}
