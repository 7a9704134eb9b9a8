"""Training on Ray Train V2: the function every Train worker runs, and the ``TorchTrainer`` around it.

``launch/ray_train.py`` is the command line; :func:`fit` checks what several nodes need (``launch/orchestration/cluster.py``) and
builds the ``TorchTrainer`` (fixed or elastic size, failure and checkpoint policy); each worker runs
:func:`train_loop`, which rebuilds the job config and calls the very same ``vitvq.trainer.trainer.train(cfg)`` that
``torchrun`` and ``deepspeed`` run. Ray Train has set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR and initialised
``torch.distributed`` (gloo on CPUs, NCCL on GPUs) before the function starts, so ``init_distributed`` joins that
group and DeepSpeed's communication uses it.

Our ``CheckpointManager`` in ``train.out_dir`` stays the one record of the latest checkpoint: Ray only gets a small
pointer checkpoint per save and is checked against ours after a restart (:func:`resume_note`), and an elastic range
restarts the group at a new size from that checkpoint, so :func:`batch_problem` refuses up front a size that cannot
keep the global batch. SIGTERM to a worker stops at a step, saved, as under ``torchrun``: Ray runs the train function
off the main thread, so :func:`on_actor_main_thread` lets ``StopRequest`` install its handlers there, and
:class:`WorkerStopped` makes Ray restart the group from that step. What was probed on Ray 2.60 behind these choices
(Ray's own SIGTERM handling, pointer retention, listening sockets): README, "Design notes".

Secrets never travel in what Ray records (issue 20, item 3): Ray 2.60's runtime-env agent logs every runtime env it
creates, env_vars values included ("Creating runtime env: ..." in ``runtime_env_agent.log``, which the dashboard
serves), and Ray Train records ``train_loop_config`` in its run state. So the runtime env forwards only variables
whose values ``configs/redact.py`` leaves alone, ``train_loop_config`` holds the redacted config, and the real
config and secret variables go to the workers as one object in the object store (:func:`train_loop` reads it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from vitvq.configs import from_dict, to_dict
from vitvq.configs.redact import redact, redact_config
from vitvq.trainer.checkpoint import CheckpointManager
from vitvq.launch.orchestration.cluster import check_multinode, check_visible_everywhere
from vitvq.trainer.engine import free_port
from vitvq.trainer.task import stage_classes
from vitvq.data.pool import start_local_ray

POINTER_FILE = "vitvq_checkpoint.json"
"""The one file of a checkpoint reported to Ray: which of our checkpoints it stands for."""

FORWARD_ENV = ("MLFLOW_", "VITVQ_", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS")
"""Driver environment (names or prefixes) that Ray workers get through the job's runtime env: workers on a cluster
started elsewhere do not inherit the driver's environment (tracking URI, fault injection in tests, JIT cache)."""

Workers = Union[int, tuple[int, int]]


