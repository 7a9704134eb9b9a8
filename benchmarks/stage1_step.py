"""Speed, memory and FLOPs of one full stage-1 training step (tokenizer GAN) in plain PyTorch, per preset.

    python benchmarks/stage1_step.py                        # debug (32px) and small (ViT-VQGAN SS, 128px), CPU fp32
    python benchmarks/stage1_step.py --presets small --image-size 256 --device cuda --dtype bf16 --batch 16

A step is ``trainer/stage1.py``'s ``Stage1Task.micro_step`` with ``torch.optim.AdamW`` in place of DeepSpeed:
generator forward; generator loss (L2 + logit-Laplace + LPIPS + quantizer + hinge adversarial with taming's
adaptive weight) with the discriminator frozen; discriminator loss (+ R1 with ``--r1-gamma``); then per network
backward, gradient clipping and AdamW step (``OptimConfig`` defaults). The step number is ``loss.disc_start``,
so the adversarial terms are on. bf16 is ``torch.autocast`` around the two networks only; the losses and LPIPS
stay fp32, as in the trainer (where LPIPS lives outside the bf16 DeepSpeed engines).

Prints which LPIPS trunk ran (the VGG ImageNet weights when found, else a random trunk of the same cost), then a
row per preset: image size, batch, parameters of G and D (M), images/s and ms/step (the fastest of ``--iters``
timed steps after ``--warmup``), peak memory (CUDA: ``max_memory_allocated``; CPU, Linux: growth of the peak RSS
over the RSS before the models were built), FLOPs per image of one step (``torch.utils.flop_counter``'s formulas:
matmuls, convs, attention, in forward, backward and the adaptive weight's and R1's gradients) and the GFLOP/s
that makes. Default run: 3-4 min on 2 busy CPU cores, nearly all of it the two steps of the small preset.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from vitvq.configs import from_dict
from vitvq.models.discriminators import DiscConfig, build_discriminator
from vitvq.models.losses import LossConfig, Stage1Loss
from vitvq.models.perceptual import MissingWeightsError, find_backbone_file
from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
from vitvq.trainer.config import OptimConfig

# benchmark preset -> (TokenizerConfig preset, DiscConfig preset, default image size, default timed steps).
# "small" is ViT-VQGAN Small-Small with the StyleGAN2 discriminator, at 128px by default: on 2 CPU cores one of
# its steps takes 45-90 s, one debug step 0.1-7 s (the spread is other processes: hence the fastest of 5).
PRESETS = {"debug": ("debug", "debug", 32, 5), "small": ("vit-ss", "stylegan2", 128, 1)}

# The CPU attention kernels are missing from flop_counter's registry; their FLOPs are those of the CUDA ones.
_sdpa = torch.ops.aten._scaled_dot_product_flash_attention
FLOP_FORMULAS = {**flop_registry,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[_sdpa],
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                     flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_backward]}


class FlopCounter(TorchDispatchMode):
    """Total FLOPs of every op run inside (backward included), by torch.utils.flop_counter's formulas.

    Not FlopCounterMode itself: its module tracker puts grad hooks on module inputs, and autograd.grad with
    respect to such an input (R1's real images) then fails (pytorch/pytorch#131753)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        out = func(*args, **(kwargs or {}))
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def train_step(gen: Tokenizer, disc: nn.Module, loss_fn: Stage1Loss, opts: tuple[torch.optim.Optimizer, ...],
               x: torch.Tensor, step: int, bf16: bool, grad_clip: float) -> None:
    """Stage1Task.micro_step: both losses first (D frozen for the G loss), then one backward + step per network."""
    def amp() -> torch.autocast:
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)

    def disc_fn(img: torch.Tensor) -> torch.Tensor:  # the trainer's _disc_fn: D in the compute dtype, fp32 logits
        with amp():
            return disc(img).float()

    gen.set_step(step)
    disc.requires_grad_(False)
    with amp():
        dec_out, q = gen(x)  # (B, 6, H, W) logit-Laplace parameters
    dec_out = dec_out.float()
    loss_g, _ = loss_fn.generator_loss(x, dec_out, q.loss.float(), disc_fn, step, last_layer=gen.last_layer)
    disc.requires_grad_(True)
    loss_d, _ = loss_fn.discriminator_loss(x, gen.to_image(dec_out).detach(), disc_fn, step)
    for loss, model, opt in ((loss_g, gen, opts[0]), (loss_d, disc, opts[1])):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()


