"""A pool of Ray actors that each hold a model loaded once and run bulk jobs over slices of a dataset.

Token encoding (``data/encode.py``), evaluation (``evaluation/workers.py``: Inception statistics, rFID, also in the
background of a training) and sampling use it. It sits in ``data/``, the lowest layer that runs such jobs, rather than
with the orchestration in ``launch/orchestration/``: the single-job Trainer's background evaluator and the encoder,
both below that layer, start pools too. It imports nothing of vitvq. A worker class implements three methods:

    start(job, rank, world_size) -> int        # take slice ``rank`` of ``world_size``; its number of items
    step(max_batches) -> (items done, finished)
    result() -> partial                        # partials merge with ``+``, so the total is the same for any N

The driver starts every worker at once, polls whichever reports first (one tqdm bar with rate and ETA over
all of them) and adds the partials up in worker order.

Written here rather than with ``ray.util.ActorPool``: that maps independent tasks over actors, while these jobs
keep per-worker state (a slice, running sums) across many small calls so the driver can show progress, and
``workers=0`` runs the very same code in this process without Ray (tests, debugging, one GPU). A pool's resources
are declared once, in ``configs/pool.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Optional

import numpy as np
from tqdm import tqdm


def start_local_ray(**init_kwargs: Any) -> str:
    """``ray.init`` of a local cluster in a short temp dir (Ray's socket paths must stay under 107 characters);
    returns the dir, which the caller removes after ``ray.shutdown()``. A start that fails stops whatever it had
    started and removes the dir, so a failed start leaves nothing behind."""
    import ray
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        ray.init(_temp_dir=tmp, **init_kwargs)
    except BaseException:
        try:
            ray.shutdown()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


class ActorPool:
    """``workers`` Ray actors of ``worker_cls(*args)`` (a local cluster, or the one at ``address``), or one
    in-process instance (``workers=0``). ``ready`` names a method every worker answers once it is up; the first
    answer is kept as ``self.ready_value``."""

    def __init__(self, worker_cls: type, args: tuple = (), workers: int = 1, address: Optional[str] = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0, startup_timeout: float = 600,
                 ready: str = "ready", what: str = "worker"):
        self.workers, self.what, self._ray, self._owns_ray, self._tmp = workers, what, None, False, None
        if workers == 0:
            self.handles: list[Any] = [worker_cls(*args)]
        else:
            import ray
            self._ray, self.handles = ray, []
            if not ray.is_initialized():
                if address:
                    ray.init(address=address)
                else:
                    self._tmp = start_local_ray(num_cpus=max(1, int(np.ceil(workers * cpus_per_worker))),
                                                include_dashboard=False)
                self._owns_ray = True
            try:
                self.handles = self._create(ray, worker_cls, args, workers, cpus_per_worker, gpus_per_worker)
            except BaseException:  # e.g. resources Ray refuses: stop the cluster we started, remove its folder
                self.close()
                raise
        self.ready_value: Any = self._started(ready, startup_timeout)

    @staticmethod
    def _create(ray: Any, worker_cls: type, args: tuple, workers: int, cpus_per_worker: float,
                gpus_per_worker: float) -> list[Any]:
        # "DEFAULT" places the actors outside any placement group, even when this pool is made inside one (rank 0
        # of a Ray Train run hands checkpoints to it): they take free resources of the cluster, never a bundle
        # reserved for Train's workers. Ray 2.60's Train V2 creates its workers without capturing child tasks
        # (PlacementGroupSchedulingStrategy(..., placement_group_capture_child_tasks=None)), so this is what Ray
        # would do too; the explicit option keeps it so if a caller or a Ray version captures.
        actor = ray.remote(worker_cls).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                               scheduling_strategy="DEFAULT")
        return [actor.remote(*args) for _ in range(workers)]

    def _started(self, method: str, timeout: float) -> Any:
        """Wait for every worker to be up (its model loaded); the first worker's answer to ``method``."""
        refs = [self._call(h, method) for h in self.handles]
        if self._ray is None:
            return refs[0]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):  # actors left pending: the cluster lacks the CPUs/GPUs they ask for
            free = self._ray.available_resources()
            self.close()
            raise RuntimeError(f"only {len(ready)} of {len(refs)} {self.what} actors started within {timeout:.0f} s; "
                               f"each asks for cpus_per_worker/gpus_per_worker, and the cluster has {free} free")
        return self._ray.get(refs[0])

    def _call(self, handle: Any, method: str, *args: Any) -> Any:
        fn = getattr(handle, method)
        return fn.remote(*args) if self._ray is not None else fn(*args)  # a Ray future, or the value itself

    def _get(self, ref: Any) -> Any:
        return self._ray.get(ref) if self._ray is not None else ref

    def run(self, job: Any, desc: str = "job", progress: bool = True, unit: str = "img",
            batches_per_call: int = 2) -> Any:
        """Run ``job`` over all workers; the sum of their partials in worker order."""
        world = len(self.handles)
        starts = [self._call(h, "start", job, r, world) for r, h in enumerate(self.handles)]  # all at once
        counts = [self._get(ref) for ref in starts]
        bar = tqdm(total=sum(counts), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
        pending = {i: self._call(h, "step", batches_per_call) for i, h in enumerate(self.handles)}
        while pending:
            if self._ray is not None:  # whichever worker reports first; the others keep working meanwhile
                ready, _ = self._ray.wait(list(pending.values()), num_returns=1)
                i = next(k for k, v in pending.items() if v == ready[0])
            else:
                i = next(iter(pending))
            n, finished = self._get(pending.pop(i))
            bar.update(n)
            if not finished:
                pending[i] = self._call(self.handles[i], "step", batches_per_call)
        bar.close()
        parts = [self._get(self._call(h, "result")) for h in self.handles]
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    def close(self) -> None:
        if self._ray is not None:
            for h in self.handles:
                self._ray.kill(h)
            if self._owns_ray:
                self._ray.shutdown()  # disconnects, and stops the local cluster we started (never `ray stop`)
                if self._tmp:
                    shutil.rmtree(self._tmp, ignore_errors=True)
            self._ray = None
        self.handles = []


__all__ = ["ActorPool"]
