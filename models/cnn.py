"""Convolutional encoders/decoders for the two CNN baselines: taming's VQGAN and the VQ-VAE.

* ``kind="vqgan"``: the Encoder/Decoder of "Taming Transformers" (Esser et al., 2012.09841): ResNet blocks
  (GroupNorm(32) + swish), strided-conv downsampling with asymmetric padding, nearest-neighbour upsampling +
  conv, self-attention at ``attn_resolutions`` and once in the middle block at the lowest resolution.
* ``kind="vqvae"``: the conv net of "Neural Discrete Representation Learning" (van den Oord et al.,
  1711.00937, section 4.1): two stride-2 4x4 convs, a 3x3 conv and a ReLU residual stack; the decoder mirrors
  it with two stride-2 4x4 transposed convs.

Each kind is one row of ``CNN_KINDS`` (its downsampling factor and the builders of its parts); ``CNNConfig.kind``
accepts exactly the table's keys.

The encoder ends in a 1x1 conv to ``out_dim`` (taming's ``quant_conv``), the decoder starts with a 1x1 conv
from ``in_dim`` (``post_quant_conv``), so both plug into the same quantizer as the ViT pair. ``blocks`` holds
the stages (resolution levels and middle block, or residual layers): each is a plain ``forward(x) -> y``
module the forward loop reads from the list, so the trainer may wrap each with non-reentrant checkpointing.

    enc = CNNEncoder(CNNConfig.PRESETS["vqgan-f16"], image_size=256, in_channels=3, out_dim=256)
    z = enc(x)  # (B, 3, 256, 256) -> (B, 256, 16, 16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vitvq.configs import check
from vitvq.configs.schema import lookup


@dataclass
class CNNConfig:
    kind: str = "vqgan"
    """Architecture: taming's VQGAN ResNet/attention net, or the VQ-VAE conv net."""
    ch: int = 128
    """(vqgan) Base channel count; a multiple of 32 for GroupNorm(32)."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """(vqgan) Channel multiplier per resolution level; len - 1 halvings of the resolution."""
    num_res_blocks: int = 2
    """(vqgan) ResNet blocks per level in the encoder (the decoder has one more, as in taming)."""
    attn_resolutions: tuple[int, ...] = (16,)
    """(vqgan) Feature-map sides (pixels) at which each ResNet block is followed by self-attention."""
    dropout: float = 0.0
    """(vqgan) Dropout inside the ResNet blocks."""
    z_channels: int = 256
    """Latent channels before the 1x1 projection (vqgan); the tokenizer's default latent width for both kinds."""
    hidden: int = 128
    """(vqvae) Hidden channels of the conv stack (the first stride-2 conv has half)."""
    res_hidden: int = 32
    """(vqvae) Hidden channels inside each residual layer."""
    num_res_layers: int = 2
    """(vqvae) Residual layers (ReLU, 3x3 conv, ReLU, 1x1 conv) in encoder and decoder."""

    PRESETS: ClassVar[dict[str, "CNNConfig"]] = {}  # filled in below CNN_KINDS, which __post_init__ reads

    def __post_init__(self) -> None:
        lookup(CNN_KINDS, self.kind, "kind", "CNN kind")  # the allowed kinds are the table's keys
        check(self.ch > 0 and self.ch % 32 == 0, "ch", self.ch, "must be a positive multiple of 32 (GroupNorm(32))")
        check(len(self.ch_mult) > 0 and all(m > 0 for m in self.ch_mult), "ch_mult", self.ch_mult,
              "must be a non-empty list of positive multipliers")
        check(self.num_res_blocks > 0, "num_res_blocks", self.num_res_blocks, "must be positive")
        check(all(r > 0 for r in self.attn_resolutions), "attn_resolutions", self.attn_resolutions,
              "must hold positive feature-map sides")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.z_channels > 0, "z_channels", self.z_channels, "must be positive")
        check(self.hidden > 0 and self.hidden % 2 == 0, "hidden", self.hidden, "must be a positive even number")
        check(self.res_hidden > 0, "res_hidden", self.res_hidden, "must be positive")
        check(self.num_res_layers >= 0, "num_res_layers", self.num_res_layers, "must be >= 0")

    @property
    def downsample(self) -> int:
        """Total downsampling factor: image side / latent side."""
        return _kind(self).downsample(self)


