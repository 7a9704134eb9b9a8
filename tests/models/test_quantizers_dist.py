"""Codebook synchronization over a real 2-process gloo group (CPU, about 10 s).

The test starts this file twice as a script (one process per rank, rendezvous through a FileStore); each rank
quantizes a DIFFERENT, unevenly sized slice of the same global batches with ``dist.all_reduce`` injected.
The parent then checks that both ranks hold bit-identical codebooks, equal to a single process fed the whole
global batch, with global perplexity/usage, and that dead-code restarts stay in lockstep.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

from vitvq.models.quantizers import QuantizerConfig, build_quantizer

DIM, STEPS, SPLIT = 6, 4, 3  # rank 0 gets the first SPLIT images of each 5-image global batch, rank 1 the rest
SCENARIOS = {
    "ema": dict(kind="ema", codebook_size=16, code_dim=4, ema_decay=0.9),
    "ema-raw": dict(kind="ema", codebook_size=16, code_dim=DIM, factorize=False, l2_norm=False, ema_decay=0.8),
    "residual-ema": dict(kind="residual", residual_kind="ema", residual_depth=2, codebook_size=8, code_dim=4,
                         l2_norm=False, ema_decay=0.9),
    "vq-restart": dict(kind="vq", codebook_size=8, code_dim=DIM, factorize=False, l2_norm=False,
                       restart_dead_codes=True, restart_every=3),
    "ema-restart": dict(kind="ema", codebook_size=32, code_dim=4, restart_dead_codes=True, restart_every=2,
                        dead_threshold=3.0),
}


KMEANS = {
    "kmeans-vq": dict(kind="vq", codebook_size=12, code_dim=4, init="kmeans", kmeans_iters=5),
    "kmeans-ema-raw": dict(kind="ema", codebook_size=12, code_dim=DIM, factorize=False, l2_norm=False,
                           init="kmeans", kmeans_iters=5),
    "kmeans-residual": dict(kind="residual", residual_depth=2, codebook_size=6, code_dim=DIM, factorize=False,
                            l2_norm=False, init="kmeans", kmeans_iters=5),
}


def kmeans_points(rank: int, dim: int) -> torch.Tensor:
    """(40, dim) lookup-space points, different on each rank: clusters around rank-specific centres."""
    g = torch.Generator().manual_seed(100 + rank)
    centres = torch.randn(6, dim, generator=g) * 3
    return centres[torch.arange(40) % 6] + 0.1 * torch.randn(40, dim, generator=g)


def build(name: str):
    torch.manual_seed(0)  # identical initial state on every rank and in the reference process
    q = build_quantizer(QuantizerConfig(**SCENARIOS[name]), DIM).train()
    if name == "vq-restart":  # codes 4..7 far from the data: dead until restarted
        with torch.no_grad():
            q.codebook.weight[4:] += 100.0
    return q


def global_batch(step: int) -> torch.Tensor:
    return torch.randn(5, DIM, 2, 3, generator=torch.Generator().manual_seed(step))  # (B, D, h, w)


def shard(step: int, rank: int) -> torch.Tensor:
    z = global_batch(step)
    return z[:SPLIT] if rank == 0 else z[SPLIT:]


def run(q, batches, all_reduce=None, rank: int = 0, world_size: int = 1) -> dict:
    q.set_all_reduce(all_reduce, rank=rank, world_size=world_size)
    for step, z in enumerate(batches, start=1):
        q.set_step(step)
        out = q(z)
        q.commit()
        q.end_step(step)
    return {"state": {k: v.clone() for k, v in q.state_dict().items()}, "stats": out.stats}


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    results, quantizers = {}, {}
    for name in SCENARIOS:
        quantizers[name] = build(name)
        results[name] = run(quantizers[name], [shard(s, rank) for s in range(1, STEPS + 1)],
                            lambda t: dist.all_reduce(t), rank, world_size)
    for name, cfg in KMEANS.items():  # k-means init from different data on each rank
        torch.manual_seed(0)
        q = build_quantizer(QuantizerConfig(**cfg), DIM).train()
        q.set_all_reduce(lambda t: dist.all_reduce(t), rank=rank, world_size=world_size)
        q.init_codebooks(kmeans_points(rank, cfg["code_dim"]), seed=3)
        results[name] = {"state": {k: v.clone() for k, v in q.state_dict().items()}}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    if rank == 0:  # uneven eval loops (only rank 0 here) must not enter a collective, or this would hang
        with torch.no_grad():
            for q in quantizers.values():
                q.eval()(shard(1, rank))
    dist.destroy_process_group()


def test_codebooks_identical_across_ranks_and_equal_to_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(tmp_path / "store"), str(tmp_path)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=55)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    for name in SCENARIOS:  # every buffer and parameter bit-identical on both ranks
        for key, v in r0[name]["state"].items():
            assert torch.equal(v, r1[name]["state"][key]), (name, key)
        assert r0[name]["stats"].keys() == r1[name]["stats"].keys()

    for name in ("ema", "ema-raw", "residual-ema"):  # == one process holding the global batch
        ref = run(build(name), [global_batch(s) for s in range(1, STEPS + 1)])
        for key, v in ref["state"].items():
            torch.testing.assert_close(r0[name]["state"][key], v, atol=1e-5, rtol=1e-5, msg=f"{name} {key}")
        for key, v in ref["stats"].items():  # global perplexity and usage, not per-rank ones
            torch.testing.assert_close(r0[name]["stats"][key], v, msg=f"{name} {key}")
            torch.testing.assert_close(r1[name]["stats"][key], v, msg=f"{name} {key}")
        assert ref["state"]["codebook.weight" if name != "residual-ema" else "levels.0.weight"].ne(
            build(name).state_dict()["codebook.weight" if name != "residual-ema" else "levels.0.weight"]).any()

    # k-means: identical on both ranks, and equal to k-means of the union (rank order) in one process.
    torch.set_num_threads(1)  # the workers' thread count: the same float reductions
    for name, cfg in KMEANS.items():
        for key, v in r0[name]["state"].items():
            assert torch.equal(v, r1[name]["state"][key]), (name, key)
        torch.manual_seed(0)
        q = build_quantizer(QuantizerConfig(**cfg), DIM).train()
        q.init_codebooks(torch.cat([kmeans_points(0, cfg["code_dim"]), kmeans_points(1, cfg["code_dim"])]), seed=3)
        for key, v in q.state_dict().items():
            torch.testing.assert_close(r0[name]["state"][key], v, atol=1e-6, rtol=0, msg=f"{name} {key}")
        assert all(bool(cb.initialized) for cb in q.codebooks()) and not q.needs_init

    # Restart: the dead codes 4..7 now hold exact copies of encoder vectors of the step-3 shards (slot j from
    # rank j % 2), written at the end of step 3; the live codes 0..3 are untouched (no optimizer runs here).
    w, w0 = r0["vq-restart"]["state"]["codebook.weight"], build("vq-restart").codebook.weight.detach()
    assert torch.equal(w[:4], w0[:4]) and not torch.equal(w[4:], w0[4:])
    for j, k in enumerate(range(4, 8)):  # the one restart (step 3) fills dead slots in index order
        rows = shard(3, j % 2).permute(0, 2, 3, 1).reshape(-1, DIM)  # (N, D) that rank's batch at step 3
        assert any(torch.equal(w[k], row) for row in rows), k
    assert torch.isfinite(r0["ema-restart"]["state"]["codebook.weight"]).all()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
