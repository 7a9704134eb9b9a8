"""Every quantizer kind: shapes, losses and gradients to the encoder, indices that decode to exactly the quantized
vectors, fp32 lookups in bf16 modules and under autocast, config validation (single process, CPU, < 10 s).

Hand computations of each kind's math: ``test_quantizers_math.py``; codebook statistics, restarts and k-means:
``test_codebook.py``; synchronization over two ranks: ``test_quantizers_dist.py``."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from vitvq.configs import ConfigError, field_docs, from_dict
from vitvq.models.quantizers import QuantizerConfig

KINDS = {
    "vq": dict(kind="vq"),
    "vq-raw": dict(kind="vq", l2_norm=False, factorize=False, code_dim=6),
    "ema": dict(kind="ema"),
    "ema-raw": dict(kind="ema", l2_norm=False, factorize=False, code_dim=6),
    "gumbel": dict(kind="gumbel"),
    "gumbel-soft": dict(kind="gumbel", gumbel_hard=False),
    "residual": dict(kind="residual", l2_norm=False, residual_depth=3),
    "residual-ema-shared": dict(kind="residual", l2_norm=False, residual_depth=3, residual_kind="ema",
                                residual_shared_codebook=True),
}



@pytest.mark.parametrize("name", KINDS)
def test_shapes_loss_and_gradients_reach_the_encoder(name, quant):
    torch.manual_seed(0)
    q = quant.make(**KINDS[name]).train()
    z = torch.randn(2, 6, 3, 5, requires_grad=True)
    out = q(z)
    depth = q.cfg.residual_depth if q.cfg.kind == "residual" else None
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == ((2, 3, 5, depth) if depth else (2, 3, 5)) and out.indices.dtype == torch.long
    assert 0 <= out.indices.min() and out.indices.max() < 16
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    assert 1.0 <= out.stats["perplexity"] <= 16.0 and 0 < out.stats["usage"] <= 1
    (g_st,) = torch.autograd.grad(out.quantized.sum(), z, retain_graph=True)  # decoder -> encoder
    (g_loss,) = torch.autograd.grad(out.loss, z)  # commitment / KL -> encoder
    assert g_st.abs().sum() > 0 and g_loss.abs().sum() > 0
    if name in ("vq-raw", "ema-raw"):  # no projection: straight-through is the identity
        assert torch.equal(g_st, torch.ones_like(z))


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("training", [False, True])
def test_get_codes_reproduces_quantized_exactly(name, training, quant):
    torch.manual_seed(1)
    q = quant.make(**KINDS[name]).train(training)
    z = torch.randn(2, 6, 4, 3)
    before = copy.deepcopy(q)  # in training, EMA updates the codebook after the lookup
    with torch.no_grad():
        out = q(z)
        assert torch.equal(before.get_codes(out.indices), out.quantized)
        if not training:
            assert torch.equal(q.get_codes(out.indices), out.quantized)
    if not (training and name == "gumbel-soft"):  # with grad: straight-through, equal up to rounding
        out = copy.deepcopy(before)(z.requires_grad_())
        torch.testing.assert_close(before.get_codes(out.indices), out.quantized, atol=1e-5, rtol=1e-5)


def test_bf16_module_picks_codes_in_fp32(quant):
    # Codes a = 1 + 2^-7 and b = 1 - 2^-8 (both exact in bf16) around x = 1: |x-a|^2 = 2^-14 > |x-b|^2 = 2^-16.
    # The expanded distance |x|^2 - 2x.c + |c|^2 evaluated in bf16 rounds both to 0 and picks a.
    codes = torch.tensor([[1 + 2 ** -7, 0.0], [1 - 2 ** -8, 0.0], [0.0, 1.0]])
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    xb, cb = rows.bfloat16(), codes.bfloat16()
    naive = ((xb * xb).sum(1, keepdim=True) - 2 * xb @ cb.T + (cb * cb).sum(1)).argmin(1)
    assert naive.tolist() == [0, 2]  # the failure the fp32 cast prevents
    for kind in ("vq", "ema"):
        q32 = quant.make(dim=2, kind=kind, codebook_size=3, code_dim=2, l2_norm=False, factorize=False).eval()
        q32.codebook.weight.data.copy_(codes)
        q16 = copy.deepcopy(q32).to(torch.bfloat16)
        z = rows.T.reshape(1, 2, 1, 2)
        with torch.no_grad():
            o32, o16 = q32(z), q16(z.bfloat16())
        assert o32.indices.reshape(-1).tolist() == [1, 2] and torch.equal(o16.indices, o32.indices)
        assert o16.quantized.dtype == torch.bfloat16 and o16.loss.dtype == torch.float32
        if kind == "ema":  # EMA statistics stay fp32 under module.to(bf16)
            assert all(b.dtype == torch.float32 for n, b in q16.codebook.named_buffers() if b.is_floating_point())
    # Random l2-normalized case: bf16 module == fp32 module on the same bf16-representable values.
    torch.manual_seed(5)
    q32 = quant.make(dim=8, kind="vq", codebook_size=64, code_dim=8, factorize=False).eval()
    q32.codebook.weight.data = q32.codebook.weight.data.bfloat16().float()
    q16 = copy.deepcopy(q32).to(torch.bfloat16)
    z = torch.randn(4, 8, 6, 6).bfloat16()
    with torch.no_grad():
        assert torch.equal(q16(z).indices, q32(z.float()).indices)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_autocast_does_not_reach_the_lookup(device, quant):
    torch.manual_seed(9)
    q = quant.make(dim=8, kind="vq", codebook_size=256, code_dim=8, factorize=False).to(device).eval()
    z = torch.randn(8, 8, 8, 8, device=device)
    with torch.no_grad():
        ref = q(z)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = q(z)
    assert torch.equal(out.indices, ref.indices)
    assert out.stats["perplexity"].dtype == torch.float32


def test_config_validation_and_docs(quant):
    with pytest.raises(ConfigError, match="l2_norm"):
        QuantizerConfig(kind="residual")
    with pytest.raises(ConfigError, match="restart_dead_codes"):
        QuantizerConfig(kind="gumbel", restart_dead_codes=True)
    with pytest.raises(ConfigError, match="code_dim"):
        quant.make(dim=6, factorize=False, code_dim=4)
    with pytest.raises(ConfigError, match="ema_decay"):
        from_dict(QuantizerConfig, {"kind": "ema", "ema_decay": 1.0})
    cfg = from_dict(QuantizerConfig, {"kind": "residual", "l2_norm": False, "residual_depth": 2})
    assert cfg.residual_depth == 2 and cfg.codebook_size == 8192
    assert set(field_docs(QuantizerConfig)) == {f.name for f in dataclasses.fields(QuantizerConfig)}


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("factorize", [True, False])
def test_deepspeed_style_bf16_params_with_fp32_buffers(name, factorize):
    """DeepSpeed bf16 casts parameters only; buffers (EMA statistics, dtype markers) stay fp32. The quantized
    output must then follow the parameters, or the next bf16 layer meets an fp32 input."""
    from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
    cfg = dataclasses.replace(TokenizerConfig.PRESETS["debug"],
                              quantizer=from_dict(QuantizerConfig, {**KINDS[name], "factorize": factorize,
                                                                    "code_dim": 8 if factorize else 64}))
    tok = Tokenizer(cfg)
    for p in tok.parameters():
        p.data = p.data.bfloat16()
    x = torch.rand(2, 3, 32, 32).bfloat16() * 2 - 1
    dec_out, q = tok(x)  # raised "mat1 and mat2 must have the same dtype" before the fix
    assert dec_out.dtype == torch.bfloat16
    assert tok.decode_codes(q.indices).dtype == torch.bfloat16
