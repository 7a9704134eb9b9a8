"""Training on Ray Train V2 (``launch/ray_train.py``, ``launch/orchestration/ray_train.py``) on a real multi-node Ray cluster.

The session's cluster serves the module (``ray_cluster`` in tests/conftest.py): a head without CPUs and two nodes of
one CPU each (``ray.cluster_utils.Cluster`` on this machine), so the two Train workers of a run sit on two nodes, as
on a real cluster, and a node can be taken away. Every run is the real launcher joining that cluster (``--address``) in a subprocess, on the debug
recipe with two DeepSpeed ZeRO-2 engines; losses are compared through the ``metrics.jsonl`` the Trainer writes,
and each test's MLflow store (SQLite in tmp) is read back. Ray Train's timeouts are lowered (``RAY_ENV``) and
Ray's temp files live in a short temp folder (``RAY_TMPDIR``; socket paths must stay under 107 characters). The
2-worker run against 2 torchrun ranks is the quick tier's Ray Train run; the faults are the full tier's (``e2e``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vitvq.trainer.checkpoint import latest_file, meta_file, step_folders, tag_of

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs/stage1/debug.yaml")
COMMON = ("train.progress=false", "train.val_every=0", "train.image_every=100", "data.mode=epoch",
          "data.shuffle_buffer=16")
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",  # the controller polls workers (and registers reports) this often
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",  # after a node loss the first restart may wait this out
}


# -- helpers --------------------------------------------------------------------------------------
def the_run(env: dict) -> tuple[object, object]:
    """(client, run) of the one MLflow run in the store of ``env`` (asserting there is exactly one)."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"expected one MLflow run, found {[(r.info.run_id, r.info.status) for r in runs]}"
    return client, runs[0]


def history(client: object, run: object, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                              key=lambda m: (m.timestamp, m.step))]


def ray_cmd(address: str, out: Path, workers: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "ray_train.py"), "--config", RECIPE, "--workers", workers,
            "--address", address, f"train.out_dir={out}", *COMMON, *args]