# -- taming's building blocks -----------------------------------------------------------------------------
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)  # taming's Normalize; torch computes it in fp32 under bf16


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual, as taming's, through SDPA."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as taming
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[-2]))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: exact halving with a 3x3 stride-2 conv


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks (each followed by attention if ``attn``), then resampling."""

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, resample: nn.Module, dropout: float):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n_blocks)) if attn else nn.ModuleList()
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        return self.resample(x)


class Mid(nn.Module):
    """Middle block at the lowest resolution: ResNet, attention, ResNet."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


# -- VQ-VAE building block ------------------------------------------------------------------------------------
class ResidualLayer(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))) (VQ-VAE section 4.1)."""

    def __init__(self, hidden: int, res_hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, res_hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(res_hidden, hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _check_size(cfg: CNNConfig, image_size: int) -> None:
    check(image_size > 0 and image_size % cfg.downsample == 0, "image_size", image_size,
          f"must be a positive multiple of the {cfg.kind} downsampling factor {cfg.downsample}")


class CNNEncoder(nn.Module):
    """Image (B, C, H, W) -> latent grid (B, out_dim, H/f, W/f), f = ``cfg.downsample``."""

    def __init__(self, cfg: CNNConfig, image_size: int, in_channels: int, out_dim: int):
        super().__init__()
        _check_size(cfg, image_size)
        self.cfg = cfg
        stem, blocks, tail, latent = _kind(cfg).encoder(cfg, image_size, in_channels)
        self.stem: nn.Module = stem
        self.blocks = nn.ModuleList(blocks)
        self.tail: nn.Module = tail
        self.quant_conv = nn.Conv2d(latent, out_dim, 1)  # taming's quant_conv / VQ-VAE's pre-VQ conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:  # read from the list each call: the trainer may have wrapped them
            h = block(h)
        return self.quant_conv(self.tail(h))  # (B, out_dim, h, w); no output activation


class CNNDecoder(nn.Module):
    """Latent grid (B, in_dim, h, w) -> raw output (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: CNNConfig, image_size: int, in_dim: int, out_channels: int):
        super().__init__()
        _check_size(cfg, image_size)
        self.cfg = cfg
        post_quant_conv, stem, blocks, tail, conv_out = _kind(cfg).decoder(cfg, image_size, in_dim, out_channels)
        self.post_quant_conv = post_quant_conv
        self.stem: nn.Module = stem
        self.blocks = nn.ModuleList(blocks)
        self.tail: nn.Module = tail
        self.conv_out: nn.Module = conv_out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.post_quant_conv(z))
        for block in self.blocks:
            h = block(h)
        return self.conv_out(self.tail(h))  # (B, out_channels, H, W); no output activation

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of ``conv_out``, for taming's adaptive GAN weight."""
        return self.conv_out.weight


# -- the kinds: each builds the parts CNNEncoder / CNNDecoder assemble ------------------------------------------
EncoderParts = tuple[nn.Module, list[nn.Module], nn.Module, int]  # stem, blocks, tail, latent channels
DecoderParts = tuple[nn.Module, nn.Module, list[nn.Module], nn.Module, nn.Module]  # post_quant, stem, blocks, tail, out


def _vqgan_encoder(cfg: CNNConfig, image_size: int, in_channels: int) -> EncoderParts:
    """taming's Encoder: conv, levels (ResNet blocks, attention, stride-2 conv), middle block, norm-swish-conv."""
    stem = nn.Conv2d(in_channels, cfg.ch, 3, padding=1)
    levels, cin, res = [], cfg.ch, image_size
    for i, mult in enumerate(cfg.ch_mult):
        last = i == len(cfg.ch_mult) - 1
        cout = cfg.ch * mult
        levels.append(Level(cin, cout, cfg.num_res_blocks, res in cfg.attn_resolutions,
                            nn.Identity() if last else Downsample(cout), cfg.dropout))
        cin, res = cout, res if last else res // 2
    blocks: list[nn.Module] = [*levels, Mid(cin, cfg.dropout)]  # before the tail: keeps the order of init draws
    tail = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cfg.z_channels, 3, padding=1))
    return stem, blocks, tail, cfg.z_channels


