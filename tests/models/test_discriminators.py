"""Tests for models/discriminators.py: shapes of both kinds, bf16, equalized lr, the blur filter, minibatch
std against a loop, R1 double backward against finite differences, taming's init, config errors. CPU only."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitvq.configs import ConfigError, field_docs, from_dict
from vitvq.models.discriminators import (Blur, DiscBlock, DiscConfig, EqualConv2d, EqualLinear, MinibatchStd,
                                   PatchGANDiscriminator, ScaledLeakyReLU, StyleGAN2Discriminator,
                                   build_discriminator)
from vitvq.models.losses import r1_penalty

TINY_SG2 = DiscConfig(kind="stylegan2", channel_base=128, channel_max=16)
TINY_PATCH = DiscConfig(kind="patchgan", patchgan_ndf=8, patchgan_norm="group")


@pytest.mark.parametrize("size", [32, 64])
def test_stylegan2_output_shape(size: int) -> None:
    torch.manual_seed(0)
    d = build_discriminator(TINY_SG2, size)
    assert isinstance(d, StyleGAN2Discriminator)
    assert len(d.blocks) == int(math.log2(size)) - 2  # size -> 4 by halvings
    y = d(torch.randn(4, 3, size, size))
    assert y.shape == (4, 1) and torch.isfinite(y).all()


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("size, side", [(32, 2), (64, 6)])
def test_patchgan_output_shape(size: int, side: int, norm: str) -> None:
    torch.manual_seed(0)
    d = build_discriminator(dataclasses.replace(TINY_PATCH, patchgan_norm=norm), size)
    y = d(torch.randn(2, 3, size, size))
    assert y.shape == (2, 1, side, side) and torch.isfinite(y).all()


def test_full_size_discriminators_at_256_on_meta() -> None:
    with torch.device("meta"):
        sg2 = build_discriminator(DiscConfig(kind="stylegan2"), 256)
        patch = build_discriminator(DiscConfig(kind="patchgan"), 256)
        x = torch.empty(2, 3, 256, 256)
        assert sg2(x).shape == (2, 1)
        assert patch(x).shape == (2, 1, 30, 30)  # taming's 30x30 patch map at 256px
    # StyleGAN2 channels at 256: 128 (cbase 32768 / 256) up to 512 from 64px down; 28.9M parameters.
    assert sg2.from_rgb[0].weight.shape == (128, 3, 1, 1)
    assert sum(p.numel() for p in sg2.parameters()) == pytest.approx(28.86e6, rel=2e-3)
    # taming's NLayerDiscriminator(3, 64): 64 -> 128 -> 256 -> 512 -> 1 channels, 2.77M parameters.
    convs = [m for m in patch.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]  # no bias before BatchNorm
    assert sum(p.numel() for p in patch.parameters()) == 2_765_633


def test_stylegan2_runs_in_bf16() -> None:
    torch.manual_seed(0)
    d = build_discriminator(TINY_SG2, 32)
    x = torch.randn(4, 3, 32, 32).clamp(-1, 1)
    ref = d(x)
    d16 = d.to(torch.bfloat16)
    blur = next(m for m in d16.modules() if isinstance(m, Blur))
    assert blur.kernel.dtype == torch.bfloat16  # the FIR buffer follows the module dtype
    y = d16(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), ref, atol=0.05 + 0.05 * ref.abs().max().item())


@pytest.mark.parametrize("lr_mul", [1.0, 0.01])
def test_equalized_lr_scales_stored_weights_by_one_over_sqrt_fan_in(lr_mul: float) -> None:
    torch.manual_seed(0)
    conv = EqualConv2d(5, 7, 3, padding=1, lr_mul=lr_mul)
    with torch.no_grad():
        conv.bias.normal_()
    assert conv.weight.std().item() == pytest.approx(1.0 / lr_mul, rel=0.15)  # stored N(0, 1/lr_mul^2)
    x = torch.randn(2, 5, 6, 6)
    w_eff = conv.weight.detach() * lr_mul / math.sqrt(5 * 3 * 3)
    expected = F.conv2d(x, w_eff, conv.bias.detach() * lr_mul, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)

    lin = EqualLinear(10, 4, lr_mul=lr_mul)
    z = torch.randn(3, 10)
    assert torch.allclose(lin(z), z @ (lin.weight.detach() * lr_mul / math.sqrt(10)).T, atol=1e-5)
    act = EqualLinear(10, 4, activate=True)
    pre = z @ (act.weight.detach() / math.sqrt(10)).T
    assert torch.allclose(act(z), torch.where(pre > 0, pre, 0.2 * pre) * math.sqrt(2), atol=1e-5)


def test_blur_filter_is_the_normalized_binomial_and_filters_depthwise() -> None:
    blur = Blur((2, 2))
    expected = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
    assert np.allclose(blur.kernel.numpy(), expected) and blur.kernel.sum().item() == pytest.approx(1.0)
    assert "kernel" in dict(blur.named_buffers())
    # A constant image stays constant inside (the filter has unit DC gain), channels are filtered separately.
    x = torch.stack([torch.full((8, 8), 3.0), torch.full((8, 8), -2.0)])[None]  # (1, 2, 8, 8)
    y = blur(x)
    assert y.shape == (1, 2, 9, 9)
    assert torch.allclose(y[0, 0, 3:-3, 3:-3], torch.tensor(3.0))
    assert torch.allclose(y[0, 1, 3:-3, 3:-3], torch.tensor(-2.0))
    # An impulse comes out as the kernel itself.
    imp = torch.zeros(1, 1, 7, 7)
    imp[0, 0, 3, 3] = 1.0
    out = Blur((0, 0))(imp)
    assert np.allclose(out[0, 0, 0:4, 0:4].numpy(), expected[::-1, ::-1])


def test_residual_block_sums_blurred_paths_over_sqrt2() -> None:
    torch.manual_seed(0)
    block = DiscBlock(4, 6)
    x = torch.randn(2, 4, 8, 8)
    c1, c2, skip = block.conv1, block.conv2, block.skip
    assert isinstance(c1[-1], ScaledLeakyReLU) and isinstance(c2[-1], ScaledLeakyReLU)
    assert isinstance(c2[0], Blur) and isinstance(skip[0], Blur) and len(skip) == 2  # skip: blur + 1x1, linear
    assert c2[1].stride == 2 and skip[1].stride == 2 and skip[1].bias is None

    def lrelu(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t > 0, t, 0.2 * t) * math.sqrt(2)

    def eq(conv: EqualConv2d, t: torch.Tensor) -> torch.Tensor:
        k = conv.weight.shape[-1]
        b = conv.bias.detach() if conv.bias is not None else None
        return F.conv2d(t, conv.weight.detach() / math.sqrt(conv.weight[0].numel()), b, stride=conv.stride,
                        padding=conv.padding if k == 3 and conv.stride == 1 else 0)

    def blur(t: torch.Tensor, p: int) -> torch.Tensor:
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = (k[:, None] * k[None, :] / 64).expand(t.shape[1], 1, 4, 4)
        return F.conv2d(F.pad(t, (p, p, p, p)), k, groups=t.shape[1])

    main = lrelu(eq(c2[1], blur(lrelu(eq(c1[0], x)), 2)))
    side = eq(skip[1], blur(x, 1))
    with torch.no_grad():
        assert torch.allclose(block(x), (main + side) / math.sqrt(2), atol=1e-5)
    assert block(x).shape == (2, 6, 4, 4)


@pytest.mark.parametrize("n, group, nch", [(4, 2, 1), (6, 4, 1), (4, 4, 2)])
def test_minibatch_std_matches_a_hand_loop(n: int, group: int, nch: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(n, 4, 3, 3)
    out = MinibatchStd(group, nch)(x)
    assert out.shape == (n, 4 + nch, 3, 3)
    assert torch.equal(out[:, :4], x)
    g = max(d for d in range(1, group + 1) if n % d == 0)  # 6 with group 4 -> groups of 3
    m = n // g
    xn = x.double().numpy()
    c = 4 // nch
    for i in range(n):
        members = [j for j in range(n) if j % m == i % m]  # ADA layout: sample i is in group i mod (n/g)
        assert len(members) == g
        for f in range(nch):
            feats = xn[members][:, f * c:(f + 1) * c]  # (g, c, 3, 3)
            std = np.sqrt(feats.var(axis=0) + 1e-8).mean()
            assert np.allclose(out[i, 4 + f].numpy(), std, atol=1e-5)


def test_r1_double_backward_through_stylegan2_matches_finite_differences() -> None:
    torch.manual_seed(0)
    d = build_discriminator(dataclasses.replace(TINY_SG2, mbstd_group_size=2), 32).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def penalty() -> torch.Tensor:
        real = x.clone().requires_grad_(True)
        return r1_penalty(real, d(real))

    r1 = penalty()
    assert r1.item() > 0
    r1.backward()
    grads = {n: p.grad for n, p in d.named_parameters()}
    assert grads["out.bias"] is None  # a bias does not change the input gradient: not in the R1 graph
    w = d.final_linear.weight
    assert grads["final_linear.weight"].abs().sum().item() > 0
    idx, eps = (3, 5), 1e-6
    values = []
    for shift in (eps, -2 * eps):
        with torch.no_grad():
            w[idx] += shift
        values.append(penalty().item())
    up, down = values
    assert grads["final_linear.weight"][idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_r1_through_patchgan_in_fp32(norm: str) -> None:
    torch.manual_seed(0)
    d = build_discriminator(dataclasses.replace(TINY_PATCH, patchgan_norm=norm), 32)
    real = torch.randn(2, 3, 32, 32, requires_grad=True)
    r1 = r1_penalty(real, d(real))
    r1.backward()
    assert torch.isfinite(r1) and r1.item() > 0
    weights = [m.weight for m in d.modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.BatchNorm2d))]
    assert all(w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0 for w in weights)


def test_patchgan_uses_taming_init() -> None:
    torch.manual_seed(0)
    d = build_discriminator(dataclasses.replace(DiscConfig.PRESETS["patchgan"], patchgan_ndf=32), 64)
    assert isinstance(d, PatchGANDiscriminator)
    weights = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert weights.mean().abs().item() < 2e-3 and weights.std().item() == pytest.approx(0.02, rel=0.05)
    bn = torch.cat([m.weight for m in d.modules() if isinstance(m, nn.BatchNorm2d)])
    assert bn.mean().item() == pytest.approx(1.0, abs=0.01) and bn.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(m.bias.abs().max() == 0 for m in d.modules() if isinstance(m, nn.BatchNorm2d))


def test_config_validation_and_docs() -> None:
    with pytest.raises(ConfigError, match="channel_max"):
        DiscConfig(channel_max=0)
    with pytest.raises(ConfigError, match="kind"):
        from_dict(DiscConfig, {"kind": "biggan"})
    with pytest.raises(ConfigError, match="patchgan_norm"):
        from_dict(DiscConfig, {"patchgan_norm": "instance"})
    with pytest.raises(ConfigError, match="image_size"):
        build_discriminator(TINY_SG2, 48)
    with pytest.raises(ConfigError, match="patchgan_layers"):
        build_discriminator(dataclasses.replace(TINY_PATCH, patchgan_layers=5), 32)
    assert from_dict(DiscConfig, "debug").channel_max == 32
    assert from_dict(DiscConfig, {"preset": "patchgan", "patchgan_norm": "group"}).patchgan_norm == "group"
    docs = field_docs(DiscConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(DiscConfig))
