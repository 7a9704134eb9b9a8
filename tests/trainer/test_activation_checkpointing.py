"""Activation checkpointing changes memory, never the math: same loss, same gradients, blocks recomputed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vitvq.models.discriminators import build_discriminator
from vitvq.models.losses import Stage1Loss
from vitvq.models.tokenizer import Tokenizer
from vitvq.trainer.config import load_stage1_config
from vitvq.trainer.parallelize import apply_ac, checkpointable_blocks

ROOT = Path(__file__).resolve().parents[2]


def generator_grads(tok: Tokenizer, disc: torch.nn.Module, loss: Stage1Loss, x: torch.Tensor):
    """The full generator loss of a step with the discriminator active (adaptive weight included)."""
    tok.zero_grad(set_to_none=True)
    dec_out, q = tok(x)
    total, _ = loss.generator_loss(x, dec_out, q.loss, disc, step=10, last_layer=tok.last_layer)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in tok.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model", ["debug", "vqgan"])
def test_checkpointed_blocks_give_the_same_gradients(model: str) -> None:
    overrides = ["loss.disc_start=0", "loss.adaptive_weight=true"]
    if model == "vqgan":  # the CNN family: checkpointing wraps its ResNet/attention blocks the same way
        overrides += ["model.arch=vqgan", "model.cnn=debug-vqgan", "model.output=pixels",
                      "loss.logit_laplace_weight=0", "model.quantizer.factorize=false", "model.latent_dim=8"]
    cfg = load_stage1_config(ROOT / "configs/stage1/debug.yaml", overrides)
    torch.manual_seed(0)
    plain = Tokenizer(cfg.model)
    ckpt = copy.deepcopy(plain)
    blocks = checkpointable_blocks(ckpt)
    assert blocks, "nothing to checkpoint"
    apply_ac(blocks)
    disc = build_discriminator(cfg.disc, cfg.model.image_size, 3)
    loss = Stage1Loss(cfg.loss, cfg.model.output)
    x = torch.rand(2, 3, cfg.model.image_size, cfg.model.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    # Count forwards of a module inside the first block: checkpointing must run it again during backward.
    inner = next(m for m in blocks[0].modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    calls = []
    inner.register_forward_hook(lambda *a: calls.append(1))

    want_loss, want = generator_grads(plain, disc, loss, x)
    got_loss, got = generator_grads(ckpt, disc, loss, x)
    assert len(calls) >= 2, "the block was not recomputed: checkpointing is not active"
    assert torch.equal(got_loss, want_loss)
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # The state-dict keys do not change, so checkpoints load either way.
    assert list(plain.state_dict()) == list(ckpt.state_dict())
