"""Helpers the model tests share: a prior with unit-scale random weights, a small quantizer, one intra-op thread.

Test modules reach them through fixtures (pytest's importlib mode cannot import conftest), as ``tests/data`` does.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vitvq.configs import from_dict
from vitvq.models.prior import Prior, PriorConfig
from vitvq.models.quantizers import QuantizerConfig, build_quantizer


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine a 2-thread matmul can wait 15 ms
    at OpenMP's barrier for a descheduled thread (measured), which would make each test take a minute."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the prior ------------------------------------------------------------------------------------------
def build_prior(spec: str | dict = "debug", **over) -> Prior:
    """An eval-mode prior with random weights of unit-scale activations (the real init has a zero head, whose
    logits are all 0: every comparison of logits or tokens would pass vacuously)."""
    cfg = from_dict(PriorConfig, spec)
    model = Prior(dataclasses.replace(cfg, **over))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0.0, 1.0, generator=g)
            elif p.dim() == 2:  # std 1/sqrt(fan_in): O(1) attention scores and logits
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
            else:
                p.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def labels_for(model: Prior, n: int) -> torch.Tensor:
    c = model.cfg.num_classes
    return torch.arange(n) % c if c else torch.full((n,), model.cfg.null_class)


@pytest.fixture(scope="session")
def prior() -> SimpleNamespace:
    """``prior.build(spec, **over)`` and ``prior.labels_for(model, n)``, for ``test_prior*.py``."""
    return SimpleNamespace(build=build_prior, labels_for=labels_for)


# -- quantizers -----------------------------------------------------------------------------------------
def make_quantizer(dim: int = 6, **kw):
    return build_quantizer(QuantizerConfig(**{"codebook_size": 16, "code_dim": 4, **kw}), dim)


def to_rows(z: torch.Tensor) -> np.ndarray:
    """(B, D, h, w) -> (B*h*w, D) float64, the (b h w) order the quantizers use."""
    return z.detach().double().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()


@pytest.fixture(scope="session")
def quant() -> SimpleNamespace:
    """``quant.make(dim, **config)`` (16 codes of 4 dimensions unless told) and ``quant.to_rows(z)``."""
    return SimpleNamespace(make=make_quantizer, to_rows=to_rows)
