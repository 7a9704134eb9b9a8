"""What Ray Train costs and what it buys: restart times after failures, and throughput against torchrun.

    python benchmarks/ray_restart.py                       # debug recipe, 2-node local cluster, CPU: about 5 min
    python benchmarks/ray_restart.py --steps 60 --skip restart

Everything runs the real launchers in subprocesses on a multi-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: a head without CPUs and two 1-CPU nodes, as in tests/trainer/test_ray_train.py):
- throughput: ``torchrun`` and ``launch/ray_train.py`` with the same ranks (1, then 2), side by side, alternating;
  the median step time of the steps after ``--warmup`` (checkpoint only at the end), as images/s, and the ratio
  Ray / torchrun; the whole command's wall time too (Ray adds its cluster connection and worker start);
- worker crash: ``VITVQ_INJECT_FAULT=step@6`` (once) with ``--max-failures 1``: seconds from the last step before
  the fault to the first step after the restart (which resumes the step-4 checkpoint and redoes steps 5-6);
- node loss: a ``1-2`` elastic run loses a node after its step-4 checkpoint: seconds from the removal to the first
  step on the one remaining worker (Ray's view of the cluster lags after a node dies, so the first restart may
  wait out ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, set to ``--start-timeout``).
Times come from the timestamps of the MLflow metrics (SQLite store in a temp folder) that rank 0 logs each step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ("train.progress=false", "train.val_every=0", "train.image_every=100000", "data.mode=epoch",
          "data.shuffle_buffer=16")


def env_for(folder: Path, start_timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
               MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5",
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=str(start_timeout))
    return env


def metric(env: dict, key: str) -> list[tuple[float, int, float]]:
    """(timestamp s, step, value) of ``key`` in the one run of the store, in logging order."""
    from vitvq.trainer.tracking import mlflow_client
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    hist = client.get_metric_history(runs[0].info.run_id, key)
    return sorted((m.timestamp / 1000, m.step, m.value) for m in hist)


def ray_cmd(address: str, out: Path, recipe: str, workers: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch/ray_train.py"), "--config", recipe, "--workers", workers,
            "--address", address, f"train.out_dir={out}", *COMMON, *args]


def torchrun_cmd(out: Path, recipe: str, ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            str(ROOT / "launch/train_stage1.py"), "--config", recipe, f"train.out_dir={out}", *COMMON, *args]


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return time.time() - t0


def throughput(address: str, tmp: Path, args: argparse.Namespace) -> list[tuple]:
    """Per (launcher, ranks): median images/s over the steady steps, and the command's wall time."""
    steps = (f"train.steps={args.steps}", f"train.ckpt_every={args.steps}")
    rows = []
    for ranks in (1, 2):
        for launcher in ("torchrun", "ray"):
            folder = tmp / f"{launcher}{ranks}"
            folder.mkdir()
            env = env_for(folder, args.start_timeout)
            cmd = (torchrun_cmd(folder / "out", args.config, ranks, *steps) if launcher == "torchrun"
                   else ray_cmd(address, folder / "out", args.config, str(ranks), *steps))
            wall = timed(cmd, env)
            step_s = [v for _, s, v in metric(env, "perf/step_s") if args.warmup < s < args.steps]
            images = [v for _, s, v in metric(env, "perf/images_per_s") if args.warmup < s < args.steps]
            rows.append((launcher, ranks, statistics.median(images), statistics.median(step_s), wall))
            print(f"  {launcher:<8} {ranks} rank(s): {rows[-1][2]:.1f} images/s, {wall:.0f} s wall", flush=True)
    return rows


def restart_after(env: dict, t_fail: float | None) -> tuple[float, int]:
    """(seconds from the failure to the first step after the restart, that step). The restart is where
    ``sys/restarts`` becomes 1; without ``t_fail`` the failure is the last step logged before it."""
    t_restart = next(t for t, _, v in metric(env, "sys/restarts") if v >= 1)
    losses = metric(env, "train/total_loss")
    if t_fail is None:
        t_fail = max(t for t, _, _ in losses if t < t_restart)
    t_first, step, _ = next(row for row in losses if row[0] > t_restart)
    return t_first - t_fail, step


