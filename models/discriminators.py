"""Stage-1 discriminators: the StyleGAN2 residual discriminator (ViT-VQGAN's) and taming's PatchGAN.

* ``kind="stylegan2"``: the residual discriminator of StyleGAN2 (Karras et al., 1912.04958, appendix B;
  layout of StyleGAN2-ADA's ``DiscriminatorBlock``/``DiscriminatorEpilogue``) in plain PyTorch, no custom
  CUDA ops (enhancing-transformers' upfirdn2d/fused-act ops fail under mixed precision). Equalized learning
  rate, blurred stride-2 downsampling, minibatch standard deviation, two linear layers -> ``(B, 1)`` logits.
  ViT-VQGAN (2110.04627, section 3.2) trains with it; a PatchGAN gives rFID 3.88 against 1.55 there.
* ``kind="patchgan"``: taming's ``NLayerDiscriminator`` (pix2pix PatchGAN, 4x4 convs) with taming's
  ``weights_init`` -> ``(B, 1, h, w)`` logits, one per overlapping patch.

Both take images ``(B, C, H, W)`` in [-1, 1] and return raw logits; the GAN losses live in ``models.losses``.

    disc = build_discriminator(DiscConfig(kind="stylegan2"), image_size=256)
    logits = disc(x)  # (B, 3, 256, 256) -> (B, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from vitvq.configs import check
from vitvq.configs.schema import lookup

SQRT2 = math.sqrt(2.0)


@dataclass
class DiscConfig:
    kind: str = "stylegan2"
    """Architecture: StyleGAN2 residual discriminator (ViT-VQGAN) or taming's PatchGAN (VQGAN)."""
    channel_base: int = 32768
    """(stylegan2) Channels at resolution r are min(channel_base // r, channel_max) (StyleGAN2-ADA's cbase)."""
    channel_max: int = 512
    """(stylegan2) Upper bound on channels per resolution."""
    mbstd_group_size: int = 4
    """(stylegan2) Samples per minibatch-stddev group; the largest divisor of the batch not above it is used."""
    mbstd_num_channels: int = 1
    """(stylegan2) Feature maps appended by the minibatch-stddev layer (channels are split into this many groups)."""
    lr_multiplier: float = 1.0
    """(stylegan2) Equalized-lr multiplier: weights stored N(0, 1/lr_mul^2), scaled by lr_mul/sqrt(fan_in)."""
    patchgan_layers: int = 3
    """(patchgan) Stride-2 conv layers (taming: 3)."""
    patchgan_ndf: int = 64
    """(patchgan) Channels of the first conv layer (taming: 64)."""
    patchgan_norm: Literal["batch", "group", "none"] = "batch"
    """(patchgan) Norm after the inner convs. "batch" is taming's; under data parallelism its statistics are
    per rank and per call (reals and fakes normalized separately), never synchronized; "group" avoids that."""

    PRESETS: ClassVar[dict[str, "DiscConfig"]] = {}  # filled in below DISCRIMINATORS, which __post_init__ reads

    def __post_init__(self) -> None:
        lookup(DISCRIMINATORS, self.kind, "kind", "discriminator kind")  # the allowed kinds are the table's keys
        for name in ("channel_base", "channel_max", "mbstd_group_size", "mbstd_num_channels", "patchgan_layers",
                     "patchgan_ndf"):
            value = getattr(self, name)
            check(value > 0, name, value, "must be a positive integer")
        check(self.lr_multiplier > 0, "lr_multiplier", self.lr_multiplier, "must be positive")