def _vqgan_decoder(cfg: CNNConfig, image_size: int, in_dim: int, out_channels: int) -> DecoderParts:
    """taming's Decoder: conv, middle block, levels (one ResNet block more than the encoder's), norm-swish, conv."""
    post_quant_conv = nn.Conv2d(in_dim, cfg.z_channels, 1)
    cin = cfg.ch * cfg.ch_mult[-1]
    res = image_size // cfg.downsample
    stem = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
    stages: list[nn.Module] = [Mid(cin, cfg.dropout)]
    for i in reversed(range(len(cfg.ch_mult))):
        cout = cfg.ch * cfg.ch_mult[i]
        # taming's decoder levels have num_res_blocks + 1 ResNet blocks
        stages.append(Level(cin, cout, cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                            Upsample(cout) if i else nn.Identity(), cfg.dropout))
        cin, res = cout, res * 2 if i else res
    tail = nn.Sequential(_norm(cin), nn.SiLU())
    return post_quant_conv, stem, stages, tail, nn.Conv2d(cin, out_channels, 3, padding=1)


def _vqvae_encoder(cfg: CNNConfig, image_size: int, in_channels: int) -> EncoderParts:
    """VQ-VAE section 4.1: two stride-2 4x4 convs and a 3x3 conv, then the residual stack."""
    hid = cfg.hidden
    stem = nn.Sequential(nn.Conv2d(in_channels, hid // 2, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(hid // 2, hid, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(hid, hid, 3, padding=1))
    blocks: list[nn.Module] = [ResidualLayer(hid, cfg.res_hidden) for _ in range(cfg.num_res_layers)]
    return stem, blocks, nn.ReLU(), hid  # the residual stack ends in a ReLU


def _vqvae_decoder(cfg: CNNConfig, image_size: int, in_dim: int, out_channels: int) -> DecoderParts:
    """The encoder mirrored: 3x3 conv, the residual stack, two stride-2 4x4 transposed convs."""
    hid = cfg.hidden
    post_quant_conv = nn.Conv2d(in_dim, hid, 1)
    stem = nn.Conv2d(hid, hid, 3, padding=1)
    blocks: list[nn.Module] = [ResidualLayer(hid, cfg.res_hidden) for _ in range(cfg.num_res_layers)]
    tail = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(hid, hid // 2, 4, stride=2, padding=1), nn.ReLU())
    return post_quant_conv, stem, blocks, tail, nn.ConvTranspose2d(hid // 2, out_channels, 4, stride=2, padding=1)


class CNNKind(NamedTuple):
    """One row of CNN_KINDS: the downsampling factor and the part builders of a kind."""
    downsample: Callable[[CNNConfig], int]
    encoder: Callable[[CNNConfig, int, int], EncoderParts]
    decoder: Callable[[CNNConfig, int, int, int], DecoderParts]


# The one table of CNN kinds: CNNConfig accepts exactly its keys, and the tokenizer's arch table takes them as arches.
CNN_KINDS: dict[str, CNNKind] = {
    "vqgan": CNNKind(lambda cfg: 2 ** (len(cfg.ch_mult) - 1), _vqgan_encoder, _vqgan_decoder),
    "vqvae": CNNKind(lambda cfg: 4, _vqvae_encoder, _vqvae_decoder),
}


def _kind(cfg: CNNConfig) -> CNNKind:
    """The table row of ``cfg.kind``; an unknown kind raises, naming the known ones."""
    return lookup(CNN_KINDS, cfg.kind, "model.cnn.kind", "CNN kind")


CNNConfig.PRESETS = {
    # taming-transformers ImageNet f16 VQGAN (configs/imagenet_vqgan.yaml): 256px -> 16x16.
    "vqgan-f16": CNNConfig(kind="vqgan", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                           attn_resolutions=(16,), z_channels=256),
    # VQ-VAE paper / Sonnet example: 128 hidden, 2 residual layers of 32 hidden, downsampling by 4.
    "vqvae": CNNConfig(kind="vqvae", hidden=128, res_hidden=32, num_res_layers=2, z_channels=64),
    "debug-vqgan": CNNConfig(kind="vqgan", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                             z_channels=32),
    "debug-vqvae": CNNConfig(kind="vqvae", hidden=32, res_hidden=8, num_res_layers=1, z_channels=16),
}


__all__ = ["CNNConfig", "CNNEncoder", "CNNDecoder", "CNN_KINDS", "CNNKind", "ResnetBlock", "AttnBlock"]
