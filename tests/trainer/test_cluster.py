"""What a multi-node run needs (``launch/orchestration/cluster.py``), a SIGTERM to a Ray Train worker, evaluation actors outside
Train's placement group, and what a local Ray cluster listens on; all on real Ray clusters.

The session's ``ray.cluster_utils.Cluster`` serves the module (``ray_cluster`` in tests/conftest.py): a head without
CPUs and two 1-CPU nodes on this machine (they share its disk). This process is a driver connected to it. A folder that one node cannot see is made real with a
third node started by ``ray start`` inside its own mount namespace (``unshare -m``) where a tmpfs covers the folder:
the same path, another file system, which is what a node-local disk is. Ray's temp files live in a short temp
folder (``RAY_TMPDIR``) and Ray Train's timeouts are lowered, as in ``test_ray_train.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitvq.trainer.checkpoint import meta_file, tag_of

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs/stage1/debug.yaml")
# The debug recipe's dead-code restarts stay on (every 2 steps): a stop at an odd step resumes inside a restart
# window, whose per-rank pools come back from the rank files.
COMMON = ("train.progress=false", "train.val_every=0", "train.image_every=100", "data.mode=epoch",
          "data.shuffle_buffer=16")
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}


# -- helpers --------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    found, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            found.append(k)
            todo.append(k)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def cluster(ray_cluster) -> tuple:
    """(cluster, [node_a, node_b]) of the session's Ray cluster (tests/conftest.py), this process connected to it as a
    driver."""
    ray_cluster.restore()
    return ray_cluster.cluster, ray_cluster.nodes


@pytest.fixture
def no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# -- secrets --------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_a_config_dump_and_params_carry_no_secret(tmp_path: Path, make_launch_env) -> None:
    from mlflow.tracking import MlflowClient
    from vitvq.configs.redact import redact_config
    flat = {"data.train_shards": "pipe:curl -s https://user:pw@host/x-{000..009}.tar",
            "data.val_shards": "https://bucket.s3/x.tar?X-Amz-Signature=beef&X-Amz-Expires=60",
            "hub.api_key": "k123", "prior.token_dropout": 0.1, "tokens.train_tokens": "/t/idx.json",
            "train.steps": 10, "train.tracking": True, "auth.token": None}
    safe = redact_config(flat)
    assert safe == {**flat, "data.train_shards": "pipe:curl -s https://***@host/x-{000..009}.tar",
                    "data.val_shards": "https://bucket.s3/x.tar?X-Amz-Signature=***&X-Amz-Expires=60",
                    "hub.api_key": "***"}
    # A real run (one process, one step): its config dump, its MLflow params and its output.
    env = make_launch_env(tmp_path)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "train_stage1.py"), "--config", RECIPE,
                          f"train.out_dir={out}", "train.steps=1", "train.progress=false", "train.val_every=0",
                          "data.train_shards=pipe:curl -s https://user:pw@host/x-{000..009}.tar"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    dump = json.loads((out / "config.json").read_text())
    assert dump["data.train_shards"] == "pipe:curl -s https://***@host/x-{000..009}.tar"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = next(r for e in client.search_experiments() for r in client.search_runs([e.experiment_id]))
    assert run.data.params["data.train_shards"] == dump["data.train_shards"]
    assert "user:pw" not in res.stdout + res.stderr + (out / "config.json").read_text()


def test_the_closing_summary_prints_no_credentials(capsys: pytest.CaptureFixture) -> None:
    from vitvq.trainer.cli import print_summary
    print_summary({"step": 8, "out_dir": "/runs/x", "run_id": "abc", "tracking_uri": "https://alice:s3cret@ml:5000",
                   "summary": [("shards", "pipe:curl -s https://u:pw@h/x.tar")]})
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri https://***@ml:5000" in out and "https://***@h/x.tar" in out
    assert "s3cret" not in out and "u:pw" not in out


# -- the multi-node checks ------------------------------------------------------------------------
@pytest.mark.e2e
def test_folders_every_node_sees_pass_and_leave_no_token(cluster, tmp_path: Path) -> None:
    from vitvq.launch.orchestration.cluster import alive_nodes, check_multinode, check_visible_everywhere
    assert len(alive_nodes()) == 2  # the head has no CPUs: it hosts drivers, not workers
    out, storage = tmp_path / "runs" / "a", tmp_path / "ray"
    t0 = time.perf_counter()
    check_visible_everywhere({"train.out_dir": out, "--storage": storage})
    assert time.perf_counter() - t0 < 30
    assert out.is_dir() and storage.is_dir()  # created where missing
    assert list(out.iterdir()) == [] and list(storage.iterdir()) == []  # its tokens removed
    check_multinode({"train.out_dir": out}, f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")  # absolute: fine
    check_multinode({"train.out_dir": out}, "http://mlflow.internal:5000")


@pytest.mark.e2e
def test_the_launcher_refuses_a_relative_tracking_store_before_training(cluster, no_tracking_env, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from vitvq.launch.ray_train import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:  # this process is the driver, already connected to the 2-node cluster
        main(["--config", RECIPE, "--workers", "2", f"train.out_dir={tmp_path / 'out'}", *COMMON])
    assert str(e.value).startswith("error: MLFLOW_TRACKING_URI=sqlite:///mlflow.db (MLflow's default")
    assert not (tmp_path / "out" / "ray").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


@pytest.mark.e2e
@pytest.mark.parametrize("uri", [None, "sqlite:///mlflow.db", "file:./mlruns", "mlruns"])
def test_a_relative_tracking_store_is_refused_on_several_nodes(cluster, no_tracking_env, uri) -> None:
    from vitvq.launch.orchestration.cluster import ClusterCheckError, check_tracking
    with pytest.raises(ClusterCheckError) as e:
        check_tracking(uri)
    msg = str(e.value)
    assert "MLFLOW_TRACKING_URI=" + (uri or "sqlite:///mlflow.db") in msg
    assert "mlflow server --host 127.0.0.1 --port 5000" in msg and "MLFLOW_TRACKING_URI=http://HEAD:5000" in msg
    assert "sqlite:////shared/mlflow.db" in msg
    if uri is None:
        assert "MLflow's default" in msg


@pytest.mark.e2e
def test_a_tracking_uri_with_credentials_passes_and_is_redacted_in_messages(cluster, monkeypatch) -> None:
    from vitvq.launch.orchestration.cluster import ClusterCheckError, check_tracking
    check_tracking("https://alice:s3cret@mlflow.example:5000")  # a server: the same for every node
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns?token=s3cret")
    with pytest.raises(ClusterCheckError) as e:
        check_tracking()
    assert "token=***" in str(e.value) and "s3cret" not in str(e.value) and "(MLFLOW_TRACKING_URI)" in str(e.value)


@pytest.mark.e2e
def test_evaluation_actors_made_in_a_train_worker_sit_outside_its_placement_group(cluster, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_fn() -> dict:
        import ray
        from vitvq.data.pool import ActorPool

        class Probe:  # defined here, so that Ray ships it by value
            def ready(self) -> bool:
                return ray.util.get_current_placement_group() is None

        inside = ray.util.get_current_placement_group() is not None  # the worker itself is in Train's group
        pool = ActorPool(Probe, workers=1, cpus_per_worker=0, startup_timeout=60, what="probe")
        outside = pool.ready_value
        pool.close()
        return {"worker_in_group": inside, "actor_outside": outside}

    trainer = TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="pg", storage_path=str(tmp_path / "ray")))
    result = trainer.fit()
    assert result.return_value == {"worker_in_group": True, "actor_outside": True}


@pytest.mark.e2e
def test_sigterm_to_a_ray_worker_saves_the_step_and_the_run_resumes_it(cluster, tmp_path: Path, make_launch_env,
                                                                       stage1_reference, losses) -> None:
    """SIGTERM to one Train worker process (what a preempted node's shutdown sends): both ranks finish the step and
    save it, Ray restarts the group, it resumes from that checkpoint and ends with the losses of a run that was not
    interrupted (the session's torchrun run, same ranks, bit for bit)."""
    c, nodes = cluster
    assert COMMON == stage1_reference.common
    ref = stage1_reference.out
    out, log_file = tmp_path / "out", tmp_path / "log"
    env = {**make_launch_env(tmp_path / "mlflow"), **RAY_ENV}
    cmd = [sys.executable, str(ROOT / "launch" / "ray_train.py"), "--config", RECIPE, "--workers", "2",
           "--address", c.address, "--max-failures", "1", f"train.out_dir={out}", *COMMON]
    raylet = nodes[1].all_processes["raylet"][0].process.pid
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and '"step": 2,' in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, log_file.read_text()[-6000:]
            time.sleep(0.05)
        workers = [p for p in children(raylet) if "RayTrainWorker" in cmdline(p)]
        assert len(workers) == 1, [cmdline(p) for p in children(raylet)]
        os.kill(workers[0], signal.SIGTERM)
        rc = proc.wait(timeout=300)
    text = log_file.read_text()
    assert rc == 0, text[-8000:]
    stopped = re.search(r"preempted: stopped by (SIGTERM|another rank's signal) after step (\d+) and saved", text)
    assert stopped, text[-8000:]
    step = int(stopped[2])
    assert 2 <= step < 8 and meta_file(out / "checkpoints" / tag_of(step)).is_file()
    assert f"resuming from {tag_of(step)}" in text  # not from an older periodic checkpoint: no step lost
    assert "WorkerStopped" in text
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(1, 9)) and got == want
    from mlflow.tracking import MlflowClient
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    restarts = [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "sys/restarts")]
    assert sorted(restarts) == [(0, 0.0), (step, 1.0)]


