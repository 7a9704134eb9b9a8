"""Sampling speed of the stage-2 prior: KV-cached decoding against full recomputation, and its cost per position.

    python benchmarks/sample_prior.py                                   # small preset, CPU fp32, 2 threads
    python benchmarks/sample_prior.py --device cuda --dtype bf16 --batch 32 --recompute-steps 16

The model is ``PriorConfig`` preset ``--preset`` (default ``small``: 8 layers, width 512, 8 heads) with vocabulary
``--vocab`` (8192), random weights (speed does not depend on them), for each grid of ``--grids`` (8, 16, 32 =
64, 256, 1024 tokens), class-conditional with guidance ``--cfg`` (2.0: the batch runs doubled) and without,
sampling at temperature 1 with top-k ``--top-k`` (100), ``--batch`` (8) images, per-row generators.

Prints one row per (tokens, cfg): tokens/s of ``models.sampling.generate`` with the KV cache (B * N sampled
tokens over the wall time) and of full recomputation (every step reruns the whole prefix, its head on the last
position only), their ratio, and the median time of one decoding step (one token for every row of the batch) over
the first and the last 64 positions of the cached run, with their ratio (1.00 = flat). Recomputation costs
O(N^2): its tokens/s is estimated from ``--recompute-steps`` steps timed at evenly spaced prefix lengths
(stratified midpoints; total = N / k * their sum), marked ``est``. Last, at the largest grid with guidance, the
two KV-cache layouts side by side: the default (whole buffer under a mask) and the filled prefix only
(``full_length=False``), each probed with ``--probe`` decoding steps at each of positions 1-16 and N-16..N-1,
early and late in alternation (the robust flatness figure on a busy machine).

A full run took 6.5 minutes (3.6 of them CPU time, two thirds in the 1024-token runs) with ``--threads 1`` on a
2-core machine shared with other jobs (load average 5). The load average is printed before and after: on a busy
machine use ``--threads 1``, since a 2-thread matmul then waits at OpenMP's barrier for a descheduled thread
(measured there: 19 instead of 123 tokens/s at 64 tokens). For comparison, the old reference code's cached
sampler ran 157-266 tokens/s at 64 tokens and 63-79 at 256 on a 2-core machine like ours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vitvq.configs import from_dict
from vitvq.models.prior import Prior, PriorConfig
from vitvq.models.sampling import SamplingSettings, generate, sample_logits


class StepTimer:
    """Times every ``model.decode`` call (one step of the cached loop) without changing what runs: CUDA events
    on a GPU (no synchronisation per step), the wall clock on a CPU."""

    def __init__(self, model: Prior, device: torch.device):
        self.model, self.cuda, self.marks = model, device.type == "cuda", []

    def __enter__(self) -> "StepTimer":
        decode = self.model.decode

        def timed(cache, tokens):  # noqa: ANN001, ANN202 - Prior.decode's signature
            start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
            if self.cuda:
                start.record()
            out = decode(cache, tokens)
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
            else:
                end = time.perf_counter()
            self.marks.append((start, end))
            return out

        self.model.decode = timed  # an instance attribute shadows the method until __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.decode

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self.marks]
        return [e - s for s, e in self.marks]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model: Prior, labels: torch.Tensor, args: argparse.Namespace, cfg: float,
                   device: torch.device) -> tuple[float, list[float]]:
    """Wall seconds of one cached ``generate`` and the seconds of each of its decoding steps."""
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(labels))]
    with StepTimer(model, device) as timer:
        sync(device)
        t0 = time.perf_counter()
        generate(model, labels, SamplingSettings(cfg_scale=cfg, top_k=args.top_k), generators=gens)
        sync(device)
        wall = time.perf_counter() - t0
    return wall, timer.seconds()


@torch.no_grad()
def recompute_seconds(model: Prior, labels: torch.Tensor, args: argparse.Namespace, cfg: float,
                      device: torch.device) -> tuple[float, bool]:
    """Seconds of a full-recomputation run of N steps: measured whole when N <= k, else estimated from k steps
    at stratified prefix lengths. A step is what ``generate(use_cache=False)`` does: the prefix forward (doubled
    with guidance), the mix and the sampling."""
    N, B, k = model.cfg.seq_len, len(labels), args.recompute_steps
    steps = list(range(N)) if k <= 0 or N <= k else [int((i + 0.5) * N / k) for i in range(k)]
    guided = cfg != 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.cfg.null_class)]) if guided else labels
    prefix = torch.randint(0, model.cfg.vocab_size, (len(cond), N), device=device)  # content does not matter
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(B)]
    total = 0.0
    for t in steps:
        sync(device)
        t0 = time.perf_counter()
        logits = model.next_logits(prefix[:, :t], cond)
        if guided:
            c, u = logits.chunk(2)
            logits = u + cfg * (c - u)
        sample_logits(logits, SamplingSettings(cfg_scale=cfg, top_k=args.top_k), gens)
        sync(device)
        total += time.perf_counter() - t0
    return total * N / len(steps), len(steps) < N


@torch.no_grad()
def probe(model: Prior, rows: int, full_length: bool, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median ms of one decoding step at positions 1-16 and N-16..N-1 of a cache with that layout, timed in
    alternation (early, late, early, ...) so that load from other processes hits both alike. The write position
    is set directly: what a step costs depends on the position, not on what the slots hold."""
    N = model.cfg.seq_len
    cache = model.new_cache(rows, full_length=full_length)
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
    early, late = [], []
    for _ in range(repeats):
        for e, l in zip(range(1, min(17, N)), range(max(1, N - 16), N)):
            for pos, times in ((e, early), (l, late)):
                cache.pos = pos
                sync(device)
                t0 = time.perf_counter()
                model.decode(cache, tokens)
                sync(device)
                times.append(time.perf_counter() - t0)
    return statistics.median(early) * 1e3, statistics.median(late) * 1e3