# -- before anything starts -----------------------------------------------------------------------
def parse_workers(spec: str) -> Workers:
    """``"4"`` -> 4 (fixed); ``"2-8"`` -> (2, 8) (elastic: any size in between, as the cluster allows)."""
    try:
        lo, _, hi = spec.partition("-")
        n = (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        raise ValueError(f"--workers {spec!r}: write N or MIN-MAX, e.g. --workers 2 or --workers 1-4") from None
    sizes = n if isinstance(n, tuple) else (n, n)
    if sizes[0] < 1 or sizes[1] < sizes[0]:
        raise ValueError(f"--workers {spec!r}: sizes must be >= 1 and MIN <= MAX")
    return n


def batch_problem(train_cfg: Any, workers: Workers) -> Optional[str]:
    """Why some size in ``workers`` cannot keep ``train.global_batch_size`` (= micro x world x accumulation), with
    the fix; None when every size can."""
    lo, hi = workers if isinstance(workers, tuple) else (workers, workers)
    g, m = train_cfg.global_batch_size, train_cfg.micro_batch_size
    sizes = range(lo, hi + 1)
    bad = [n for n in sizes if g % (m * n)]
    if not bad:
        return None
    unit = m * math.lcm(*sizes)
    fits = [n for n in sizes if n not in bad]
    return (f"train.global_batch_size={g} cannot be kept at {bad} worker(s): it must be divisible by "
            f"train.micro_batch_size={m} x workers at every size of --workers {lo}-{hi}. Set "
            f"train.global_batch_size={math.ceil(g / unit) * unit} (a multiple of {unit})"
            + (f", or use only sizes in {fits}" if fits else "") + ", or change train.micro_batch_size")


def check_request(train_cfg: Any, workers: Workers, gpus_per_worker: float) -> None:
    """Refuse (ValueError, with the fix) what cannot run: a size that cannot keep the global batch, or a worker
    that is not one rank on one device."""
    problem = batch_problem(train_cfg, workers)
    if problem:
        raise ValueError(problem)
    if gpus_per_worker not in (0, 1):  # a DeepSpeed rank drives one device, cuda:LOCAL_RANK
        raise ValueError(f"--gpus-per-worker {gpus_per_worker:g}: each worker is one data-parallel rank on one GPU; "
                         f"use 1 (or 0 for CPU ranks) and more workers")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if any(k == p or (p.endswith("_") and k.startswith(p))
                                                       for p in FORWARD_ENV)}


