"""Train either stage on Ray Train V2: fixed or elastic size, restarts from our checkpoints after failures.

    python launch/ray_train.py --config configs/stage1/debug.yaml --workers 2                  # local Ray cluster
    python launch/ray_train.py --config configs/stage1/vit_ss_imagenet.yaml --workers 4-8 --gpus-per-worker 1 \\
        --address auto --max-failures 3 train.out_dir=/shared/runs/vit_ss data.train_shards=...
    python launch/ray_train.py --config configs/stage2/demo.yaml --workers 2 tokenizer=... tokens.train_tokens=...

``--workers MIN-MAX`` is elastic: Ray starts with as many workers as fit (up to MAX), and restarts the group at
a new size when nodes come or go; every size in the range must keep ``train.global_batch_size`` (checked here,
before anything starts). The stage comes from ``--stage``, else from the folder of the recipe
(``configs/stage1/``, ``configs/stage2/``), else from the one job schema the recipe loads with. A local Ray
cluster (temp files in a short folder under /tmp) is started unless ``--address`` or ``RAY_ADDRESS`` names one.
``train.out_dir`` must be on storage every node sees; Ray's own records go to ``--storage`` (default
``<out_dir>/ray``). Rerunning the same command resumes the same checkpoint and MLflow run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from vitvq.configs import ConfigError
from vitvq.trainer.cli import parse_config, print_summary
from vitvq.trainer.config import load_job_config
from vitvq.trainer.task import STAGES, stage_classes


def detect_stage(path: str, overrides: list[str]) -> str:
    """The recipe's stage: its folder's name if that is a stage, else the one schema that loads it."""
    folder = Path(path).resolve().parent.name
    if folder in STAGES:
        return folder
    fits = []
    for name in STAGES:
        try:
            load_job_config(stage_classes(name)[0], path, overrides)
            fits.append(name)
        except (ConfigError, FileNotFoundError):
            pass
    if len(fits) != 1:
        sys.exit(f"error: cannot tell the stage of {path} (it loads as {fits or 'none of'} {sorted(STAGES)}); "
                 f"pass --stage")
    return fits[0]


def main(argv: Optional[list[str]] = None) -> Any:
    from vitvq.launch.orchestration import ray_train
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/stage1/debug.yaml")
    parser.add_argument("--workers", default="1", help="N, or MIN-MAX for an elastic run (default 1)")
    parser.add_argument("--stage", choices=sorted(STAGES), help="job schema (default: from the recipe's folder)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="0 (CPU ranks) or 1")
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--storage", help="Ray Train storage_path, visible from every node (default <out_dir>/ray)")
    parser.add_argument("--name", help="Ray Train run name (default: the recipe's name)")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="worker-group failures (crashes, lost nodes) to restart from (-1: no limit)")
    parser.add_argument("--resize-interval", type=float, default=60.0,
                        help="elastic: seconds between checks whether the cluster fits another size")
    parser.add_argument("--address", help="Ray cluster to join (default RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    stage = args.stage or detect_stage(args.config, args.overrides)
    cfg = parse_config(stage_classes(stage)[0], args.config, args.overrides)
    try:  # before anything starts: the sizes, the global batch at each of them, one device per worker
        workers = ray_train.parse_workers(args.workers)
        ray_train.check_request(cfg.train, workers, args.gpus_per_worker)
    except ValueError as e:
        sys.exit(f"error: {e}")
    most = workers[1] if isinstance(workers, tuple) else workers
    with ray_train.ray_cluster(args.address, num_cpus=most * args.cpus_per_worker):
        from ray.train import TrainingFailedError
        from vitvq.launch.orchestration.cluster import ClusterCheckError
        try:
            result = ray_train.fit(cfg, workers, gpus_per_worker=args.gpus_per_worker,
                                   cpus_per_worker=args.cpus_per_worker, storage=args.storage, name=args.name,
                                   max_failures=args.max_failures, resize_interval_s=args.resize_interval)
        except ClusterCheckError as e:  # what a multi-node run needs (shared storage, a tracking store for all)
            sys.exit(f"error: {e}")
        except TrainingFailedError as e:  # out of --max-failures: our latest checkpoint is where a rerun resumes
            print(f"error: training failed on Ray ({type(e).__name__}): {e}\nrerun the same command to resume "
                  f"from the latest checkpoint in {cfg.train.out_dir}", file=sys.stderr, flush=True)
            from vitvq.trainer.preemption import PREEMPTED_EXIT  # stopped by a signal, step saved: as under torchrun
            sys.exit(PREEMPTED_EXIT if "WorkerStopped" in str(e) else 1)
    if result.return_value:  # rank 0's train() result
        print_summary(result.return_value)
    return result


if __name__ == "__main__":
    main()
