"""Tests for models/vit.py and models/cnn.py: shapes, paper sizes, position table, locality, no output
activation, gradient flow, activation checkpointing, config errors. CPU only; big presets run on meta."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vitvq.models.cnn import AttnBlock, CNNConfig, CNNDecoder, CNNEncoder, Downsample, ResnetBlock
from vitvq.configs import ConfigError, field_docs, from_dict
from vitvq.models.tokenizer import TokenizerConfig
from vitvq.models.vit import Block, ViTConfig, ViTDecoder, ViTEncoder, sincos_pos_embed_2d

VIT = ViTConfig.PRESETS
CNN = CNNConfig.PRESETS


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def vit_pair(size: int = 32, dim: int = 16, out: int = 6, conv_head: int = 0) -> tuple[ViTEncoder, ViTDecoder]:
    torch.manual_seed(0)
    dec = dataclasses.replace(VIT["debug"], conv_head=conv_head)
    return ViTEncoder(VIT["debug"], size, 3, dim), ViTDecoder(dec, size, dim, out)


def cnn_pair(name: str, size: int = 32, dim: int = 16) -> tuple[CNNEncoder, CNNDecoder]:
    torch.manual_seed(0)
    return CNNEncoder(CNN[name], size, 3, dim), CNNDecoder(CNN[name], size, dim, 3)


# -- ViT ------------------------------------------------------------------------------------------------
def test_vit_presets_are_the_paper_sizes() -> None:
    # ViT-VQGAN table 1: (depth, width, heads, mlp)
    paper = {"small": (8, 512, 8, 2048), "base": (12, 768, 12, 3072), "large": (32, 1280, 16, 5120)}
    for name, sizes in paper.items():
        c = VIT[name]
        assert (c.depth, c.width, c.heads, c.mlp_dim, c.patch_size) == (*sizes, 8)
    assert from_dict(ViTConfig, "base") == VIT["base"]
    assert from_dict(ViTConfig, {"preset": "small", "depth": 4}).depth == 4
    assert set(field_docs(ViTConfig)) == {f.name for f in dataclasses.fields(ViTConfig)}
    assert set(field_docs(CNNConfig)) == {f.name for f in dataclasses.fields(CNNConfig)}


@pytest.mark.parametrize("name", ["small", "base", "large"])
def test_vit_big_presets_shapes_and_param_counts_on_meta(name: str) -> None:
    c = VIT[name]
    with torch.device("meta"):
        enc = ViTEncoder(c, 256, 3, c.width)
        dec = ViTDecoder(c, 256, 32, 6)
        z = enc(torch.empty(2, 3, 256, 256))
        y = dec(torch.empty(2, 32, 32, 32))
    assert z.shape == (2, c.width, 32, 32) and y.shape == (2, 6, 256, 256)
    w, m, p = c.width, c.mlp_dim, 8
    attn = (3 * w * w + 3 * w) + (w * w + w)  # qkv + output projection, with biases
    mlp = (w * m + m) + (m * w + w)
    norms = 2 * (2 * w)
    per_block = attn + mlp + norms
    head = (w * m + m) + (m * w + w)  # tanh FFN back to out_dim = width
    expected = (3 * p * p * w + w) + c.depth * per_block + 2 * w + head
    assert n_params(enc) == expected
    assert len(enc.blocks) == c.depth and len(dec.blocks) == c.depth


@pytest.mark.parametrize("size", [32, 64])
def test_vit_debug_runs(size: int) -> None:
    enc, dec = vit_pair(size)
    x = torch.randn(2, 3, size, size)
    z = enc(x)
    assert z.shape == (2, 16, size // 8, size // 8)
    y = dec(z)
    assert y.shape == (2, 6, size, size) and torch.isfinite(y).all()


def test_sincos_table_by_hand() -> None:
    width, gh, gw = 8, 2, 3
    table = sincos_pos_embed_2d(width, gh, gw)
    om = [1.0, 10000 ** (-1 / 2)]  # width/4 = 2 frequencies: 10000^(-k/2)
    for r in range(gh):
        for c in range(gw):
            row = [math.sin(r * om[0]), math.sin(r * om[1]), math.cos(r * om[0]), math.cos(r * om[1])]
            col = [math.sin(c * om[0]), math.sin(c * om[1]), math.cos(c * om[0]), math.cos(c * om[1])]
            torch.testing.assert_close(table[r * gw + c], torch.tensor(row + col), atol=1e-6, rtol=0)
    enc, dec = vit_pair(32)
    torch.testing.assert_close(enc.pos_embed[0], sincos_pos_embed_2d(64, 4, 4))
    for mod in (enc, dec):
        assert "pos_embed" not in mod.state_dict()
        assert all(p is not mod.pos_embed for p in mod.parameters())


def test_meta_build_then_init_weights_restores_position_table() -> None:
    with torch.device("meta"):
        enc = ViTEncoder(VIT["debug"], 32, 3, 16)
    enc.to_empty(device="cpu")
    enc.init_weights()
    torch.testing.assert_close(enc.pos_embed[0], sincos_pos_embed_2d(64, 4, 4))
    assert torch.isfinite(enc(torch.randn(1, 3, 32, 32))).all()


def test_block_matches_hand_computation() -> None:
    torch.manual_seed(0)
    cfg = ViTConfig(width=16, depth=1, heads=4, mlp_dim=24)
    blk = Block(cfg).double()
    for prm in blk.parameters():
        nn.init.normal_(prm, std=0.3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)

    def ln(t: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * g + b

    h = ln(x, blk.norm1.weight, blk.norm1.bias)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    heads = []
    for i in range(4):
        q, k, v = (qkv[..., j * 16 + i * 4: j * 16 + (i + 1) * 4] for j in range(3))
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # sqrt(head_dim 4) = 2
        heads.append(a @ v)
    x1 = x + torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = ln(x1, blk.norm2.weight, blk.norm2.bias) @ blk.fc1.weight.T + blk.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    expected = x1 + h @ blk.fc2.weight.T + blk.fc2.bias
    torch.testing.assert_close(blk(x), expected)


def test_vit_patches_map_to_their_own_tokens() -> None:
    # Without the blocks every op is per token, so a pixel may only move its own patch's token, and a
    # token only its own 8x8 output patch: checks the patch <-> token raster order (row, then column).
    enc, dec = vit_pair(32)
    enc.blocks, dec.blocks = nn.ModuleList(), nn.ModuleList()
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[0, 1, 13, 26] += 1.0  # row 13 -> token row 1, column 26 -> token column 3
    changed = (enc(x2) - enc(x)).abs().sum(1)[0] > 0  # (4, 4)
    assert changed.nonzero().tolist() == [[1, 3]]
    z = torch.randn(1, 16, 4, 4)
    z2 = z.clone()
    z2[0, :, 2, 1] += 1.0
    changed = (dec(z2) - dec(z)).abs().sum(1)[0] > 0  # (32, 32)
    expect = torch.zeros(32, 32, dtype=torch.bool)
    expect[16:24, 8:16] = True
    assert torch.equal(changed, expect)


def test_conv_head_reaches_two_pixels_across_patch_borders() -> None:
    # Without the blocks, a token moves its own 8x8 patch and, through the two 3x3 convolutions, the two pixels
    # beyond each border of it (clipped at the image edge), and nothing else.
    _, dec = vit_pair(32, conv_head=8)
    dec.blocks = nn.ModuleList()
    z = torch.randn(1, 16, 4, 4)
    for row, col, rows, cols in ((2, 1, slice(14, 26), slice(6, 18)), (0, 3, slice(0, 10), slice(22, 32))):
        z2 = z.clone()
        z2[0, :, row, col] += 1.0
        changed = (dec(z2) - dec(z)).abs().sum(1)[0] > 0  # (32, 32)
        expect = torch.zeros(32, 32, dtype=torch.bool)
        expect[rows, cols] = True
        assert torch.equal(changed, expect), (row, col)


def test_conv_head_is_built_on_meta_and_refused_on_the_encoder() -> None:
    cfg = dataclasses.replace(VIT["debug"], conv_head=8)
    with torch.device("meta"):
        dec = ViTDecoder(cfg, 32, 16, 6)
    dec.to_empty(device="cpu")
    with torch.no_grad():
        dec.conv_head.conv1.weight.fill_(float("nan"))  # what to_empty may leave: init_weights must reset it
    torch.manual_seed(0)
    dec.init_weights()
    for conv in (dec.conv_head.conv1, dec.conv_head.conv2):
        bound = 1 / math.sqrt(conv.in_channels * 9)  # PyTorch's default conv init: uniform in +-1/sqrt(fan_in)
        assert all(torch.isfinite(p).all() and p.abs().max() <= bound for p in (conv.weight, conv.bias))
        assert conv.weight.std() > 0.5 * bound  # uniform: std = bound / sqrt(3) = 0.577 bound (>= 384 draws)
    assert torch.isfinite(dec(torch.randn(1, 16, 4, 4))).all()
    with pytest.raises(ConfigError) as err:
        from_dict(TokenizerConfig, {"preset": "debug", "encoder": {"preset": "debug", "conv_head": 8}}, "model")
    assert err.value.field == "model.encoder.conv_head"
    with pytest.raises(ConfigError, match="'conv_head'"):
        ViTConfig(conv_head=-1)


def test_vit_head_is_tanh_ffn_without_output_activation() -> None:
    enc, dec = vit_pair(32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        enc.head.fc2.weight.mul_(1000)
        dec.head.fc2.weight.mul_(1000)
        z, y = enc(x), dec(torch.randn(2, 16, 4, 4))
    for out in (z, y):  # no tanh/sigmoid/relu at the output: unbounded on both sides
        assert out.max() > 2 and out.min() < -2
    with torch.no_grad():  # a saturated middle tanh bounds each output by sum|W2| + |b2|
        enc.head.fc1.weight.mul_(1e4)
        bound = enc.head.fc2.weight.abs().sum(1) + enc.head.fc2.bias.abs()
        z = enc(x)
    assert (z.abs() <= bound[None, :, None, None] * (1 + 1e-5)).all()  # a GELU/identity middle: ~1e4x over


def _last_layer_is_linear_output(dec: nn.Module, z: torch.Tensor, bias: torch.Tensor) -> None:
    # The output must be linear in last_layer (nothing after it): zero bias, double weight -> double output.
    assert isinstance(dec.last_layer, nn.Parameter) and dec.last_layer.requires_grad
    with torch.no_grad():
        bias.zero_()
        y1 = dec(z)
        dec.last_layer.mul_(2)
        y2 = dec(z)
    torch.testing.assert_close(y2, 2 * y1)


def test_last_layer_is_the_final_layer() -> None:
    _, dec = vit_pair(32)
    _last_layer_is_linear_output(dec, torch.randn(1, 16, 4, 4), dec.head.fc2.bias)
    _, dec = vit_pair(32, conv_head=8)
    assert dec.last_layer is dec.conv_head.conv2.weight
    _last_layer_is_linear_output(dec, torch.randn(1, 16, 4, 4), dec.conv_head.conv2.bias)
    for name in ("debug-vqgan", "debug-vqvae"):
        _, dec = cnn_pair(name)
        _last_layer_is_linear_output(dec, torch.randn(1, 16, 32 // CNN[name].downsample, 32 // CNN[name].downsample),
                                     dec.conv_out.bias)


# -- shared: gradients, checkpointing -----------------------------------------------------------------------
PAIRS = {"vit": lambda: vit_pair(32), "vit-conv-head": lambda: vit_pair(32, conv_head=8),
         "vqgan": lambda: cnn_pair("debug-vqgan"), "vqvae": lambda: cnn_pair("debug-vqvae")}


@pytest.mark.parametrize("kind", list(PAIRS))
def test_gradients_reach_every_parameter(kind: str) -> None:
    enc, dec = PAIRS[kind]()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    dec(enc(x)).square().mean().backward()
    for name, prm in [*enc.named_parameters(), *dec.named_parameters()]:
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


class Checkpointed(nn.Module):
    """What a trainer does from outside: run a block under non-reentrant activation checkpointing."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return checkpoint(self.inner, x, use_reentrant=False)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_checkpointing_every_block_changes_nothing(kind: str) -> None:
    enc, dec = PAIRS[kind]()
    assert len(enc.blocks) > 0 and len(dec.blocks) > 0
    x = torch.randn(2, 3, 32, 32)
    params = [*enc.parameters(), *dec.parameters()]

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = dec(enc(x))
        grads = torch.autograd.grad(out.square().mean(), params)  # autograd.grad: breaks with reentrant
        return out.detach(), list(grads)

    ref_out, ref_grads = run()
    for mod in (enc, dec):
        for i in range(len(mod.blocks)):
            mod.blocks[i] = Checkpointed(mod.blocks[i])
    out, grads = run()
    assert all(b.calls == 1 for mod in (enc, dec) for b in mod.blocks)  # the forward really used the wrappers
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