def listeners(port: int) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.e2e
def test_a_local_cluster_keeps_its_dashboard_on_localhost_and_needs_no_shared_storage(tmp_path: Path) -> None:
    """``ray_cluster()`` with no address: the dashboard (the job API, which runs any command it is sent) listens on
    127.0.0.1 only; one node needs no shared storage nor a tracking server. (Ray 2.60's GCS, raylet, agents and
    core-worker gRPC servers listen beyond localhost whatever ``ray.init`` is given: see launch/orchestration/ray_train.py.)"""
    script = f"""
import json, sys
from vitvq.launch.orchestration.ray_train import ray_cluster
from vitvq.launch.orchestration.cluster import check_multinode
with ray_cluster(num_cpus=1):
    import ray
    from ray._private.worker import global_worker
    check_multinode({{"train.out_dir": {str(tmp_path / 'x')!r}}}, "sqlite:///mlflow.db")  # one node: passes
    print(json.dumps({{"dashboard": global_worker.node.address_info["webui_url"]}}), flush=True)
    sys.stdin.readline()  # the test reads the sockets meanwhile
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("{"):  # past DeepSpeed's accelerator notice
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-4000:]
        host, _, port = json.loads(line)["dashboard"].rpartition(":")
        assert host == "127.0.0.1" and listeners(int(port)) == ["0100007F"]  # 127.0.0.1, and nothing else
        assert not (tmp_path / "x").exists()  # one node: returned at once, nothing written
    finally:
        proc.communicate("\n", timeout=120)
    assert proc.returncode == 0


# -- last: a third node that sees another file system at the same path ---------------------------
@pytest.mark.e2e
def test_a_folder_one_node_cannot_see_is_refused_naming_it_and_the_node(cluster, tmp_path: Path) -> None:
    from vitvq.launch.orchestration.cluster import ClusterCheckError, alive_nodes, check_multinode
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a node with its own mount namespace")
    c, _ = cluster
    local = tmp_path / "nodelocal"
    local.mkdir()
    before = {n["NodeID"] for n in alive_nodes()}
    ray_bin = str(Path(sys.executable).parent / "ray")
    node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             f"mount -t tmpfs vitvq-nodelocal {local} && exec {ray_bin} start --address {c.address} "
                             f"--num-cpus 1 --block --disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while len(alive_nodes()) < 3:
            assert node.poll() is None and time.time() < deadline, "the third node did not join"
            time.sleep(0.2)
        third = next(n for n in alive_nodes() if n["NodeID"] not in before)
        shared = tmp_path / "shared"
        with pytest.raises(ClusterCheckError) as e:
            check_multinode({"train.out_dir": local / "run", "--storage": shared},
                            f"sqlite:///{shared / 'db' / 'mlflow.db'}")
        msg = str(e.value)
        assert f"train.out_dir = {local / 'run'}: not visible from " in msg and third["NodeID"][:8] in msg
        assert "  --storage = " not in msg  # the shared folder passed
        assert "same storage at the same path" in msg
        assert not [p for p in (local / "run").iterdir()]  # its token removed
        with pytest.raises(ClusterCheckError, match=r"MLFLOW_TRACKING_URI=sqlite:///.*\(its folder\)"):
            check_multinode({"--storage": shared}, f"sqlite:///{local / 'db' / 'mlflow.db'}")
    finally:
        os.killpg(node.pid, signal.SIGTERM)  # `ray start --block` stops the node it started
        node.wait(timeout=60)
