"""ViT-VQGAN encoder and decoder (Yu et al., "Vector-quantized Image Modeling with Improved VQGAN", 2110.04627).

The encoder cuts the image into non-overlapping ``patch_size`` patches, embeds them linearly, adds fixed 2-D
sin-cos position embeddings and runs pre-norm transformer blocks; a two-layer feed-forward head with a tanh in
the middle maps the tokens to the latent grid (section 3.1; no activation at the output). The decoder mirrors
it and maps each token back to one patch of pixels; ``conv_head=C`` (ours, off in the paper recipes) maps it to a
patch of C-channel features instead and lets two 3x3 convolutions across patch borders make the pixels.

Transformer blocks live in ``.blocks`` (an ``nn.ModuleList`` of plain ``forward(x) -> x`` modules) and the
forward loop reads them from there, so the trainer can replace or wrap each one from outside, e.g. with
``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` (torchtitan's ``apply_ac`` pattern).

Built on the meta device (``with torch.device("meta"):``), call ``init_weights()`` after ``to_empty()``: it
recomputes the non-persistent position table, which no state dict carries.

    enc = ViTEncoder(ViTConfig.PRESETS["small"], image_size=256, in_channels=3, out_dim=512)
    z = enc(x)  # (B, 3, 256, 256) -> (B, 512, 32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vitvq.configs import check


@dataclass
class ViTConfig:
    width: int = 512
    """Transformer width (token dimension)."""
    depth: int = 8
    """Number of transformer blocks."""
    heads: int = 8
    """Attention heads; must divide width."""
    mlp_dim: int = 2048
    """Hidden size of the block MLPs and of the tanh output head."""
    patch_size: int = 8
    """Side of the square patches: one token per patch (8 in the paper: 256px -> 32x32 tokens)."""
    dropout: float = 0.0
    """Dropout on attention weights and on the residual branches (0 in the paper)."""
    conv_head: int = 0
    """Decoder only: 0 maps each token straight to its patch of pixels (the paper); C > 0 maps it to a patch of
    C-channel features and two 3x3 convolutions over the whole image turn them into pixels, so every output
    pixel near a patch border also sees the neighbouring tokens (see ``ConvHead``)."""

    PRESETS: ClassVar[dict[str, "ViTConfig"]] = {}

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "mlp_dim", "patch_size"):
            value = getattr(self, name)
            check(value > 0, name, value, "must be a positive integer")
        check(self.width % self.heads == 0, "width", self.width, f"must be divisible by heads={self.heads}")
        # Half of the dims encode the row, half the column, each as sin/cos pairs: width must split in 4.
        check(self.width % 4 == 0, "width", self.width, "must be divisible by 4 (2-D sin-cos position embedding)")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.conv_head >= 0, "conv_head", self.conv_head, "must be 0 (per-patch output) or a channel count")


# The paper's table 1 sizes (encoder or decoder); "debug" is for CPU tests.
ViTConfig.PRESETS = {
    "debug": ViTConfig(width=64, depth=2, heads=4, mlp_dim=128, patch_size=8),
    "small": ViTConfig(width=512, depth=8, heads=8, mlp_dim=2048),
    "base": ViTConfig(width=768, depth=12, heads=12, mlp_dim=3072),
    "large": ViTConfig(width=1280, depth=32, heads=16, mlp_dim=5120),
}


def sincos_pos_embed_2d(width: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos table (MAE / ViT-VQGAN), raster order: token ``n = row * grid_w + col``.

    Dims ``[0, width/2)`` encode the row, ``[width/2, width)`` the column; each half is
    ``[sin(pos * w_k)..., cos(pos * w_k)...]`` with ``w_k = 10000^(-k / (width/4))``, k < width/4.
    (MAE's code puts the column first because of its meshgrid order; the two differ by a fixed permutation.)
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (D/4,)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None, :]  # (M, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, D/2)

    rows = torch.arange(grid_h, dtype=torch.float64, device=device).repeat_interleave(grid_w)  # (N,)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device).repeat(grid_h)  # (N,)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg.width, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class TanhHead(nn.Module):
    """ViT-VQGAN's output head (section 3.1): Linear -> tanh -> Linear, no activation at the output."""

    def __init__(self, width: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvHead(nn.Module):
    """(B, C, H, W) per-patch features -> (B, out_channels, H, W) pixels: SiLU -> 3x3 conv (residual) -> SiLU ->
    3x3 conv. Not in the paper. The paper's per-patch linear output gives each patch only its own token, so patch
    borders stay visible until the transformer has learnt to carry the neighbours' content into every token;
    on short runs that means flat blocks (the 600-step 8 px demo: pixel steps across patch borders 5.2x those
    inside them, against 1.04 in the photographs; benchmarks/patch_artifacts.py). Here each pixel sees a 5x5
    neighbourhood across the borders, for 9 C (C + out) multiply-adds per pixel (C=16, 6 outputs: 3.2k, about a
    tenth of the demo decoder's per-pixel cost)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv1(F.silu(x))
        return self.conv2(F.silu(x))


def _init_module(m: nn.Module) -> None:
    # MAE / ViT-VQGAN: xavier-uniform linears (patch embedding included), zero biases, unit LayerNorms.
    if isinstance(m, nn.Conv2d):  # ConvHead: PyTorch's default init (built on meta, nothing else sets it)
        m.reset_parameters()
    elif isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class _ViT(nn.Module):
    """What encoder and decoder share: position table, blocks, final norm, weight init."""

    def __init__(self, cfg: ViTConfig, image_size: int):
        super().__init__()
        check(image_size > 0 and image_size % cfg.patch_size == 0, "image_size", image_size,
              f"must be a positive multiple of patch_size={cfg.patch_size}")
        self.cfg = cfg
        self.grid_size = image_size // cfg.patch_size
        # Fixed, not learned (section 3.1); non-persistent so checkpoints never carry or fight over it.
        self.register_buffer("pos_embed", torch.empty(1, self.grid_size**2, cfg.width), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the position table; call after ``to_empty()`` from meta."""
        self.apply(_init_module)
        table = sincos_pos_embed_2d(self.cfg.width, self.grid_size, self.grid_size, device=self.pos_embed.device)
        self.pos_embed.copy_(table[None])  # (1, N, D)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:  # read from the ModuleList each call: the trainer may have wrapped them
            x = block(x)
        return self.norm(x)


class ViTEncoder(_ViT):
    """Image (B, C, H, W) -> latent grid (B, out_dim, H/p, W/p)."""

    def __init__(self, cfg: ViTConfig, image_size: int, in_channels: int, out_dim: int):
        super().__init__(cfg, image_size)
        p = cfg.patch_size
        self.patch_embed = nn.Linear(p * p * in_channels, cfg.width)  # equivalent to a stride-p conv
        self.head = TanhHead(cfg.width, cfg.mlp_dim, out_dim)
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        if x.shape[-2:] != (self.grid_size * p,) * 2:
            raise ValueError(f"encoder built for {self.grid_size * p}px images, got {tuple(x.shape[-2:])}")
        tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)  # (B, N, p*p*C)
        tokens = self.run_blocks(self.patch_embed(tokens))  # (B, N, D)
        return rearrange(self.head(tokens), "b (h w) d -> b d h w", h=x.shape[-2] // p)  # (B, out_dim, h, w)


class ViTDecoder(_ViT):
    """Latent grid (B, in_dim, h, w) -> raw output (B, out_channels, h*p, w*p); one token per patch."""

    def __init__(self, cfg: ViTConfig, image_size: int, in_dim: int, out_channels: int):
        super().__init__(cfg, image_size)
        p = cfg.patch_size
        self.token_embed = nn.Linear(in_dim, cfg.width)
        self.head = TanhHead(cfg.width, cfg.mlp_dim, p * p * (cfg.conv_head or out_channels))
        self.conv_head = ConvHead(cfg.conv_head, out_channels) if cfg.conv_head else None
        self.init_weights()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        if (h, w) != (self.grid_size, self.grid_size):
            raise ValueError(f"decoder built for a {self.grid_size}x{self.grid_size} grid, got {h}x{w}")
        tokens = self.run_blocks(self.token_embed(rearrange(z, "b d h w -> b (h w) d")))  # (B, N, D)
        p = self.cfg.patch_size
        out = rearrange(self.head(tokens), "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p)
        return out if self.conv_head is None else self.conv_head(out)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the final layer, for taming's adaptive GAN weight."""
        return self.head.fc2.weight if self.conv_head is None else self.conv_head.conv2.weight


__all__ = ["ViTConfig", "ViTEncoder", "ViTDecoder", "Block", "ConvHead", "sincos_pos_embed_2d"]