# -- config errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, field", [
    (lambda: ViTConfig(width=100, heads=8), "width"),
    (lambda: ViTConfig(depth=-1), "depth"),
    (lambda: ViTConfig(mlp_dim=0), "mlp_dim"),
    (lambda: ViTEncoder(VIT["debug"], 36, 3, 16), "image_size"),
    (lambda: ViTDecoder(VIT["debug"], 20, 16, 3), "image_size"),
    (lambda: CNNConfig(ch=48), "ch"),
    (lambda: CNNConfig(ch_mult=()), "ch_mult"),
    (lambda: CNNEncoder(CNN["vqgan-f16"], 200, 3, 16), "image_size"),
    (lambda: CNNDecoder(CNN["debug-vqvae"], 30, 16, 3), "image_size"),
])
def test_bad_configs_name_the_field(build, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'") as err:
        build()
    assert err.value.field == field


def test_loader_prefixes_nested_error() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(ViTConfig, {"preset": "small", "depth": 0}, "model.encoder")
    assert err.value.field == "model.encoder.depth"


# -- CNN ------------------------------------------------------------------------------------------------
def test_vqgan_f16_structure_on_meta() -> None:
    c = CNN["vqgan-f16"]
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.z_channels) == (128, (1, 1, 2, 2, 4), 2, (16,), 256)
    with torch.device("meta"):
        enc, dec = CNNEncoder(c, 256, 3, 256), CNNDecoder(c, 256, 256, 3)
        z = enc(torch.empty(2, 3, 256, 256))
        y = dec(z)
    assert z.shape == (2, 256, 16, 16) and y.shape == (2, 3, 256, 256)  # 256 -> 16: f16

    def count(m: nn.Module, cls: type) -> int:
        return sum(isinstance(s, cls) for s in m.modules())
    # taming: encoder 5 levels x 2 ResNet blocks + 2 in the middle; attention after each block at 16px + middle.
    assert count(enc, ResnetBlock) == 5 * 2 + 2 and count(enc, AttnBlock) == 2 + 1
    # decoder: 5 levels x 3 ResNet blocks + 2; attention after the 3 blocks at 16px + middle.
    assert count(dec, ResnetBlock) == 5 * 3 + 2 and count(dec, AttnBlock) == 3 + 1
    assert dec.last_layer.shape == (3, 128, 3, 3)