def reset_peak_memory(device: torch.device) -> int:
    """Start a new peak-memory window; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM, and so ru_maxrss) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere ru_maxrss stays the lifetime peak: figures after the first preset read low
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024


def bench(name: str, args: argparse.Namespace, device: torch.device, lpips_pretrained: bool) -> dict:
    model_preset, disc_preset, default_size, default_iters = PRESETS[name]
    size = default_size if args.image_size is None else args.image_size
    iters = default_iters if args.iters is None else args.iters
    torch.manual_seed(0)
    base_mem = reset_peak_memory(device)  # what the models, optimizer states and activations add to this
    model_cfg = from_dict(TokenizerConfig, {"preset": model_preset, "image_size": size})
    loss_cfg = from_dict(LossConfig, {"lpips_pretrained_backbone": lpips_pretrained, "r1_gamma": args.r1_gamma,
                                      "r1_every": 1})  # R1 (if on) in every timed step, not every 16th
    gen = Tokenizer(model_cfg).to(device).train()
    disc = build_discriminator(from_dict(DiscConfig, disc_preset), size, model_cfg.in_channels).to(device).train()
    loss_fn = Stage1Loss(loss_cfg, model_cfg.output).to(device).train()
    optim = OptimConfig()  # the stage-1 defaults: lr 1e-4, betas (0.9, 0.99), weight decay 1e-4, clip 1.0
    opts = tuple(torch.optim.AdamW(m.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                   weight_decay=optim.weight_decay) for m in (gen, disc))
    x = torch.rand(args.batch, model_cfg.in_channels, size, size, device=device) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    step = loss_cfg.disc_start  # past the discriminator warm-up: adversarial loss and adaptive weight on
    assert loss_fn.disc_active(step)

    def run() -> float:
        """Seconds of one step (synchronized: a CUDA step is timed to its end, not to its launch)."""
        t0 = time.perf_counter()
        train_step(gen, disc, loss_fn, opts, x, step, args.dtype == "bf16", optim.grad_clip)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    reset_peak_memory(device)  # drop build-time transients (torchvision builds all of VGG16 for LPIPS' trunk)
    with FlopCounter() as counter:  # the first warm-up step counts the FLOPs
        run()
    for _ in range(args.warmup - 1):
        run()
    # The fastest timed step: other processes on a shared machine only ever add time.
    sec = min(run() for _ in range(iters))
    mem, flops = peak_memory(device) - base_mem, counter.total / args.batch
    return {"preset": name, "size": size, "batch": args.batch,
            "g_m": sum(p.numel() for p in gen.parameters()) / 1e6,
            "d_m": sum(p.numel() for p in disc.parameters()) / 1e6,
            "img_s": args.batch / sec, "ms": sec * 1e3, "mem_gb": mem / 2**30,
            "gflop_img": flops / 1e9, "gflop_s": flops * args.batch / sec / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="debug,small", help=f"comma-separated, from {sorted(PRESETS)}")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: debug 5, small 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1: the first counts FLOPs)")
    parser.add_argument("--image-size", type=int, default=None, help="override every preset's image size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast")
    parser.add_argument("--r1-gamma", type=float, default=0.0, help="R1 weight (0 = off, the LossConfig default)")
    args = parser.parse_args()
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or args.batch < 1 or (args.iters is not None and args.iters < 1) or args.warmup < 1:
        parser.error(f"unknown presets {unknown} (choose from {sorted(PRESETS)}), or batch/iters/warmup < 1")
    device = torch.device(args.device)

    try:
        pretrained = find_backbone_file("vgg").is_file()  # what LossConfig's default LPIPS would load
    except MissingWeightsError:
        pretrained = False
    # Said once here instead of the loss module's warning for every preset.
    warnings.filterwarnings("ignore", message=r"LPIPS .* RANDOM backbone", category=UserWarning)
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, {torch.get_num_threads()} threads, "
          f"R1 gamma {args.r1_gamma:g}")
    print("LPIPS: " + ("VGG16 ImageNet trunk (real LPIPS)" if pretrained else
                       "VGG16 trunk with RANDOM weights (vgg16-397923af.pth not found; same cost, not LPIPS)"))
    mem_label = "peak alloc GB" if device.type == "cuda" else "peak RSS+ GB"
    header = (f"{'preset':<7} {'image':>5} {'batch':>5} {'G M':>7} {'D M':>6} {'img/s':>8} {'ms/step':>9} "
              f"{mem_label:>13} {'GFLOP/img':>10} {'GFLOP/s':>8}")
    print(header, "-" * len(header), sep="\n")
    for name in names:
        r = bench(name, args, device, pretrained)
        print(f"{r['preset']:<7} {r['size']:>5} {r['batch']:>5} {r['g_m']:>7.2f} {r['d_m']:>6.2f} {r['img_s']:>8.2f} "
              f"{r['ms']:>9.1f} {r['mem_gb']:>13.2f} {r['gflop_img']:>10.2f} {r['gflop_s']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