def split_secrets(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(public, secret)``: a variable is secret when its name looks secret or redaction changes its value
    (``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_URI=https://user:pw@host``). Only ``public`` may enter a Ray
    runtime env."""
    public = {k: v for k, v in env.items() if redact(v, k) == v}
    return public, {k: v for k, v in env.items() if k not in public}


@contextlib.contextmanager
def ray_cluster(address: Optional[str] = None, num_cpus: Optional[float] = None,
                num_gpus: Optional[float] = None) -> Iterator[None]:
    """Connect to the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one in a short temp dir (Ray's
    socket paths must stay under 107 characters) and stop it on exit. Never ``ray stop``: that kills every Ray
    process on the host. A driver already connected (tests, notebooks) is used as it is."""
    import ray
    if ray.is_initialized():
        yield
        return
    # Inside a Ray job (launch/submit.py) the job's runtime env already carries the environment; a second one
    # naming the same variables is refused by Ray ("Failed to merge the Job's runtime env"), echoing their values.
    in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    runtime_env = None if in_job else {"env_vars": split_secrets(forwarded_env())[0]}  # secrets: see fit()
    tmp = None
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # With the dashboard (on localhost, a free port) Ray Train's placement-group cleaner can read the state
        # API; without it, it warns "Failed to query Ray Train Controller actor state" every few seconds.
        # The dashboard (which runs any job it is sent) on 127.0.0.1. The rest of Ray cannot be kept on localhost:
        # see the module docstring.
        tmp = start_local_ray(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                              dashboard_host="127.0.0.1", dashboard_port=free_port(), runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# -- in every Train worker ------------------------------------------------------------------------
def read_pointer(checkpoint: Any) -> Optional[dict[str, Any]]:
    """The content of a pointer checkpoint reported by :func:`train_loop` (None: no checkpoint, or not ours)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / POINTER_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def resume_note(out_dir: Path, ray_pointer: Optional[dict[str, Any]]) -> Optional[str]:
    """What a (re)starting worker says about where it resumes: our ``latest`` (the Trainer resumes from it) against
    Ray's ``get_checkpoint()``; None on a fresh run. Refuses when Ray names a checkpoint that ``out_dir`` lacks (the
    Trainer itself refuses an ``out_dir`` that is not the same storage on every rank)."""
    found = CheckpointManager(out_dir).latest()
    ours = found[0] if found else None
    theirs = ray_pointer.get("tag") if ray_pointer and ray_pointer.get("out_dir") == str(out_dir) else None
    if theirs and ours is None:
        raise RuntimeError(f"Ray's latest checkpoint names {theirs} in {out_dir}, which holds no complete checkpoint: "
                           f"train.out_dir must be on storage every node sees, and kept between restarts")
    if ray_pointer and not theirs:
        return (f"Ray's latest checkpoint belongs to another out_dir ({ray_pointer.get('out_dir')}), ignored; "
                + (f"resuming from {ours} (checkpoints/latest)" if ours else "starting fresh"))
    if ours is None:
        return None
    if theirs == ours:
        return f"resuming from {ours} (checkpoints/latest; Ray's latest checkpoint agrees)"
    older = theirs and ray_pointer.get("step", -1) < found[1]["step"]  # by the steps recorded, not the names
    lag = ": Ray had not registered the newer report before the failure" if older else ""
    return (f"resuming from {ours} (checkpoints/latest, the source of truth); Ray's latest checkpoint is "
            f"{theirs or 'none'}{lag}")


_ON_MAIN: dict[str, Callable[[], Any]] = {}
"""Functions waiting for this process's main thread (:func:`on_actor_main_thread`), by key."""


def _run_registered(key: str) -> Any:
    return _ON_MAIN.pop(key)()


def on_actor_main_thread(fn: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """Run ``fn`` on the main thread of this Ray Train worker's process and return its result, from the thread that
    runs the train function. A Train worker is a synchronous actor: its tasks run on the main thread, which is free
    while the train function runs. ``fn`` stays in this process (only its key travels), so what it changes is ours."""
    import ray
    key = secrets.token_hex(8)
    _ON_MAIN[key] = fn
    try:
        me = ray.get_runtime_context().current_actor
        return ray.get(me.execute.remote(_run_registered, key), timeout=timeout_s)
    finally:
        _ON_MAIN.pop(key, None)


class WorkerStopped(RuntimeError):
    """A worker stopped at a step on a signal (SIGTERM) and saved it; Ray restarts the group from that checkpoint."""


def train_loop(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The function every Ray Train worker runs: ``config`` holds the stage, the job config as a dict and the
    driver's working directory. Returns rank 0's ``train()`` result (Ray hands it back as ``Result.return_value``)."""
    import ray
    import ray.train
    from vitvq.trainer.preemption import Preempted, StopRequest
    from vitvq.trainer.trainer import train

    # The real config and the secret variables (fit() put them in the object store; config["config"] is masked).
    private = ray.get(config["private"]) if "private" in config else {"config": config["config"], "env": {}}
    os.environ.update(private["env"])
    cfg_cls, _ = stage_classes(config["stage"])
    cfg = from_dict(cfg_cls, private["config"])
    if config.get("cwd") and Path(config["cwd"]).is_dir():
        # Relative paths of the config (data, tokenizer, MLflow's sqlite:///mlflow.db) mean what they mean for the
        # plain launchers; Ray Train would otherwise run the function in its own run folder.
        os.chdir(config["cwd"])
    rank = ray.train.get_context().get_world_rank()
    out_dir = Path(cfg.train.out_dir)
    note = resume_note(out_dir, read_pointer(ray.train.get_checkpoint()))
    if note and rank == 0:
        print(f"ray_train: {note}", flush=True)

    def report(step: int, tag: str, folder: Path, metrics: dict[str, float]) -> None:
        meta = {"step": step, "checkpoint": tag, "world_size": ray.train.get_context().get_world_size()}
        if rank != 0:  # every rank reports (a barrier); rank 0's metrics and checkpoint are the ones kept
            ray.train.report({**metrics, **meta}, checkpoint=None, checkpoint_dir_name=tag)
            return
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / POINTER_FILE).write_text(json.dumps({"tag": tag, "step": step, "out_dir": str(out_dir),
                                                              "path": str(folder), "world_size": meta["world_size"]}))
            ray.train.report({**metrics, **meta}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=tag)

    StopRequest.main_thread = on_actor_main_thread  # SIGTERM stops at the step, saved, as under torchrun
    try:
        result = train(cfg, on_checkpoint=report)
    except Preempted:  # every rank saved the step it stopped at; a worker error makes Ray restart the group
        step = CheckpointManager(out_dir).latest()
        raise WorkerStopped(f"stopped by a signal after saving {step[0] if step else 'no checkpoint'} in {out_dir}; "
                            f"Ray restarts the worker group from it (one of --max-failures), or rerun to resume")
    return result if rank == 0 else None


# -- on the driver --------------------------------------------------------------------------------
def fit(cfg: Any, workers: Workers, *, gpus_per_worker: float = 0, cpus_per_worker: float = 1,
        storage: Optional[str] = None, name: Optional[str] = None, max_failures: int = 0,
        resize_interval_s: float = 60.0) -> Any:
    """Train ``cfg`` on Ray Train; returns Ray's ``Result`` (``return_value``: rank 0's ``train()`` result).

    ``storage`` defaults to ``<out_dir>/ray`` and ``name`` to the recipe: the same command resumes the same Ray
    run (and, through our ``latest``, the same checkpoint and MLflow run)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_request(cfg.train, workers, gpus_per_worker)
    out_dir = Path(cfg.train.out_dir).resolve()
    storage_path = Path(storage).resolve() if storage else out_dir / "ray"
    folders = {"train.out_dir": out_dir, "--storage": storage_path}
    if cfg.train.tracking:  # storage every node sees, and one MLflow store for all of them (launch/orchestration/cluster.py)
        check_multinode(folders)
    else:
        check_visible_everywhere(folders)
    # Ray Train's print patch copies every print of the workers into its own logs and still prints it: each line
    # (the progress bar, the resume notes) would reach the driver twice. Propagated to the workers by Ray.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    config = to_dict(cfg)
    config["train"]["out_dir"] = str(out_dir)  # the workers' working directory may differ from ours
    scaling = ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if gpus_per_worker else {})},
                            elastic_resize_monitor_interval_s=resize_interval_s)
    run = RunConfig(name=name or cfg.recipe, storage_path=str(storage_path),
                    failure_config=FailureConfig(max_failures=max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last))
    # Ray Train creates the process group (init_distributed then joins it): give it our collective timeout.
    # Not in train_loop_config (Ray Train records it): the config's secrets and the secret variables, which workers
    # on a cluster started elsewhere do not inherit. The reference lives as long as this driver waits in fit().
    private = ray.put({"config": config, "env": split_secrets(forwarded_env())[1]})
    loop_config = {"stage": cfg.stage, "config": redact_config(config), "cwd": os.getcwd(), "private": private}
    trainer = TorchTrainer(train_loop, train_loop_config=loop_config,
                           torch_config=TorchConfig(timeout_s=cfg.train.dist_timeout_s), scaling_config=scaling,
                           run_config=run)
    result = trainer.fit()
    prune_pointers(result)
    return result


def prune_pointers(result: Any) -> list[Path]:
    """Delete pointer checkpoints that Ray does not keep (uploaded, never registered); returns them. Only for
    local (or mounted) storage; the controller is done, so nothing else is writing there."""
    root = Path(result.path)
    if not root.is_dir():
        return []
    keep = {Path(c.path).name for c, _ in (result.best_checkpoints or [])}
    if result.checkpoint is not None:
        keep.add(Path(result.checkpoint.path).name)
    stale = [d for d in root.iterdir() if d.is_dir() and (d / POINTER_FILE).is_file() and d.name not in keep]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


__all__ = ["POINTER_FILE", "parse_workers", "split_secrets", "batch_problem", "check_request", "ray_cluster", "read_pointer", "resume_note",
           "on_actor_main_thread", "WorkerStopped", "train_loop", "fit", "prune_pointers"]