def run(cmd: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return res


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def cluster(ray_cluster) -> tuple:
    """(cluster, [node_a, node_b]) of the session's Ray cluster (tests/conftest.py): a head without CPUs and two 1-CPU
    nodes, whatever an earlier test took away."""
    ray_cluster.restore()
    return ray_cluster.cluster, ray_cluster.nodes


@pytest.fixture(scope="module")
def env_for(make_launch_env, tmp_path_factory: pytest.TempPathFactory):
    """``env_for(name)``: the launch environment with its own MLflow store and Ray Train's test timeouts."""
    def make(name: str) -> dict:
        return {**make_launch_env(tmp_path_factory.mktemp(f"mlflow-{name}")), **RAY_ENV}
    return make


@pytest.fixture(scope="module")
def torchrun_straight(stage1_reference: SimpleNamespace) -> Path:
    assert COMMON == stage1_reference.common
    return stage1_reference.out


@pytest.fixture(scope="module")
def ray_straight(ray_cluster, tmp_path_factory: pytest.TempPathFactory, env_for) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("ray") / "out"
    env = env_for("ray")
    ray_cluster.restore()
    res = run(ray_cmd(ray_cluster.address, out, "2", "train.keep_last=1"), env)
    return SimpleNamespace(out=out, env=env, res=res)


# -- before Ray: the checks that refuse early ----------------------------------------------------
def test_an_elastic_range_that_cannot_keep_the_global_batch_is_refused_before_starting(capsys) -> None:
    from vitvq.launch.ray_train import main
    with pytest.raises(SystemExit) as e:  # global 4 = micro 2 x workers x accumulation: 3 workers cannot
        main(["--config", RECIPE, "--workers", "1-3"])
    msg = str(e.value)
    assert "[3] worker(s)" in msg and "train.global_batch_size=12" in msg and "[1, 2]" in msg, msg
    with pytest.raises(SystemExit) as e:
        main(["--config", RECIPE, "--workers", "3-1"])
    assert "MIN <= MAX" in str(e.value)


def test_pointers_that_ray_does_not_keep_are_deleted(tmp_path: Path) -> None:
    from vitvq.launch.orchestration.ray_train import POINTER_FILE, parse_workers, prune_pointers
    assert parse_workers("4") == 4 and parse_workers("2-8") == (2, 8)
    for tag in map(tag_of, (4, 8, 12)):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / POINTER_FILE).write_text(json.dumps({"tag": tag}))
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    kept = SimpleNamespace(path=str(tmp_path / tag_of(12)))
    result = SimpleNamespace(path=str(tmp_path), best_checkpoints=[(kept, {})], checkpoint=kept)
    assert sorted(p.name for p in prune_pointers(result)) == [tag_of(4), tag_of(8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_manager_snapshot.json", tag_of(12)]


def test_the_stage_comes_from_the_recipe_folder_or_the_one_schema_that_loads_it(tmp_path: Path) -> None:
    from vitvq.launch.ray_train import detect_stage
    assert detect_stage(RECIPE, []) == "stage1"
    elsewhere = tmp_path / "prior.yaml"
    shutil.copy(ROOT / "configs/stage2/debug.yaml", elsewhere)
    assert detect_stage(str(elsewhere), []) == "stage2"


# -- on the cluster -------------------------------------------------------------------------------
def test_two_ray_workers_log_the_losses_of_the_same_run_under_torchrun(torchrun_straight: Path,
                                                                       ray_straight: SimpleNamespace, losses) -> None:
    """The quick tier's DeepSpeed and Ray Train runs: 2 torchrun ranks, then 2 Ray Train workers on two nodes."""
    want, got = losses(torchrun_straight), losses(ray_straight.out)
    assert sorted(want) == list(range(1, 9))
    assert got == want  # bit for bit: the same ranks, data shards, seeds and collectives
    assert "trained 8 steps" in ray_straight.res.stdout  # the summary of the plain launchers, on the driver
    # One source of truth, one retention: our latest is step 8, Ray's only pointer names it (keep_last=1).
    ckpts = ray_straight.out / "checkpoints"
    assert latest_file(ckpts).read_text().strip() == tag_of(8)
    assert [p.name for p in step_folders(ckpts)] == [tag_of(8)]
    pointers = [p / "vitvq_checkpoint.json" for p in step_folders(ray_straight.out / "ray" / "debug")
                if (p / "vitvq_checkpoint.json").is_file()]
    assert [p.parent.name for p in pointers] == [tag_of(8)]
    assert json.loads(pointers[0].read_text())["tag"] == tag_of(8)
    client, mlrun = the_run(ray_straight.env)
    assert mlrun.info.status == "FINISHED"
    assert history(client, mlrun, "sys/world_size") == [(0, 2.0)]
    assert history(client, mlrun, "sys/restarts") == [(0, 0.0)]


@pytest.mark.e2e
def test_a_worker_crash_restarts_from_the_checkpoint_in_one_mlflow_run(cluster, ray_straight: SimpleNamespace,
                                                                       tmp_path: Path, env_for, losses) -> None:
    out, marker = tmp_path / "out", tmp_path / "fault-fired"
    env = {**env_for("crash"), "VITVQ_INJECT_FAULT": "step@6", "VITVQ_INJECT_FAULT_ONCE": str(marker)}
    res = run(ray_cmd(cluster[0].address, out, "2", "--max-failures", "1"), env)
    log = res.stdout + res.stderr
    assert marker.exists() and "injected fault step@6" in log  # it did die after step 6, once
    assert f"resuming from {tag_of(4)}" in log  # the step-4 checkpoint; steps 5-6 are redone
    want, got = losses(ray_straight.out), losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == want[step], f"step {step}: restarted {got[step]} != uninterrupted {want[step]}"
    client, mlrun = the_run(env)  # the restart continued the run named in the checkpoint
    assert mlrun.info.status == "FINISHED"
    assert history(client, mlrun, "sys/restarts") == [(0, 0.0), (4, 1.0)]
    assert history(client, mlrun, "sys/world_size") == [(0, 2.0), (4, 2.0)]
    assert [s for s, _ in history(client, mlrun, "train/total_loss")] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]


@pytest.mark.e2e
def test_a_lost_node_continues_on_one_worker_with_the_same_global_batch(cluster, tmp_path: Path, env_for,
                                                                        losses) -> None:
    c, nodes = cluster
    out, env = tmp_path / "out", env_for("elastic")
    cmd = ray_cmd(c.address, out, "1-2", "--max-failures", "1", "train.steps=12")
    log_file = tmp_path / "log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        latest = latest_file(out / "checkpoints")
        deadline = time.time() + 300
        while not (latest.is_file() and latest.read_text().strip() == tag_of(4)):  # 2 workers reached step 4
            assert proc.poll() is None and time.time() < deadline, log_file.read_text()[-6000:]
            time.sleep(0.05)
        c.remove_node(nodes[1], allow_graceful=False)  # from the main thread, as Cluster requires
        assert json.loads(meta_file(out / "checkpoints" / tag_of(4)).read_text())["world_size"] == 2
        rc = proc.wait(timeout=400)
    text = log_file.read_text()
    assert rc == 0, text[-8000:]
    meta = json.loads(meta_file(out / "checkpoints" / latest.read_text().strip()).read_text())
    assert meta["step"] == 12 and meta["world_size"] == 1
    assert "gradient accumulation is now 2" in text  # global batch 4 = micro 2 x 1 worker x 2
    got = losses(out)
    assert sorted(got) == list(range(1, 13)) and all(math.isfinite(v) for r in got.values() for v in r.values())
    client, mlrun = the_run(env)
    assert mlrun.info.status == "FINISHED"
    sizes = history(client, mlrun, "sys/world_size")
    assert [v for _, v in sizes] == [2.0, 1.0] and sizes[1][0] in (4, 8), sizes  # resumed, not restarted at 0
