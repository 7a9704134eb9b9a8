"""Shared fixtures and the test tiers.

``python -m pytest`` runs the quick tier: unit tests plus one 2-rank DeepSpeed run and one Ray Train run. Tests
marked ``e2e`` (real launchers end to end, Ray clusters, faults) run with ``python -m pytest --full``; the session
then shares one local Ray cluster, one set of shards and one trained debug tokenizer among them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed JIT-builds its CPU communication op once; keep the build between test runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vitvq" / "torch_extensions"))


FULL_TIER = "python -m pytest --full"
_DESELECTED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="also run the end-to-end tier (tests marked e2e)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end test of the full tier (runs with --full)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``--full``, the e2e tests are deselected (reported at the end, with the command that runs them). The
    tests on the session's Ray cluster run last, in their order, so that its idle daemons (GCS, raylets, dashboard
    agents) do not share the 2 cores with every other test of the session."""
    items.sort(key=lambda item: "ray_cluster" in item.fixturenames)  # stable: the order within each group is kept
    if config.getoption("--full"):
        return
    e2e = [item for item in items if item.get_closest_marker("e2e")]
    if e2e:
        config.hook.pytest_deselected(items=e2e)
        items[:] = [item for item in items if not item.get_closest_marker("e2e")]
        config.stash[_DESELECTED] = len(e2e)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    n = config.stash.get(_DESELECTED, 0)
    if n:
        terminalreporter.write_line(f"quick tier: {n} end-to-end tests (marked e2e) not run; run every test with "
                                    f"`{FULL_TIER}` (README, Tests)")


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


# -- shared by the end-to-end tier -----------------------------------------------------------------
STAGE1_LOSSES = ("train/total_loss", "train/rec_loss", "train/g_loss", "train/disc_loss", "train/quant_loss")
DEBUG_RUN = ("train.progress=false", "train.val_every=0", "train.image_every=100", "data.mode=epoch",
             "data.shuffle_buffer=16")
"""Overrides of configs/stage1/debug.yaml for the runs whose losses are compared step by step."""


def read_losses(out: Path, keys: tuple[str, ...] = STAGE1_LOSSES) -> dict[int, dict[str, float]]:
    """Per step, the last logged values of ``keys`` in ``out/metrics.jsonl`` (a resumed or restarted run logs the
    steps it redoes again); rows without ``keys[0]`` (validation) are passed over."""
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if keys[0] in row:
            rows[row["step"]] = {k: row[k] for k in keys}
    return rows


@pytest.fixture(scope="session")
def losses():
    """:func:`read_losses`, for test modules (importlib mode cannot import conftest)."""
    return read_losses


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster of three nodes on this machine for the session, with this process connected as a driver: a
    head without CPUs (drivers, Train's controller, the job server on 127.0.0.1) and two nodes of one CPU each, so
    the two Train workers of a run sit on two nodes and a node can be taken away. ``restore()`` brings the nodes
    back to two (the ``cluster`` fixtures of the test modules call it); ``dashboard`` is the job server's URL.
    Ray's temp files live in a short folder (``RAY_TMPDIR``; socket paths must stay under 107 characters)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobSubmissionClient

    from vitvq.trainer.engine import free_port
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp  # Cluster's address file goes to <RAY_TMPDIR>/ray; launched drivers find it
    (Path(tmp) / "ray").mkdir()
    c = None
    try:
        port = free_port()
        # Ray's fixed default agent port (52365) would clash with any other head on this machine: pick a free one.
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": f"{tmp}/ray", "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": port, "dashboard_agent_listen_port": free_port()})
        nodes = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:  # the dashboard's HTTP server comes up a few seconds after the head
            try:
                JobSubmissionClient(url)
                break
            except ConnectionError:
                assert time.monotonic() < deadline, f"the Ray job server did not answer at {url} within 60 s"
                time.sleep(0.5)

        def restore() -> None:
            nodes[:] = [n for n in nodes if n in c.worker_nodes]
            while len(nodes) < 2:
                nodes.append(c.add_node(num_cpus=1))
            c.wait_for_nodes()

        yield SimpleNamespace(cluster=c, nodes=nodes, address=c.address, dashboard=url, restore=restore)
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()  # this cluster's processes only (never `ray stop`: it kills every Ray process on the host)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def stage1_reference(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The uninterrupted run that Ray Train runs and interrupted runs are compared with: configs/stage1/debug.yaml
    with :data:`DEBUG_RUN` on 2 torchrun ranks (two ZeRO-2 engines), once per session. ``out`` holds its
    ``metrics.jsonl``; ``common`` are the overrides a compared run must use too."""
    tmp = tmp_path_factory.mktemp("stage1-reference")
    out = tmp / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "train_stage1.py"), "--config", str(ROOT / "configs" / "stage1" / "debug.yaml"),
           f"train.out_dir={out}", *DEBUG_RUN]
    res = subprocess.run(cmd, env=launch_env(tmp), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return SimpleNamespace(out=out, common=DEBUG_RUN, env=launch_env(tmp))
