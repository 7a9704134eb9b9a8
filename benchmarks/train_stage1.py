"""Throughput, peak memory and MFU of real stage-1 training steps (the Trainer's two DeepSpeed engines).

    python benchmarks/train_stage1.py                     # CPU: debug (32 px) and small (64 px) x 1, 2 ranks x act.ckpt
    python benchmarks/train_stage1.py --presets debug --ranks 2 --peak-tflops 1.2
    python benchmarks/train_stage1.py --gpu               # ViT-VQGAN SS at 256 px, bf16, one GPU

Every configuration runs in its own ``torchrun`` (CPU: gloo, OMP_NUM_THREADS = cores / ranks, CUDA hidden) that
builds ``trainer.trainer.Trainer`` and calls ``train_step`` as ``fit()`` does, with no validation, pictures,
checkpoints or tracking. A step updates G and D once on a global batch that is the same for 1 and 2 ranks (the
accumulation is recomputed): ViT, LPIPS, adversarial loss with the adaptive weight (``small`` sets
``loss.disc_start=0``), and for ``debug`` R1 every 2nd step. FLOPs are counted with ``torch.utils.flop_counter``
over the first R1 period of steps; then come untimed warm-up steps and the timed ones, data loading included.
``--gpu``: the SS recipe on the demo photographs at 256 px, bf16 engines (LPIPS stays fp32), batch 64 = 32 x 2.

Prints a line per configuration as it finishes (about 25 s each on 2 idle CPU cores, 3 min in all; other jobs on the
machine make it slower, and the lines say how much CPU they took), then a table (img/s, ms/step, peak memory per
rank, GFLOP/img, GFLOP/s, MFU against ``--peak-tflops`` or on CUDA a table of bf16 peaks) with its legend, and the
ratios measured in this run: 2 ranks / 1, act.ckpt on / off.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MARK = "BENCH_RESULT "
# name -> recipe, overrides, (global batch, micro batch), warm-up steps, timed steps.
PRESETS = {
    "debug": ("configs/stage1/debug.yaml", [], (8, 4), 2, 20),
    "small": ("configs/stage1/demo.yaml", ["loss.lpips_pretrained_backbone=false", "loss.disc_start=0"],
              (16, 8), 2, 12),  # the demo recipe (width 64, depth 4, 256 tokens, conv head); D on from step 0
    # --gpu. LPIPS' VGG trunk is random (the machine may be offline): same cost as the real one.
    "vit-ss": ("configs/stage1/vit_ss_imagenet.yaml", ["data.source=demo", "data.image_size=256",
                                                       "loss.lpips_pretrained_backbone=false"], (64, 32), 3, 10),
}
COMMON = ["train.tracking=false", "train.progress=false", "train.val_every=0", "train.image_every=100000",
          "train.ckpt_every=100000", "eval.every=0"]
ON_OFF = {False: "off", True: "on"}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM)


# -- worker: one configuration, inside torchrun ---------------------------------------------------------------------
def flop_counter():  # noqa: ANN201 - a FlopCounterMode
    """``FlopCounterMode`` counting totals only (its ModuleTracker hooks module inputs, and ``autograd.grad`` with
    respect to one, R1's real images, then fails: pytorch/pytorch#131753), plus the CPU attention kernels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    class GlobalOnly(contextlib.nullcontext):
        parents = ("Global",)

    aten = torch.ops.aten
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalOnly()
    counter.flop_registry.update({
        aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            flop_registry[aten._scaled_dot_product_flash_attention_backward]})
    return counter


def memory(device, reset: bool = False) -> tuple[int, int]:  # noqa: ANN001 - a torch.device
    """(bytes in use now, peak bytes so far); ``reset`` then starts a new peak window at the current use."""
    import torch
    if device.type == "cuda":
        now, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return now, peak
    now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident pages
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if reset:
        with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets the peak RSS (and so ru_maxrss) to now
            Path("/proc/self/clear_refs").write_text("5")
    return now, peak


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from vitvq.trainer.config import load_stage1_config
    from vitvq.trainer.trainer import Trainer

    recipe, overrides, (global_batch, micro), warmup, default_iters = PRESETS[args.worker]
    cfg = load_stage1_config(ROOT / recipe, overrides + COMMON + [
        f"train.out_dir={args.out}", f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}",
        f"train.activation_checkpointing={str(args.act_ckpt).lower()}"])
    tr = Trainer(cfg)
    tr.build()
    device = tr.dist.device
    built, build_peak = memory(device, reset=True)  # the steps add optimizer states, gradients and activations

    def step() -> tuple[float, float]:
        """Seconds of one optimizer step and of the data wait inside it."""
        t0 = time.perf_counter()
        _, wait = tr.train_step()
        tr.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the last engine.step() may still be running
        return time.perf_counter() - t0, wait

    # R1 runs on steps with step % r1_every == 0: count a whole period so that FLOPs match the timed average.
    period = cfg.loss.r1_every if cfg.loss.r1_gamma > 0 else 1
    with flop_counter() as counter:
        for _ in range(period):
            step()
    flop_per_img = counter.get_total_flops() / (period * tr.accum * micro)  # this rank's images only
    iters = -(-(args.iters or default_iters) // period) * period  # whole periods
    for _ in range(warmup):
        step()
    dist.barrier()
    times = torch.tensor([step() for _ in range(iters)], dtype=torch.float64)  # (iters, 2): step, data wait
    steps_peak = memory(device)[1]
    mem = torch.tensor([max(build_peak, steps_peak), steps_peak - built], dtype=torch.float64)
    worst = torch.cat([times.flatten(), mem]).to(device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # per step, the slowest rank sets the pace; memory: the largest
    times, (peak, growth) = worst[:-2].view(iters, 2).cpu(), worst[-2:].tolist()
    # The median over R1 periods: on a shared machine other jobs add time in bursts that a mean would absorb.
    sec = times[:, 0].view(-1, period).sum(1).median().item() / period
    if tr.dist.is_main:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(MARK + json.dumps({
            "preset": args.worker, "ranks": tr.dist.world_size, "act_ckpt": args.act_ckpt, "device": name,
            "global_batch": global_batch, "micro": micro, "accum": tr.accum, "iters": iters,
            "step_s": sec, "mean_step_s": times[:, 0].mean().item(), "img_s": global_batch / sec,
            "wait_frac": (times[:, 1].sum() / times[:, 0].sum()).item(),
            "peak_mb": peak / 2**20, "steps_mb": growth / 2**20, "flop_img": flop_per_img,
            "peak_tflops": next((v for k, v in PEAK_TFLOPS.items() if k in name), None)}), flush=True)


# -- parent: one torchrun per configuration, then the tables --------------------------------------------------------
def cpu_seconds() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process's finished children)."""
    user, nice, system, _, _, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), kids.ru_utime + kids.ru_stime


def run_config(preset: str, ranks: int, act_ckpt: bool, args: argparse.Namespace) -> dict | None:
    """One torchrun; prints a line when it is done and returns rank 0's result (None if it failed)."""
    name = f"{preset} x{ranks} act.ckpt={ON_OFF[act_ckpt]}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    if not args.gpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--worker", preset, "--out", out, "--iters", str(args.iters or 0)]
        cmd += ["--act-ckpt"] if act_ckpt else []
        (busy0, ours0), t0 = cpu_seconds(), time.perf_counter()
        try:
            res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"  {name}: timed out after {args.timeout:.0f} s", flush=True)
            return None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        print(f"  {name}: failed (exit {res.returncode})\n{res.stderr[-3000:]}", flush=True)
        return None
    (busy1, ours1), wall = cpu_seconds(), time.perf_counter() - t0
    # Other jobs' share of the CPUs meanwhile: they slow every figure (1 rank x 2 OpenMP threads the most).
    r = json.loads(lines[-1][len(MARK):])
    r["others"] = max(0.0, busy1 - busy0 - (ours1 - ours0)) / (wall * (os.cpu_count() or 1))
    print(f"  {name}: {r['img_s']:.2f} img/s, {r['step_s'] * 1e3:.0f} ms/step (mean {r['mean_step_s'] * 1e3:.0f}) "
          f"over {r['iters']} steps of {r['global_batch']} = {r['ranks']} x {r['micro']} x {r['accum']} accum; "
          f"{wall:.0f} s with start-up, other jobs used {r['others'] * 100:.0f}% of the CPUs", flush=True)
    return r