# -- StyleGAN2 building blocks ----------------------------------------------------------------------
class EqualConv2d(nn.Module):
    """Conv with equalized learning rate (Karras et al. 1710.10196, section 4.1).

    Weights are stored N(0, 1/lr_mul^2) and multiplied at every call by ``lr_mul / sqrt(fan_in)``, so Adam's
    per-parameter step size acts equally on every layer whatever its fan-in.
    """

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, bias: bool = True,
                 lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(cin * kernel * kernel)
        self.lr_mul, self.stride, self.padding = lr_mul, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return F.conv2d(x, self.weight * self.weight_gain, bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate; optional leaky ReLU(0.2) with gain sqrt(2)."""

    def __init__(self, cin: int, cout: int, *, activate: bool = False, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(cout))
        self.weight_gain, self.lr_mul, self.activate = lr_mul / math.sqrt(cin), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return F.leaky_relu(x, 0.2) * SQRT2 if self.activate else x


class Blur(nn.Module):
    """Fixed [1, 3, 3, 1] binomial low-pass filter as a depthwise conv (StyleGAN2's upfirdn2d before stride 2).

    Filtering before subsampling removes the aliasing a bare stride-2 conv lets through (Zhang 2019,
    "Making convolutional networks shift-invariant again"; StyleGAN2 appendix B). The 4x4 kernel is
    normalized to sum to 1 and is a buffer, so ``module.to(dtype)`` converts it with the weights.
    """

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("kernel", kernel / kernel.sum())  # (4, 4)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (self.pad[0], self.pad[1], self.pad[0], self.pad[1]))
        weight = repeat(self.kernel.to(x.dtype), "kh kw -> c 1 kh kw", c=c)  # symmetric: no flip needed
        return F.conv2d(x, weight, groups=c)


class ConvLayer(nn.Sequential):
    """[Blur] -> equalized conv (stride 2 if ``down``) -> [leaky ReLU(0.2) * sqrt(2)]."""

    def __init__(self, cin: int, cout: int, kernel: int, *, down: bool = False, activate: bool = True,
                 bias: bool = True, lr_mul: float = 1.0):
        layers: list[nn.Module] = []
        if down:
            # Pad so that blur (4 taps) + k x k conv at stride 2 maps H to H/2 (rosinality's/ADA's padding).
            p = (4 - 2) + (kernel - 1)
            layers.append(Blur(((p + 1) // 2, p // 2)))
            layers.append(EqualConv2d(cin, cout, kernel, stride=2, padding=0, bias=bias, lr_mul=lr_mul))
        else:
            layers.append(EqualConv2d(cin, cout, kernel, padding=kernel // 2, bias=bias, lr_mul=lr_mul))
        if activate:
            layers.append(ScaledLeakyReLU())
        super().__init__(*layers)


class ScaledLeakyReLU(nn.Module):
    """Leaky ReLU(0.2) times sqrt(2), the gain that keeps activations at unit variance (StyleGAN's lrelu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.2) * SQRT2


class DiscBlock(nn.Module):
    """Residual block: two 3x3 convs (the second downsamples) plus a 1x1 downsampling skip, summed / sqrt(2)."""

    def __init__(self, cin: int, cout: int, lr_mul: float = 1.0):
        super().__init__()
        self.conv1 = ConvLayer(cin, cin, 3, lr_mul=lr_mul)
        self.conv2 = ConvLayer(cin, cout, 3, down=True, lr_mul=lr_mul)
        self.skip = ConvLayer(cin, cout, 1, down=True, activate=False, bias=False, lr_mul=lr_mul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv2(self.conv1(x))) / SQRT2  # (B, cout, H/2, W/2)


class MinibatchStd(nn.Module):
    """Appends the across-group standard deviation of the features (Karras et al. 1710.10196, section 3).

    The batch is split into groups of G samples the way StyleGAN2-ADA does it (sample i is in group
    i mod N/G); for each group and each of F channel groups, the std over the G samples is averaged over
    channels and pixels and broadcast as one extra feature map. Computed in at least fp32 (a statistic).
    """

    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # Largest group size <= group_size dividing the batch (ADA asserts divisibility; odd eval batches exist).
        g = max(d for d in range(1, min(self.group_size, n) + 1) if n % d == 0)
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = rearrange(y, "(g m) (f c) h w -> g m f c h w", g=g, f=self.num_channels)
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # (m, F, c, H, W) variance over the group
        y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4))  # (m, F)
        y = repeat(y, "m f -> (g m) f h w", g=g, h=h, w=w).to(x.dtype)  # (N, F, H, W)
        return torch.cat([x, y], dim=1)


class StyleGAN2Discriminator(nn.Module):
    """fromRGB -> residual blocks from ``image_size`` down to 4x4 -> minibatch std -> conv -> 2 linears."""

    def __init__(self, cfg: DiscConfig, image_size: int, in_channels: int = 3):
        super().__init__()
        check(image_size >= 8 and image_size & (image_size - 1) == 0, "image_size", image_size,
              "the stylegan2 discriminator needs a power of two >= 8")
        check(cfg.channel_base // image_size >= 1, "channel_base", cfg.channel_base,
              f"must be >= image_size={image_size} (channels at full resolution = channel_base // image_size)")

        def ch(res: int) -> int:
            return min(cfg.channel_base // res, cfg.channel_max)

        lr = cfg.lr_multiplier
        check(ch(4) % cfg.mbstd_num_channels == 0, "mbstd_num_channels", cfg.mbstd_num_channels,
              f"must divide the channels at 4x4 ({ch(4)})")
        self.from_rgb = ConvLayer(in_channels, ch(image_size), 1, lr_mul=lr)
        resolutions = [image_size >> i for i in range(int(math.log2(image_size)) - 2)]  # image_size ... 8
        self.blocks = nn.ModuleList(DiscBlock(ch(r), ch(r // 2), lr_mul=lr) for r in resolutions)
        self.mbstd = MinibatchStd(cfg.mbstd_group_size, cfg.mbstd_num_channels)
        self.final_conv = ConvLayer(ch(4) + cfg.mbstd_num_channels, ch(4), 3, lr_mul=lr)
        self.final_linear = EqualLinear(ch(4) * 4 * 4, ch(4), activate=True, lr_mul=lr)
        self.out = EqualLinear(ch(4), 1, lr_mul=lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.from_rgb(x)  # (B, C, H, W)
        for block in self.blocks:
            h = block(h)
        h = self.final_conv(self.mbstd(h))  # (B, C4, 4, 4)
        return self.out(self.final_linear(h.flatten(1)))  # (B, 1)


# -- taming's PatchGAN --------------------------------------------------------------------------------
def taming_weights_init(m: nn.Module) -> None:
    """taming's ``weights_init``: convs N(0, 0.02) (biases left at PyTorch's default), BatchNorm N(1, 0.02)/0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class PatchGANDiscriminator(nn.Module):
    """taming's NLayerDiscriminator: 4x4 convs, ``n_layers`` of them stride 2, then two stride-1 ones."""

    def __init__(self, cfg: DiscConfig, image_size: int, in_channels: int = 3):
        super().__init__()
        n, ndf = cfg.patchgan_layers, cfg.patchgan_ndf
        out_side = image_size
        for _ in range(n):
            out_side //= 2
        check(out_side - 2 >= 1, "patchgan_layers", n, f"too many stride-2 layers for image_size={image_size}")
        bias = cfg.patchgan_norm != "batch"  # taming drops the conv bias in front of BatchNorm only
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n + 1):
            prev, mult = mult, min(2 ** i, 8)
            stride = 2 if i < n else 1  # the last of these keeps the resolution (taming's layout)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), _norm(cfg.patchgan_norm, ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(taming_weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w)


# The one table of discriminator kinds: DiscConfig accepts exactly its keys and build_discriminator reads it.
DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "stylegan2": StyleGAN2Discriminator,
    "patchgan": PatchGANDiscriminator,
}

DiscConfig.PRESETS = {
    "stylegan2": DiscConfig(kind="stylegan2"),
    "patchgan": DiscConfig(kind="patchgan", patchgan_layers=3, patchgan_ndf=64, patchgan_norm="batch"),
    "debug": DiscConfig(kind="stylegan2", channel_base=256, channel_max=32),
    "debug-patchgan": DiscConfig(kind="patchgan", patchgan_layers=3, patchgan_ndf=8, patchgan_norm="group"),
}


def build_discriminator(cfg: DiscConfig, image_size: int, in_channels: int = 3) -> nn.Module:
    """The discriminator named by ``cfg.kind``; ``forward(x (B, C, H, W) in [-1, 1])`` returns logits. An unknown
    kind raises, naming the known ones."""
    return lookup(DISCRIMINATORS, cfg.kind, "disc.kind", "discriminator kind")(cfg, image_size, in_channels)


__all__ = ["DiscConfig", "DISCRIMINATORS", "build_discriminator", "StyleGAN2Discriminator", "PatchGANDiscriminator",
           "EqualConv2d", "EqualLinear", "Blur", "MinibatchStd", "taming_weights_init"]