@pytest.mark.parametrize("name, size, factor", [("vqvae", 32, 4), ("vqvae", 64, 4), ("debug-vqvae", 32, 4),
                                                ("debug-vqgan", 32, 2), ("debug-vqgan", 64, 2)])
def test_cnn_presets_run(name: str, size: int, factor: int) -> None:
    assert CNN[name].downsample == factor
    enc, dec = cnn_pair(name, size)
    z = enc(torch.randn(2, 3, size, size))
    assert z.shape == (2, 16, size // factor, size // factor)
    y = dec(z)
    assert y.shape == (2, 3, size, size) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["debug-vqgan", "debug-vqvae"])
def test_cnn_no_output_activation(name: str) -> None:
    enc, dec = cnn_pair(name)
    with torch.no_grad():
        enc.quant_conv.weight.mul_(1000)
        dec.conv_out.weight.mul_(1000)
        z = enc(torch.randn(2, 3, 32, 32))
        y = dec(torch.randn_like(z))
    for out in (z, y):
        assert out.max() > 2 and out.min() < -2


def test_attn_block_matches_hand_computation() -> None:
    torch.manual_seed(0)
    blk = AttnBlock(32).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    h = F.group_norm(x, 32, blk.norm.weight, blk.norm.bias, eps=1e-6)
    q, k, v = (torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], h) + conv.bias[None, :, None, None]
               for conv in (blk.q, blk.k, blk.v))
    q, k, v = (t.flatten(2) for t in (q, k, v))  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)  # (B, HW_q, HW_k)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 3, 5)
    out = torch.einsum("oc,bchw->bohw", blk.proj_out.weight[:, :, 0, 0], out) + blk.proj_out.bias[None, :, None, None]
    torch.testing.assert_close(blk(x), x + out)


def test_downsample_pads_right_and_bottom_like_taming() -> None:
    # Padding (0, 1, 0, 1): output (i, j) sees input rows/cols 2i..2i+2, so pixel (1, 1) feeds output (0, 0) only;
    # a left/top pad would shift the window and make it feed (0..1, 0..1).
    down = Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    x2 = x.clone()
    x2[0, :, 1, 1] += 1.0
    with torch.no_grad():
        changed = (down(x2) - down(x)).abs().sum(1)[0] > 0  # (4, 4)
    assert changed.nonzero().tolist() == [[0, 0]]