def worker_crash(address: str, tmp: Path, args: argparse.Namespace) -> tuple[float, int]:
    folder = tmp / "crash"
    folder.mkdir()
    env = {**env_for(folder, args.start_timeout), "VITVQ_INJECT_FAULT": "step@6",
           "VITVQ_INJECT_FAULT_ONCE": str(folder / "fired")}
    timed(ray_cmd(address, folder / "out", args.config, "2", "--max-failures", "1", "train.steps=8",
                  "train.ckpt_every=4"), env)
    return restart_after(env, None)


def node_loss(cluster, node, tmp: Path, args: argparse.Namespace) -> tuple[float, int]:
    folder = tmp / "node"
    folder.mkdir()
    env = env_for(folder, args.start_timeout)
    out = folder / "out"
    cmd = ray_cmd(cluster.address, out, args.config, "1-2", "--max-failures", "1", "train.steps=12",
                  "train.ckpt_every=4")
    with open(folder / "log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        latest = out / "checkpoints" / "latest"
        while not (latest.is_file() and latest.read_text().strip() == "step_00000004"):
            if proc.poll() is not None:
                raise RuntimeError(f"the elastic run ended early:\n{(folder / 'log').read_text()[-4000:]}")
            time.sleep(0.05)
        t_fail = time.time()
        cluster.remove_node(node, allow_graceful=False)
        if proc.wait() != 0:
            raise RuntimeError(f"the elastic run failed:\n{(folder / 'log').read_text()[-4000:]}")
    return restart_after(env, t_fail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/stage1/debug.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="steps of each throughput run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--start-timeout", type=float, default=15.0,
                        help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default is 60)")
    parser.add_argument("--skip", choices=["throughput", "restart"], action="append", default=[])
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths stay under 107 characters
    os.environ["RAY_TMPDIR"] = str(tmp)  # Cluster's address file goes here, not to /tmp/ray
    (tmp / "ray").mkdir()
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": str(tmp / "ray"),
                                                                "include_dashboard": False})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        rows = [] if "throughput" in args.skip else throughput(cluster.address, tmp, args)
        crash = node = None
        if "restart" not in args.skip:
            crash = worker_crash(cluster.address, tmp, args)
            node = node_loss(cluster, nodes[1], tmp, args)
    finally:
        if cluster is not None:
            cluster.shutdown()  # this cluster's processes only (never `ray stop`)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nRay Train overhead, recipe {Path(args.config).name}, {args.steps} steps, medians of steps > "
          f"{args.warmup}, CPU ranks of one thread on a {os.cpu_count()}-core machine")
    print(f"{'ranks':>5} | {'torchrun img/s':>14} | {'ray img/s':>9} | {'ray/torchrun':>12} | "
          f"{'torchrun wall s':>15} | {'ray wall s':>10}")
    by = {(launcher, ranks): row for launcher, ranks, *row in rows}
    for ranks in (1, 2):
        if ("torchrun", ranks) in by:
            t, r = by["torchrun", ranks], by["ray", ranks]
            print(f"{ranks:>5} | {t[0]:>14.1f} | {r[0]:>9.1f} | {r[0] / t[0]:>12.3f} | {t[2]:>15.1f} | {r[2]:>10.1f}")
    if crash:
        print(f"\nworker crash (step@6, 2 workers):  {crash[0]:.1f} s from the fault to step {crash[1]} after the "
              f"restart (resumed step 4)")
    if node:
        print(f"node loss (1-2 elastic, 2 -> 1):    {node[0]:.1f} s from the removal to step {node[1]} on one worker "
              f"(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S={args.start_timeout:g})")


if __name__ == "__main__":
    main()
