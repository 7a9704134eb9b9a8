"""Sampling from the stage-2 prior: KV-cached decoding with classifier-free guidance, temperature, top-k, top-p.

``generate`` decodes all ``grid**2`` tokens of a batch. With guidance the batch runs doubled as
``[cond; null]`` and each step mixes ``uncond + s * (cond - uncond)`` on the raw logits, before temperature,
top-k and top-p (as LlamaGen's ``generate.py``); the sampled token is fed to both halves. Every row draws its
randomness from its own ``torch.Generator``, one uniform per token, by inverting the CDF of its own filtered
distribution, so a sample depends on its generator and its logits only, never on the batch it is in.

``SamplingSettings`` is the one declaration of every sampling setting: ``generate`` reads it, and the training grid
(``trainer/stage2.SampleGridConfig``), the sampling job (``evaluation/sampling.SampleConfig``, hence the flags of
``launch/sample.py``) and the pipeline's ``sample`` step inherit it. A new setting (say ``min_p``) is one field and
its check here, read where the filter is applied (``sample_logits``).

``use_cache=False`` reruns the whole prefix at every step (no cache): the baseline of
``benchmarks/sample_prior.py`` and the reference of the cache-equivalence tests.

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
    tokens = generate(model, labels, SamplingSettings(cfg_scale=2.0, top_k=100), generators=gens)  # (B, N)
    images = tokenizer.to_image(tokenizer.decode_codes(tokens.view(-1, grid, grid)))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

from vitvq.configs import check
from vitvq.models.prior import Prior

CfgSchedule = Literal["constant", "linear"]


@dataclass
class SamplingSettings:
    """How tokens are drawn from the prior: guidance, temperature, filters and the base seed."""

    cfg_scale: float = field(default=2.0, metadata={"flags": ("--cfg",)})
    """Classifier-free guidance scale (1 = none; guidance needs a class-conditional prior)."""
    cfg_schedule: CfgSchedule = "constant"
    """Guidance over the tokens: constant, or ramping linearly from 1 at the first token to cfg_scale at the last."""
    temperature: float = 1.0
    """Softmax temperature (0 = greedy)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1] (1 = all)."""
    seed: int = 0
    """Base seed: sample i gets its own generator, splitmix64(seed * 2**31 + i)."""

    def __post_init__(self) -> None:
        check(math.isfinite(self.cfg_scale) and self.cfg_scale >= 0, "cfg_scale", self.cfg_scale,
              "must be a finite number >= 0")
        check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
              "must be >= 0 (0 = greedy)")
        check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = all tokens)")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        check(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")

    def sampling_settings(self) -> "SamplingSettings":
        """These settings alone, without the fields of a config that inherits them (what a worker is sent)."""
        return SamplingSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingSettings)})


def cfg_scales(schedule: CfgSchedule, scale: float, n: int) -> list[float]:
    """Guidance scale per token: ``constant`` = ``scale`` everywhere; ``linear`` ramps from 1 at the first token
    (no guidance) to ``scale`` at the last, ``s_t = 1 + (scale - 1) * t / (n - 1)`` (``scale`` when n = 1)."""
    if schedule == "constant":
        return [float(scale)] * n
    if schedule == "linear":
        return [float(scale) if n == 1 else 1.0 + (scale - 1.0) * t / (n - 1) for t in range(n)]
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")


def sample_logits(logits: torch.Tensor, settings: SamplingSettings,
                  generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,) int64. ``temperature = 0`` is greedy (argmax, no randomness).

    Otherwise: logits / temperature, keep the ``top_k`` largest (0 = all), then the smallest set of most likely
    tokens whose probability reaches ``top_p`` (1 = all; Holtzman et al.), renormalise, and take the token
    where row i's uniform from ``generators[i]`` falls in the CDF. (Guidance is ``generate``'s: it mixes the
    logits before they come here.)"""
    temperature, top_k, top_p = settings.temperature, settings.top_k, settings.top_p
    if temperature == 0:
        return logits.argmax(-1)
    B, V = logits.shape
    if generators is None or len(generators) != B:
        raise ValueError(f"sampling needs one torch.Generator per row: {B} rows, "
                         f"{'no' if generators is None else len(generators)} generators")
    logits = logits.float() / temperature
    if 0 < top_k < V:
        vals, idx = logits.topk(top_k, dim=-1)  # (B, k), sorted descending
    elif top_p < 1.0:
        vals, idx = logits.sort(dim=-1, descending=True)
    else:
        vals, idx = logits, None
    probs = vals.softmax(-1)
    if top_p < 1.0:  # vals are sorted here: drop a token once the mass before it already reaches top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    if idx is not None:  # back to vocabulary order: two nearly tied logits that swap places in the sorted order
        # (float noise across batch sizes) then move the CDF by that noise only, not by their whole probability.
        probs = torch.zeros_like(logits).scatter_(-1, idx, probs)  # (B, V)
    cdf = probs.cumsum(-1)  # unnormalised: the uniform is scaled by the row's total instead
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(cdf.device)  # (B,)
    total = cdf[:, -1:]  # (B, 1)
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # u * total < total
    # right=True: the first index whose CDF exceeds x, which is never a zero-probability token.
    j = torch.searchsorted(cdf, x, right=True)  # (B, 1)
    return j[:, 0]


@torch.no_grad()
def generate(model: Prior, labels: torch.Tensor, settings: SamplingSettings, *,
             generators: Optional[Sequence[torch.Generator]] = None, use_cache: bool = True,
             return_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample (B, grid**2) token grids in raster order for labels (B,) (unconditional model: all ``null_class``)
    with ``settings`` (their ``seed`` is the caller's: it made ``generators``, one per row).

    Guidance is on unless every token's scale is 1: then the plain conditional batch runs (exactly conditional
    sampling, and half the work). ``return_logits`` also returns the guided logits each token was
    drawn from (B, N, vocab), before temperature and filtering. The model runs in eval mode (no dropout) and is
    put back in its mode afterwards."""
    cfg = model.cfg
    B, N = labels.shape[0], cfg.seq_len
    scales = cfg_scales(settings.cfg_schedule, settings.cfg_scale, N)
    guided = any(s != 1.0 for s in scales)
    if guided and cfg.num_classes == 0:
        raise ValueError("classifier-free guidance needs a class-conditional prior (cfg.num_classes > 0)")
    cond = torch.cat([labels, torch.full_like(labels, cfg.null_class)]) if guided else labels  # (B or 2B,)
    rows = cond.shape[0]
    tokens = torch.zeros(rows, N, dtype=torch.long, device=labels.device)  # both halves hold the same tokens
    all_logits = [] if return_logits else None
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(rows) if use_cache else None
        for t in range(N):
            if use_cache:
                logits = model.prefill(cache, cond) if t == 0 else model.decode(cache, tokens[:, t - 1:t])[:, 0]
            else:
                logits = model.next_logits(tokens[:, :t], cond)  # the whole prefix again
            if guided:  # (2B, V) -> (B, V)
                c, u = logits.chunk(2)
                logits = u + scales[t] * (c - u)
            if all_logits is not None:
                all_logits.append(logits)
            nxt = sample_logits(logits, settings, generators)
            tokens[:, t] = nxt.repeat(rows // B)
    finally:
        model.train(was_training)
    out = tokens[:B]
    return (out, torch.stack(all_logits, dim=1)) if all_logits is not None else out


__all__ = ["SamplingSettings", "CfgSchedule", "generate", "sample_logits", "cfg_scales"]