def early_late(steps: list[float], n: int = 64) -> tuple[float, float]:
    """Median step time over the first and the last ``n`` decoding steps (ms)."""
    n = min(n, max(1, len(steps) // 2))
    return statistics.median(steps[:n]) * 1e3, statistics.median(steps[-n:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help=f"PriorConfig preset, from {sorted(PriorConfig.PRESETS)}")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary (codebook) size")
    parser.add_argument("--grids", default="8,16,32", help="comma-separated grid sides (tokens = side^2)")
    parser.add_argument("--batch", type=int, default=8, help="images sampled at once")
    parser.add_argument("--top-k", type=int, default=100, help="top-k filtering (0 = off)")
    parser.add_argument("--cfg", type=float, default=2.0, help="guidance scale of the guided rows (1 = off)")
    parser.add_argument("--recompute-steps", type=int, default=6,
                        help="recomputation steps timed per run (0 = all N; the total is estimated from them)")
    parser.add_argument("--probe", type=int, default=2, help="decoding steps timed per position in the layout probe")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model and KV-cache dtype")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grids = [int(g) for g in args.grids.split(",") if g.strip()]
    if not grids or min(grids) < 2 or args.batch < 1:
        parser.error("need grids >= 2 and batch >= 1")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def build(grid: int) -> Prior:
        torch.manual_seed(args.seed)
        cfg = from_dict(PriorConfig, {"preset": args.preset, "vocab_size": args.vocab, "grid": grid})
        model = Prior(cfg)
        torch.nn.init.normal_(model.head.weight, std=0.02)  # the zero head would make every sample token 0
        return model.to(device=device, dtype=dtype).eval()

    labels = torch.arange(args.batch, device=device) % 1000
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    first = build(grids[0])
    print(f"preset {args.preset}: {sum(p.numel() for p in first.parameters()) / 1e6:.1f}M parameters, vocab "
          f"{args.vocab}, batch {args.batch}, top-k {args.top_k}, temperature 1")
    timed_generate(first, labels, args, args.cfg, device)  # warm-up: allocator, kernels, thread pool

    header = (f"{'tokens':>6} {'cfg':>4} {'cached tok/s':>12} {'recompute tok/s':>16} {'speedup':>8} "
              f"{'ms/step first 64':>16} {'last 64':>8} {'late/early':>10}")
    print(header, "-" * len(header), sep="\n")
    last_model = None
    for grid in grids:
        model = build(grid)
        N = model.cfg.seq_len
        for cfg in dict.fromkeys((args.cfg, 1.0)):
            wall, steps = timed_generate(model, labels, args, cfg, device)
            rec, estimated = recompute_seconds(model, labels, args, cfg, device)
            early, late = early_late(steps)
            cached_rate, rec_rate = args.batch * N / wall, args.batch * N / rec
            rec_txt = f"{rec_rate:.1f}" + (" est" if estimated else "")
            print(f"{N:>6} {cfg:>4g} {cached_rate:>12.1f} {rec_txt:>16} {cached_rate / rec_rate:>7.1f}x "
                  f"{early:>16.2f} {late:>8.2f} {late / early:>10.2f}", flush=True)
        last_model = model

    assert last_model is not None
    N = last_model.cfg.seq_len
    print(f"\nKV cache layouts at {N} tokens, cfg {args.cfg:g}: ms per decoding step at positions 1-16 / "
          f"{N - 16}-{N - 1}")
    rows = 2 * args.batch if args.cfg != 1.0 else args.batch
    for full_length, name in ((True, "full length + mask (default)"), (False, "filled prefix only")):
        early, late = probe(last_model, rows, full_length, args.probe, device)
        print(f"  {name:<29} {early:>8.2f} / {late:>8.2f}   late/early {late / early:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