def report(rows: list[dict], peak_tflops: float | None) -> None:
    # MFU counts model FLOPs: the recomputed forward of act.ckpt is not useful work (PaLM, appendix B), so every
    # row uses the FLOPs counted without it when this run has them.
    model = {(r["preset"], r["ranks"]): r["flop_img"] for r in rows if not r["act_ckpt"]}
    header = (f"{'preset':<7} {'ranks':>5} {'act.ckpt':>8} {'img/s':>8} {'ms/step':>9} {'peak MB':>8} "
              f"{'+steps MB':>9} {'GFLOP/img':>9} {'GFLOP/s':>8} {'MFU':>6} {'data':>5} {'others':>6}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        flop = model.get((r["preset"], r["ranks"]), r["flop_img"])
        achieved = flop * r["img_s"]
        peak = peak_tflops or r["peak_tflops"]
        peak = peak * 1e12 * (r["ranks"] if r["device"] != "cpu" else 1) if peak else None  # CPU: ranks share it
        mfu = f"{achieved / peak * 100:.1f}%" if peak else "n/a"
        print(f"{r['preset']:<7} {r['ranks']:>5} {ON_OFF[r['act_ckpt']]:>8} {r['img_s']:>8.2f} "
              f"{r['step_s'] * 1e3:>9.1f} {r['peak_mb']:>8.0f} {r['steps_mb']:>9.0f} {flop / 1e9:>9.3f} "
              f"{achieved / 1e9:>8.2f} {mfu:>6} {r['wait_frac'] * 100:>4.0f}% {r['others'] * 100:>5.0f}%")
    peak_note = f"{peak_tflops:g} TFLOP/s given" if peak_tflops else "CUDA bf16 table; n/a on CPU (pass --peak-tflops)"
    print("ms/step: median over the timed steps of the slowest rank. peak MB: CPU peak RSS (ru_maxrss, loader\n"
          "processes excluded), CUDA max_memory_allocated; +steps MB: its rise over the use after build (optimizer\n"
          "states, gradients, activations); both the max over ranks. data: share of the step spent waiting on the\n"
          "loader. others: CPU share taken by other jobs meanwhile. GFLOP/img: model FLOPs (an act.ckpt row takes\n"
          f"the count without it; its recomputation is in the ratios). MFU peak: {peak_note}")
    by = {(r["preset"], r["ranks"], r["act_ckpt"]): r for r in rows}
    print("\nratios measured in this run (same global batch):")
    for (preset, ranks, ckpt), r in by.items():
        if ranks > 1 and (one := by.get((preset, 1, ckpt))):
            print(f"  {preset:<6} {ranks} ranks / 1, act.ckpt {ON_OFF[ckpt]:<3}:  img/s "
                  f"x{r['img_s'] / one['img_s']:.2f}, peak MB per rank x{r['peak_mb'] / one['peak_mb']:.2f}")
    for (preset, ranks, ckpt), r in by.items():
        if ckpt and (off := by.get((preset, ranks, False))):
            print(f"  {preset:<6} act.ckpt on / off, {ranks} rank{'s' if ranks > 1 else ' '}:  img/s "
                  f"x{r['img_s'] / off['img_s']:.2f}, +steps MB x{r['steps_mb'] / off['steps_mb']:.2f}, "
                  f"FLOPs executed x{r['flop_img'] / off['flop_img']:.2f} (the recomputed forward)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=None, help="comma-separated (default: debug,small; --gpu: vit-ss)")
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts (default: 1,2; --gpu: 1)")
    parser.add_argument("--act-ckpt-modes", default="off,on", help="activation checkpointing: off, on or off,on")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default per preset: 20, 12, 10)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of the hardware for MFU")
    parser.add_argument("--gpu", action="store_true", help="ViT-VQGAN SS, 256 px, bf16 on CUDA")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration")
    parser.add_argument("--worker", choices=sorted(PRESETS), help=argparse.SUPPRESS)  # set by the parent
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--act-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    presets = (args.presets or ("vit-ss" if args.gpu else "debug,small")).split(",")
    ranks = [int(n) for n in (args.ranks or ("1" if args.gpu else "1,2")).split(",")]
    modes = [{"off": False, "on": True}[m] for m in args.act_ckpt_modes.split(",")]
    if any(p not in PRESETS for p in presets) or any(n < 1 for n in ranks):
        parser.error(f"presets must be among {sorted(PRESETS)} and ranks >= 1")
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} before starting")
    rows, t_start = [], time.perf_counter()
    for preset, n, ckpt in itertools.product(presets, ranks, modes):
        r = run_config(preset, n, ckpt, args)
        rows += [r] if r else []
    if rows:
        report(rows, args.peak_tflops)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
