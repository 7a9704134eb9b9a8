"""Gradient parity: the stage-1 GAN step on real DeepSpeed engines (2 gloo ranks) against plain PyTorch.

``parity_worker.py`` runs, under torchrun, the real ``Stage1Task`` (``micro_step`` and the Trainer's hooks) on the
engines of ``build_engine`` (ZeRO 0, 1 or 2, fp32, accumulation 1 or 2, adaptive weight on, R1 every 2 steps,
discriminator from step 0) and records for every optimizer step k: each engine's weights before it (w_k), the
data-parallel mean gradient it is about to apply (g_k, ``safe_get_full_grad`` before ``engine.step()``, i.e.
unclipped), its learning rate, and the weights after the last step.

The reference is written from the definition of the objective, not from ``Stage1Task`` or ``Stage1Loss``: it
calls the models and the pure loss functions of ``vitvq.models.losses`` (tested on their own against taming
and scipy). At DeepSpeed's weights w_k, for each chunk c of the global batch (the world x accumulation
micro-batches; each is a batch of its own: the adaptive weight and the minibatch-stddev layer see only it):

    G_c = rec + p_w LPIPS + q_w L_VQ + adv_w * lambda * L_adv(D(x_rec))     D a fixed function here
    D_c = L_D(D(x), D(sg(x_rec)))  [+ gamma / 2 * r1_every * R1  on steps with step % r1_every == 0]
    g_ref = mean over c of dG_c / dtheta_G and of dD_c / dtheta_D

then w_{k+1} = AdamW(w_k, clip(g_k)): torch's AdamW with the config's groups, betas, eps and cosine schedule.

Why gradients at DeepSpeed's weights, not weights after a few steps: both checks are then linear in what they
compare, so float noise is not amplified. Adam divides by sqrt(v): an element whose exact gradient is zero (the
attention key bias, which softmax ignores) carries noise of ~1e-10 that Adam turns into a full lr-sized step
of random sign; and Adam is blind to a gradient scale error. Here a 1% scale error shows in the gradients,
and both optimizers get the very same gradient.

Tolerances, with u = 2^-24 (fp32 unit roundoff); derived, not tuned to a machine:

1. Gradients, per parameter tensor t, 2-norms:  ||g_ds - g_ref|| <= 4 noise_t + 2 (C - 1) u ||m_t||.
   g_ds and g_ref are fp32 evaluations of the same sums. With e the exact value,
   ||g_ds - g_ref|| <= ||g_ds - e|| + ||g_ref - e||. The size of one evaluation's rounding error is measured
   at run time, on the machine that runs the test: noise_t is the larger distance from g_ref of two evaluations
   mathematically equal to it that round differently: in float64 (the models' explicit fp32 islands stay fp32;
   this one is ||g_ref - e|| up to them), and in fp32 with the samples of each chunk and the chunks in reverse
   order (other summation orders, inside the islands too). DeepSpeed's error being of the size of the
   reference's, ||g_ds - g_ref|| <~ 2 noise_t; the factor 4 lets DeepSpeed's error be up to 3 times the
   reference's (the norm of a rounding error fluctuates on small tensors such as an 8-element bias). The ranks
   run on one thread each (conftest.launch_env) and so does the reference, so both use the same CPU kernels
   (against a 2-thread reference, DeepSpeed's difference on the discriminator's first conv bias reached 2.8x
   the probes' noise: other kernels, other roundings).
   The second term bounds the one sum whose order differs for sure: the C = world x accumulation chunk
   gradients g_c, added by DeepSpeed in its order (on each rank, then across ranks) and here in chunk order,
   each within (C - 1) u sum_c |g_c| of the exact sum (Higham, Accuracy and Stability, eq. 4.4); dividing by
   C, a power of two, is exact; m_t = mean_c |g_c|. A gradient exact in both (the discriminator's output
   bias: counts over 2^k) gets tolerance 0.
   Observed on a 2-core CPU: 0 at accumulation 1 (the means agree bit for bit); at accumulation 2 the largest
   error / tolerance is 0.09 (ZeRO 0, 1) and 0.05 (ZeRO 2).

2. Weights, per element:  |w_ds - w_ref| <= 4 u |w_ref| + 2 delta |w_ref - w_k|.
   Both optimizers step from w_k with g_k and moments built from the same gradients, so they do the same
   element-wise operations on the same numbers, except for the clipping factor clip / (||g|| + 1e-6). The
   clip here (1.0) is above the gradient norms, so that neither clips and delta = 0 (decided on the
   reference's norm widened by the bound N u of any fp32 evaluation of it); 4 u |w| then covers the last
   roundings of w (the decay and the update, one fp32 operation each, in each optimizer). Where either may
   clip, delta = (N + 4) u bounds the relative difference of the two factors ((N - 1) u / 2 for a sum of N
   squares under the square root, plus a few roundings), and Adam's m / sqrt(v), invariant to a common scale
   of the gradients but for eps, changes the step |w_{k+1} - w_k| by at most 2 delta of itself.
   Observed: the weights agree bit for bit.

Checked to fail (see the mutation runs of the change that introduced it) for: the adaptive weight off
(``last_layer=None``), the generator loss scaled by 1.01, the discriminator not frozen in the generator step
(at ZeRO 0 and 1 a gradient mismatch, at ZeRO 2 DeepSpeed's "already been reduced" assertion), R1 on the
wrong steps; every case catches each, by error / tolerance of 9e3 or more. All six ZeRO x accumulation cases
run: the worker takes 10-20 s a case on 2 cores, the reference 3-6 s; about 2 minutes in all.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vitvq.models.discriminators import build_discriminator
from vitvq.models.losses import adaptive_weight, gan_d_loss, gan_g_loss, logit_laplace_nll, r1_penalty
from vitvq.models.perceptual import PerceptualLoss
from vitvq.models.tokenizer import Tokenizer
from vitvq.trainer.config import load_stage1_config

pytestmark = pytest.mark.e2e  # 2-rank DeepSpeed runs
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("parity_worker.py")
_spec = importlib.util.spec_from_file_location("parity_worker", WORKER)
parity_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity_worker)

U = 2.0 ** -24  # fp32 unit roundoff
WORLD, MICRO, STEPS = 2, 2, 3
ENGINES = ("generator", "discriminator")


def overrides(zero: int, accum: int) -> list[str]:
    return ["train.precision=fp32", f"train.zero_stage={zero}", f"train.micro_batch_size={MICRO}",
            f"train.global_batch_size={WORLD * MICRO * accum}", "loss.adv_weight=0.1", "loss.adaptive_weight=true",
            "loss.disc_start=0", "loss.r1_gamma=1.0", "loss.r1_every=2", "optim_g.warmup_steps=0",
            "optim_d.warmup_steps=0", "optim_g.lr=1e-4", "optim_d.lr=1e-4",  # the paper's learning rate
            # above the gradient norms here (~0.3 G, ~0.4 D): both optimizers then get the very same gradient
            "optim_g.grad_clip=1.0", "optim_d.grad_clip=1.0",
            # The weights move by the optimizer alone: no k-means init, no dead-code restarts (the codebook's own
            # writes through DeepSpeed's masters have their tests: test_codebook_restarts.py).
            "model.quantizer.init=random", "model.quantizer.restart_dead_codes=false"]


# -- the reference: plain single-process PyTorch ----------------------------------------------------
def reference_modules(cfg, lpips_state: dict) -> dict[str, torch.nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random LPIPS trunk of the debug config warns
        lpips = PerceptualLoss(cfg.loss.lpips_net, cfg.loss.lpips_pretrained_backbone, cfg.loss.lpips_backbone_path)
    lpips.load_state_dict(lpips_state)  # the loss's frozen LPIPS, as the worker built it
    return {"generator": Tokenizer(cfg.model), "lpips": lpips,
            "discriminator": build_discriminator(cfg.disc, cfg.model.image_size, cfg.model.in_channels)}


def reference_gradients(cfg, mods: dict, weights: dict, x: torch.Tensor, step: int, dtype: torch.dtype = torch.float32,
                        reverse: bool = False) -> tuple[dict, dict]:
    """Mean over the chunks of the global batch ``x`` of both stage-1 gradients at ``weights``: ({engine: {name:
    mean_c g_c}}, {engine: {name: mean_c |g_c|}}). ``reverse``: samples and chunks in reverse order (equal maths)."""
    L = cfg.loss
    gen, disc, lpips = mods["generator"], mods["discriminator"], mods["lpips"]  # LPIPS stays fp32 (its own island)
    for name in ENGINES:
        mods[name].load_state_dict(weights[name])
        mods[name].to(dtype)
    params = {name: dict(mods[name].named_parameters()) for name in ENGINES}
    mean = {e: {n: torch.zeros_like(p) for n, p in params[e].items()} for e in ENGINES}
    mag = {e: {n: torch.zeros_like(p) for n, p in params[e].items()} for e in ENGINES}
    chunks = list(x.to(dtype).split(cfg.train.micro_batch_size))
    if reverse:
        chunks = [c.flip(0) for c in reversed(chunks)]
    r1_now = L.r1_gamma > 0 and step % L.r1_every == 0
    gen.set_step(step)
    for xc in chunks:
        dec_out, q = gen(xc)
        x_rec = gen.to_image(dec_out).to(dtype)
        rec = (L.l2_weight * (x_rec - xc).square().mean() + L.l1_weight * (x_rec - xc).abs().mean()
               + L.logit_laplace_weight * logit_laplace_nll(dec_out, (xc + 1) / 2))
        perceptual = L.perceptual_weight * lpips(xc, x_rec).mean()
        disc.requires_grad_(False)  # a fixed function inside the generator's loss
        adv = gan_g_loss(L.gan_loss, disc(x_rec))
        lam = adaptive_weight(rec + perceptual, adv, gen.last_layer, L.adaptive_weight_max, L.adaptive_weight_scale)
        loss_g = rec + perceptual + L.quant_weight * q.loss + L.adv_weight * lam * adv
        disc.requires_grad_(True)
        real = xc.detach().requires_grad_(r1_now)
        logits_real = disc(real)
        loss_d = gan_d_loss(L.gan_loss, logits_real, disc(x_rec.detach()))
        if r1_now:
            loss_d = loss_d + L.r1_gamma / 2 * L.r1_every * r1_penalty(real, logits_real)
        for e, loss in (("generator", loss_g), ("discriminator", loss_d)):
            grads = torch.autograd.grad(loss, list(params[e].values()), allow_unused=True)
            for n, g in zip(params[e], grads):
                if g is not None:
                    mean[e][n] += g
                    mag[e][n] += g.abs()
    for e in ENGINES:
        for n in mean[e]:
            mean[e][n] /= len(chunks)
            mag[e][n] /= len(chunks)
    for name in ENGINES:
        mods[name].float()
    return mean, mag


def lr_at(optim, step: int, total: int) -> float:
    """Cosine from lr to lr * min_lr_ratio over ``total`` steps (the tests run without warm-up)."""
    assert optim.warmup_steps == 0
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * step / total)))


class ReferenceAdamW:
    """torch.optim.AdamW with the config's groups (weight decay on matrices unless a parameter opts out) that
    steps from the weights and with the gradient it is given."""

    def __init__(self, module: torch.nn.Module, optim):
        self.optim, self.delta = optim, 0.0
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()
                       if p.requires_grad}
        decay = {n for n, p in module.named_parameters()
                 if p.requires_grad and p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)}
        groups = [{"params": [p for n, p in self.params.items() if n in decay], "weight_decay": optim.weight_decay},
                  {"params": [p for n, p in self.params.items() if n not in decay], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas,
                                     eps=optim.eps)

    def step(self, weights: dict, grads: dict, lr: float) -> tuple[dict[str, torch.Tensor], float]:
        """The weights after one step, and delta: a bound on the relative difference between the clipping factors
        used so far here and those of any other fp32 evaluation of the same norms (0 while neither could clip)."""
        count = sum(g.numel() for g in grads.values())
        norm = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
        clip = self.optim.grad_clip
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        clipped = clip > 0 and norm * (1 + count * U) + 1e-6 >= clip  # may clip in another fp32 evaluation
        self.delta = max(self.delta, (count + 4) * U if clipped else 0.0)  # Adam's moments remember earlier steps
        for n, p in self.params.items():
            p.data.copy_(weights[n])
            p.grad = grads[n] * coef
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return {n: p.detach().clone() for n, p in self.params.items()}, self.delta


def tensor_norm(t: torch.Tensor) -> float:
    return t.double().norm().item()


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- the test ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero,accum", [(z, a) for z in (0, 1, 2) for a in (1, 2)],
                         ids=[f"zero{z}-accum{a}" for z in (0, 1, 2) for a in (1, 2)])
def test_gan_step_matches_plain_pytorch(tmp_path: Path, zero: int, accum: int, torchrun_env: dict) -> None:
    ov = overrides(zero, accum)
    cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", ov)
    chunks = WORLD * accum
    out = tmp_path / "ds.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(WORKER), "--out", str(out), "--steps", str(STEPS), *ov]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=torchrun_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    t1 = time.perf_counter()
    got = torch.load(out)
    mods = reference_modules(cfg, got["init"]["lpips"])
    for e in ENGINES:  # DeepSpeed starts from the weights the modules were built with
        for k, v in got["init"][e].items():
            assert torch.equal(got["states"][0][e][k], v), f"{e}.{k} changed before the first step"

    grad_ratios, weight_ratios = [], []
    opts = {e: ReferenceAdamW(mods[e], cfg.optim_g if e == "generator" else cfg.optim_d) for e in ENGINES}
    for step in range(STEPS):
        x = parity_worker.global_batch(step, cfg.train.global_batch_size, cfg.model.image_size)
        w = got["states"][step]
        with torch_threads(1):  # the ranks' one thread each (conftest.launch_env): the same CPU kernels
            ref, mag = reference_gradients(cfg, mods, w, x, step)
            probes = [reference_gradients(cfg, mods, w, x, step, dtype=torch.float64)[0],
                      reference_gradients(cfg, mods, w, x, step, reverse=True)[0]]
        for e in ENGINES:
            ds = got["grads"][step][e]
            assert ds.keys() == ref[e].keys()
            for n in ref[e]:
                noise = max(tensor_norm(ref[e][n] - p[e][n]) for p in probes)
                tol = 4 * noise + 2 * (chunks - 1) * U * tensor_norm(mag[e][n])
                err = tensor_norm(ds[n] - ref[e][n])
                ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
                grad_ratios.append((ratio, f"step {step} {e}.{n}: |g_ds - g_ref| = {err:.3g}, tol {tol:.3g} "
                                           f"(noise {noise:.3g}, |g_ref| {tensor_norm(ref[e][n]):.3g})"))

            optim = opts[e].optim
            lr = lr_at(optim, step, cfg.train.steps)
            assert got["lrs"][step][e] == pytest.approx(lr, rel=1e-12), f"step {step} {e}: learning rate"
            want, delta = opts[e].step(w[e], ds, lr)
            after = got["states"][step + 1][e]
            for n, v in want.items():
                err = (after[n].double() - v.double()).abs()
                tol = 4 * U * v.double().abs() + 2 * delta * (v.double() - w[e][n].double()).abs()
                worst = torch.where(err > 0, err / tol.clamp_min(1e-300), 0.0).max().item()
                weight_ratios.append((worst, f"step {step} {e}.{n}: max |w_ds - w_ref| = {err.max().item():.3g}"))

    grad_ratios.sort(reverse=True)
    weight_ratios.sort(reverse=True)
    print(f"\nZeRO {zero}, accumulation {accum}: DeepSpeed {t1 - t0:.1f} s, reference {time.perf_counter() - t1:.1f} s;"
          f" {sum(r > 1 for r, _ in grad_ratios)} of {len(grad_ratios)} gradients beyond tolerance;"
          f" worst gradient error / tol {grad_ratios[0][0]:.3g} ({grad_ratios[0][1]}); "
          f"worst weight error / tol {weight_ratios[0][0]:.3g} ({weight_ratios[0][1]})")
    bad = "\n".join(m for r, m in grad_ratios[:10] if r > 1)
    assert not bad, f"gradients differ from the plain-PyTorch reference beyond fp32 noise (worst first):\n{bad}"
    bad = "\n".join(m for r, m in weight_ratios[:10] if r > 1)
    assert not bad, f"weight updates differ from AdamW on DeepSpeed's own gradient (worst first):\n{bad}"
