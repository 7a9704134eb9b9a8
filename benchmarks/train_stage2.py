"""Training throughput and MFU of the stage-2 prior: a DeepSpeed ZeRO-2 engine against a plain PyTorch loop.

    python benchmarks/train_stage2.py                    # CPU: GPT 8 layers / width 512 / vocab 8192, 256 tokens, batch 8
    python benchmarks/train_stage2.py --gpu              # VIM-Base (24 x 1536), 1024 tokens, bf16, one GPU

Both sides run the same model from the same weights on the same random token batches (the prior's cost does
not depend on the token values), side by side in this process: "engine" is ``vitvq.trainer.engine.build_engine``
(DeepSpeed ZeRO-2 with our AdamW groups, clipping and schedule, bf16 with fp32 masters on ``--gpu``) stepped as
``Stage2Task.micro_step`` does (forward through ``engine.module``, ``prior_loss``, ``engine.backward``,
``engine.step``); "plain" is ``torch.optim.AdamW`` with ``clip_grad_norm_`` and, on ``--gpu``, ``torch.autocast``
bf16. Reported: training tokens/s, ms/step, GFLOP/token (``torch.utils.flop_counter`` over one step: forward and
backward) and MFU against the device's dense bf16 peak (``--peak-tflops`` on a CPU); the ratio engine / plain.
The reference code's GPT on a 2-core machine like ours trained at 448-590 tokens/s (issue 12).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from vitvq.configs import from_dict
from vitvq.models.prior import Prior, PriorConfig, prior_loss

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM)


def flops_per_step(model: Prior, tokens: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode, flop_registry
    aten = torch.ops.aten
    counter = FlopCounterMode(display=False)
    counter.flop_registry.update({  # the CPU attention kernels count as the flash ones do
        aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            flop_registry[aten._scaled_dot_product_flash_attention_backward]})
    ctx = torch.autocast(tokens.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with counter, ctx:
        prior_loss(model(tokens, labels), tokens)[0].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def batches(cfg: PriorConfig, batch: int, device: torch.device, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g).to(device),
             torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=g).to(device)) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain(cfg: PriorConfig, state: dict, data: list, warmup: int, dtype: torch.dtype, device: torch.device,
               act_ckpt: bool) -> float:
    model = Prior(cfg).to(device)
    model.load_state_dict(state)
    if act_ckpt:
        from vitvq.trainer.parallelize import apply_ac, checkpointable_blocks
        apply_ac(checkpointable_blocks(model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    for i, (z, y) in enumerate(data):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with ctx():
            loss, _ = prior_loss(model(z, y), z)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - t0) / (len(data) - warmup)


def time_engine(cfg: PriorConfig, state: dict, data: list, warmup: int, precision: str, act_ckpt: bool) -> float:
    from vitvq.trainer.config import OptimConfig, TrainConfig
    from vitvq.trainer.engine import build_engine
    from vitvq.trainer.parallelize import parallelize
    batch = data[0][0].shape[0]
    train = TrainConfig(global_batch_size=batch, micro_batch_size=batch, precision=precision, zero_stage=2,
                        activation_checkpointing=act_ckpt)
    model = Prior(cfg)
    model.load_state_dict(state)
    model = parallelize({"prior": model}, train)["prior"]
    engine = build_engine(model, OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=0),
                          train, 1, len(data))
    device = next(engine.module.parameters()).device
    for i, (z, y) in enumerate(data):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        loss, _ = prior_loss(engine.module(z, y), z)
        engine.backward(loss)
        engine.step()
    sync(device)
    return (time.perf_counter() - t0) / (len(data) - warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="VIM-Base at 1024 tokens, bf16, on CUDA")
    p.add_argument("--preset", default=None, help="PriorConfig preset (default: small; --gpu: vim-base)")
    p.add_argument("--grid", type=int, default=None, help="token grid side (default 16: 256 tokens; --gpu: 32)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --gpu: 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; --gpu: 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing on every block")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: by CUDA device)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on a CPU")
    args = p.parse_args()

    from vitvq.trainer.engine import init_distributed
    dist = init_distributed()  # a group of one; the engine's device
    device = dist.device
    if args.gpu and device.type != "cuda":
        raise SystemExit("--gpu needs CUDA; run without it on a CPU")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    preset = args.preset or ("vim-base" if args.gpu else "small")
    cfg = from_dict(PriorConfig, {"preset": preset, "vocab_size": args.vocab, "grid": args.grid or (32 if args.gpu else 16),
                                  "num_classes": 1000, "token_dropout": 0.0, "resid_dropout": 0.0})
    batch, steps = args.batch or (32 if args.gpu else 8), args.steps or (20 if args.gpu else 6)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    torch.manual_seed(0)
    ref = Prior(cfg)
    for prm in ref.head.parameters():  # a trained-like head (the zero init would make step 1 special)
        torch.nn.init.normal_(prm, std=0.02)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    data = batches(cfg, batch, device, args.warmup + steps)
    flops = flops_per_step(ref.to(device), *data[0], dtype) / (batch * cfg.seq_len)
    del ref
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    n_params = sum(v.numel() for v in state.values())
    print(f"prior {preset}: {cfg.depth} layers, width {cfg.width}, vocab {cfg.vocab_size}, {cfg.seq_len} tokens, "
          f"{n_params / 1e6:.1f}M parameters; batch {batch}; {'bf16' if args.gpu else 'fp32'} on {name}; "
          f"{flops / 1e9:.2f} GFLOP per training token")
    rows = {}
    rows["plain"] = time_plain(cfg, state, data, args.warmup, dtype, device, args.act_ckpt)
    rows["engine"] = time_engine(cfg, state, data, args.warmup, "bf16" if args.gpu else "fp32", args.act_ckpt)
    print(f"{'':8} {'tokens/s':>10} {'ms/step':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for label, s in rows.items():
        tok_s = batch * cfg.seq_len / s
        achieved = tok_s * flops / 1e12
        mfu = f"{achieved / peak:.1%}" if peak else "-"
        print(f"{label:8} {tok_s:10.1f} {s * 1e3:9.1f} {achieved:8.3f} {mfu:>6}")
    print(f"ratio engine / plain tokens/s: {rows['plain'] / rows['engine']:.3f} (same run, same batches)")
    if not peak:
        print("MFU: give --peak-tflops for this device")


if __name__ == "__main__":
    main()
