"""Gradient parity: the stage-2 step on a real DeepSpeed ZeRO-2 engine (2 gloo ranks) against plain PyTorch.

``stage2_parity_worker.py`` runs the real ``Stage2Task.micro_step`` under torchrun and records, for every optimizer
step k, the weights before it (w_k), the data-parallel mean gradient about to be applied (g_k) and the learning
rate. The reference is written from the definition of the objective, not from ``Stage2Task`` or ``prior_loss``:
for each chunk c of the global batch (world x accumulation micro-batches), at DeepSpeed's weights w_k,

    L_c = mean over the chunk's B x N positions of -log softmax(Prior(z_c, y_c))[t, z_c[t]]

(``Prior.forward`` reads the condition and z_<t for position t; its causality and caching have their own tests in
tests/models/test_prior.py), g_ref = mean_c dL_c / dtheta, then w_{k+1} = AdamW(w_k, clip(g_k)). Dropout is off
(token, residual and label dropout draw from RNGs the reference does not share).

Tolerances as in test_gan_parity.py (its docstring derives them), with u = 2^-24: per parameter tensor
||g_ds - g_ref|| <= 4 noise + 2 (C - 1) u ||mean_c |g_c|||, noise measured at run time as the larger distance of
g_ref from two equal evaluations that round differently (float64 outside the model's fp32 islands; samples and
chunks in reverse order); weights per element |w_ds - w_ref| <= 4 u |w_ref| + 2 delta |w_ref - w_k|.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitvq.models.prior import Prior
from vitvq.trainer.config import load_job_config
from vitvq.trainer.stage2 import Stage2Config

pytestmark = pytest.mark.e2e  # 2-rank DeepSpeed runs
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gan_parity = _load("gan_parity_helpers", HERE / "test_gan_parity.py")  # ReferenceAdamW, lr_at, ...
WORKER = HERE / "stage2_parity_worker.py"
worker = _load("stage2_parity_worker", WORKER)  # its global_batch: the batches both sides see
U, WORLD, MICRO, STEPS = 2.0 ** -24, 2, 2, 3


def overrides(data: dict, accum: int) -> list[str]:
    return [f"tokenizer={data['tokenizer']}", f"tokens.train_tokens={data['train']}", "train.precision=fp32",
            "train.zero_stage=2", f"train.micro_batch_size={MICRO}", f"train.global_batch_size={WORLD * MICRO * accum}",
            "prior.token_dropout=0", "prior.resid_dropout=0", "prior.attn_dropout=0", "prior.label_dropout=0",
            "optim.warmup_steps=0", "optim.lr=1e-3", "optim.grad_clip=1.0", "optim.weight_decay=0.05"]


def reference_gradients(cfg, model: Prior, weights: dict, tokens: torch.Tensor, labels: torch.Tensor,
                        dtype: torch.dtype = torch.float32, reverse: bool = False) -> tuple[dict, dict]:
    model.load_state_dict(weights)
    model.to(dtype).train()
    params = dict(model.named_parameters())
    mean = {n: torch.zeros_like(p) for n, p in params.items()}
    mag = {n: torch.zeros_like(p) for n, p in params.items()}
    chunks = list(zip(tokens.split(cfg.train.micro_batch_size), labels.split(cfg.train.micro_batch_size)))
    if reverse:
        chunks = [(z.flip(0), y.flip(0)) for z, y in reversed(chunks)]
    for z, y in chunks:
        logits = model(z, y).to(dtype)  # (B, N, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), z.reshape(-1))
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            mean[n] += g
            mag[n] += g.abs()
    for n in mean:
        mean[n] /= len(chunks)
        mag[n] /= len(chunks)
    model.float()
    return mean, mag


@pytest.mark.parametrize("accum", [1, 2], ids=["accum1", "accum2"])
def test_stage2_step_matches_plain_pytorch(tmp_path: Path, accum: int, stage2_data: dict, torchrun_env: dict) -> None:
    ov = overrides(stage2_data, accum)
    config = ROOT / "configs/stage2/debug.yaml"
    cfg = load_job_config(Stage2Config, config, ov)
    out = tmp_path / "ds.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), str(WORKER),
           "--out", str(out), "--config", str(config), "--steps", str(STEPS), *ov]
    res = subprocess.run(cmd, env=torchrun_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    got = torch.load(out)
    for k, v in got["init"].items():
        assert torch.equal(got["states"][0][k], v), f"{k} changed before the first step"
    model = Prior(cfg.prior)
    opt = gan_parity.ReferenceAdamW(model, cfg.optim)
    chunks = WORLD * accum
    grad_ratios, weight_ratios = [], []
    for step in range(STEPS):
        p = cfg.prior
        tokens, labels = worker.global_batch(step, cfg.train.global_batch_size, p.seq_len, p.vocab_size, p.num_classes)
        w = got["states"][step]
        with gan_parity.torch_threads(1):
            ref, mag = reference_gradients(cfg, model, w, tokens, labels)
            probes = [reference_gradients(cfg, model, w, tokens, labels, dtype=torch.float64)[0],
                      reference_gradients(cfg, model, w, tokens, labels, reverse=True)[0]]
        ds = got["grads"][step]
        assert ds.keys() == ref.keys()
        for n in ref:
            noise = max(gan_parity.tensor_norm(ref[n] - p[n]) for p in probes)
            tol = 4 * noise + 2 * (chunks - 1) * U * gan_parity.tensor_norm(mag[n])
            err = gan_parity.tensor_norm(ds[n] - ref[n])
            ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
            grad_ratios.append((ratio, f"step {step} {n}: |g_ds - g_ref| = {err:.3g}, tol {tol:.3g}"))
        lr = gan_parity.lr_at(cfg.optim, step, cfg.train.steps)
        assert got["lrs"][step] == pytest.approx(lr, rel=1e-12), f"step {step}: learning rate"
        want, delta = opt.step(w, ds, lr)
        after = got["states"][step + 1]
        for n, v in want.items():
            err = (after[n].double() - v.double()).abs()
            tol = 4 * U * v.double().abs() + 2 * delta * (v.double() - w[n].double()).abs()
            worst = torch.where(err > 0, err / tol.clamp_min(1e-300), 0.0).max().item()
            weight_ratios.append((worst, f"step {step} {n}: max |w_ds - w_ref| = {err.max().item():.3g}"))
    grad_ratios.sort(reverse=True)
    weight_ratios.sort(reverse=True)
    print(f"\naccumulation {accum}: worst gradient error / tol {grad_ratios[0][0]:.3g} ({grad_ratios[0][1]}); "
          f"worst weight error / tol {weight_ratios[0][0]:.3g} ({weight_ratios[0][1]})")
    bad = "\n".join(m for r, m in grad_ratios[:10] if r > 1)
    assert not bad, f"gradients differ from the plain-PyTorch reference beyond fp32 noise (worst first):\n{bad}"
    bad = "\n".join(m for r, m in weight_ratios[:10] if r > 1)
    assert not bad, f"weight updates differ from AdamW on DeepSpeed's own gradient (worst first):\n{bad}"
