"""The stage-1 image tokenizer: encoder -> quantizer -> decoder, for ViT-VQGAN, taming's VQGAN and VQ-VAE.

``Tokenizer`` is the generator half of the stage-1 GAN (the discriminator and the losses live in
``models.discriminators`` / ``models.losses`` and are wrapped separately by the trainer). It is also what
stage 2 and evaluation load: ``save_export`` writes fp32 weights and the config into one file that
``Tokenizer.load_export`` reads back with no DeepSpeed involved.

    tok = Tokenizer(TokenizerConfig.PRESETS["vit-ss"])
    dec_out, q = tok(x)             # x: (B, 3, 256, 256) in [-1, 1]
    codes = q.indices               # (B, 32, 32)
    x_rec = tok.to_image(tok.decode_codes(codes))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
import torch.nn as nn

from vitvq.configs import check, from_dict
from vitvq.configs.schema import lookup
from vitvq.models.cnn import CNN_KINDS, CNNConfig, CNNDecoder, CNNEncoder
from vitvq.models.export import read_export, write_export
from vitvq.models.logit_laplace import decoder_output_to_image
from vitvq.models.quantizers import QuantizerConfig, QuantizerOutput, build_quantizer
from vitvq.models.tokens import TokenFacts
from vitvq.models.vit import ViTConfig, ViTDecoder, ViTEncoder

EXPORT_FORMAT = "vitvq-tokenizer/1"


@dataclass
class TokenizerConfig:
    arch: str = "vit"
    """Backbone family: ViT-VQGAN transformers, taming's VQGAN CNN, or the VQ-VAE conv net."""
    image_size: int = 256
    """Input resolution (square); must be divisible by the patch size / total downsampling."""
    in_channels: int = 3
    """Image channels."""
    encoder: ViTConfig = field(default_factory=lambda: dataclasses.replace(ViTConfig.PRESETS["small"]))
    """ViT encoder size (arch=vit): a preset name (debug/small/base/large) or explicit fields."""
    decoder: ViTConfig = field(default_factory=lambda: dataclasses.replace(ViTConfig.PRESETS["small"]))
    """ViT decoder size (arch=vit); the paper's variants name encoder then decoder: SS, BB, SL."""
    cnn: CNNConfig = field(default_factory=lambda: dataclasses.replace(CNNConfig.PRESETS["vqgan-f16"]))
    """CNN encoder/decoder (arch=vqgan or vqvae)."""
    latent_dim: Optional[int] = None
    """Channels between encoder, quantizer and decoder; None = the encoder width (ViT) or cnn.z_channels."""
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    """Codebook and quantization scheme."""
    output: Literal["pixels", "logit_laplace"] = "logit_laplace"
    """Decoder head: 3 pixel channels, or 6 (location and log-scale of the logit-Laplace, DALL-E / ViT-VQGAN)."""

    PRESETS: ClassVar[dict[str, "TokenizerConfig"]] = {}

    def __post_init__(self) -> None:
        lookup(BACKBONES, self.arch, "arch", "backbone arch")  # the allowed arches are the table's keys
        check(self.image_size > 0, "image_size", self.image_size, "must be a positive number of pixels")
        check(self.in_channels > 0, "in_channels", self.in_channels, "must be positive")
        check(self.latent_dim is None or self.latent_dim > 0, "latent_dim", self.latent_dim,
              "must be positive, or null for the encoder width")
        if self.arch == "vit":
            for name, vit in (("encoder", self.encoder), ("decoder", self.decoder)):
                check(self.image_size % vit.patch_size == 0, "image_size", self.image_size,
                      f"must be divisible by {name}.patch_size={vit.patch_size}")
            check(self.encoder.patch_size == self.decoder.patch_size, "decoder.patch_size",
                  self.decoder.patch_size, f"must equal encoder.patch_size={self.encoder.patch_size}")
            check(self.encoder.conv_head == 0, "encoder.conv_head", self.encoder.conv_head,
                  "must be 0: the convolutional output head is the decoder's (decoder.conv_head)")
        else:
            check(self.cnn.kind == self.arch, "cnn.kind", self.cnn.kind,
                  f"must match arch={self.arch!r} (choose a {self.arch} preset for cnn)")

    @property
    def dim(self) -> int:
        """Channel width of the latent grid the quantizer sees."""
        if self.latent_dim is not None:
            return self.latent_dim
        return self.encoder.width if self.arch == "vit" else self.cnn.z_channels

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.output == "logit_laplace" else 1)

    # -- what a token is (models/tokens.py): every layer above asks these instead of reading the quantizer ------
    @property
    def vocab_size(self) -> int:
        """Values one code takes: the codebook size (per level for a residual quantizer)."""
        return self.quantizer.codebook_size

    @property
    def codes_per_position(self) -> int:
        """Codes at each grid position: 1, or the residual levels (indices then end in a depth axis)."""
        return self.quantizer.residual_depth if self.quantizer.kind == "residual" else 1

    @property
    def downsample(self) -> int:
        """Pixels per code along a side: the ViT patch size, or the CNN's total downsampling factor."""
        return self.encoder.patch_size if self.arch == "vit" else self.cnn.downsample

    def token_grid(self, image_size: Optional[int] = None) -> int:
        """Side of the code grid for images of ``image_size`` px (default: the configured ``image_size``)."""
        size = self.image_size if image_size is None else image_size
        check(size > 0 and size % self.downsample == 0, "image_size", size,
              f"must be a positive multiple of {self.downsample}: the {self.arch} tokenizer makes one code per "
              f"{self.downsample}x{self.downsample} px")
        return size // self.downsample

    def token_facts(self, image_size: Optional[int] = None) -> TokenFacts:
        """Vocabulary, codes per position and grid at ``image_size`` (default: the configured one)."""
        size = self.image_size if image_size is None else image_size
        return TokenFacts(self.vocab_size, self.codes_per_position, self.token_grid(size), size)


def _vit_backbone(cfg: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
    """ViT-VQGAN's transformer encoder and decoder."""
    return (ViTEncoder(cfg.encoder, cfg.image_size, cfg.in_channels, cfg.dim),
            ViTDecoder(cfg.decoder, cfg.image_size, cfg.dim, cfg.out_channels))


def _cnn_backbone(cfg: TokenizerConfig) -> tuple[nn.Module, nn.Module]:
    """The conv encoder and decoder of ``cfg.cnn``, whose kind ``__post_init__`` has tied to the arch."""
    return (CNNEncoder(cfg.cnn, cfg.image_size, cfg.in_channels, cfg.dim),
            CNNDecoder(cfg.cnn, cfg.image_size, cfg.dim, cfg.out_channels))


# The one table of backbone arches: TokenizerConfig accepts exactly its keys and Tokenizer builds from it. Each CNN
# kind is the arch of its own name (cnn.kind must equal arch), so a new row of CNN_KINDS needs no line here.
BACKBONES: dict[str, Callable[[TokenizerConfig], tuple[nn.Module, nn.Module]]] = {
    "vit": _vit_backbone,
    **dict.fromkeys(CNN_KINDS, _cnn_backbone),
}


def _presets() -> dict[str, TokenizerConfig]:
    vit = ViTConfig.PRESETS
    paper_vq = dict(kind="vq", codebook_size=8192, code_dim=32, l2_norm=True, beta=0.25)
    variants = {"vit-ss": ("small", "small"), "vit-bb": ("base", "base"), "vit-sl": ("small", "large")}
    presets = {name: TokenizerConfig(arch="vit", image_size=256, encoder=vit[e], decoder=vit[d],
                                     quantizer=QuantizerConfig(**paper_vq), output="logit_laplace")
               for name, (e, d) in variants.items()}
    presets["debug"] = TokenizerConfig(
        arch="vit", image_size=32, encoder=vit["debug"], decoder=vit["debug"],
        quantizer=QuantizerConfig(kind="vq", codebook_size=64, code_dim=8, l2_norm=True), output="logit_laplace")
    # Taming's ImageNet f16 model: 16384 codes of dim 256, no normalization, plain pixel output.
    presets["vqgan-f16"] = TokenizerConfig(
        arch="vqgan", image_size=256, cnn=CNNConfig.PRESETS["vqgan-f16"], latent_dim=256,
        quantizer=QuantizerConfig(kind="vq", codebook_size=16384, code_dim=256, factorize=False, l2_norm=False),
        output="pixels")
    # VQ-VAE on 32x32 CIFAR-10: 512 codes of dim 64 with EMA updates (van den Oord et al., section 4.1).
    presets["vqvae"] = TokenizerConfig(
        arch="vqvae", image_size=32, cnn=CNNConfig.PRESETS["vqvae"], latent_dim=64,
        quantizer=QuantizerConfig(kind="ema", codebook_size=512, code_dim=64, factorize=False, l2_norm=False),
        output="pixels")
    return presets


TokenizerConfig.PRESETS = _presets()


class Tokenizer(nn.Module):
    """Encoder, quantizer and decoder; images in [-1, 1], latents channel-first ``(B, D, h, w)``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        encoder, decoder = lookup(BACKBONES, cfg.arch, "model.arch", "backbone arch")(cfg)
        self.encoder: nn.Module = encoder
        self.decoder: nn.Module = decoder
        self.quantizer = build_quantizer(cfg.quantizer, cfg.dim)

    # -- the generator step -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        q = self.encode(x)
        return self.decode(q.quantized), q

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(self.encoder(x))  # (B, D, h, w) -> quantized (B, D, h, w)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        dtype = next(p.dtype for p in self.decoder.parameters())  # bf16 under DeepSpeed; EMA codes stay fp32
        return self.decoder(quantized.to(dtype))  # (B, out_channels, H, W), raw head output

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Decoder output for code indices; equals ``decode(encode(x).quantized)`` for ``indices = encode(x).indices``."""
        return self.decode(self.quantizer.get_codes(indices))

    def to_image(self, dec_out: torch.Tensor) -> torch.Tensor:
        """Raw decoder output -> reconstruction in [-1, 1] (the logit-Laplace mean for the 6-channel head)."""
        return decoder_output_to_image(dec_out, self.cfg.output)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        dec_out, _ = self(x)
        return self.to_image(dec_out)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the decoder's final layer, for taming's adaptive GAN weight."""
        return self.decoder.last_layer

    # -- what a token is: the config's facts -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def codes_per_position(self) -> int:
        return self.cfg.codes_per_position

    def token_grid(self, image_size: Optional[int] = None) -> int:
        return self.cfg.token_grid(image_size)

    def token_facts(self, image_size: Optional[int] = None) -> TokenFacts:
        return self.cfg.token_facts(image_size)

    def lookup_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """(B*h*w, code_dim) fp32 vectors the codebook search sees for images x (k-means initialisation)."""
        return self.quantizer.lookup_vectors(self.encoder(x))

    def set_all_reduce(self, fn: Callable[[torch.Tensor], Any], *, rank: int = 0, world_size: int = 1) -> None:
        """Inject the sum-over-ranks collective used for codebook statistics and restarts (no-op by default)."""
        self.quantizer.set_all_reduce(fn, rank=rank, world_size=world_size)

    def set_step(self, step: int) -> None:
        self.quantizer.set_step(step)

    # -- export ---------------------------------------------------------------------------------
    def save_export(self, path: str | Path, extra: Optional[dict[str, Any]] = None) -> Path:
        """One file with fp32 weights and the config; ``extra`` holds provenance (step, run id, config hash)."""
        return write_export(path, EXPORT_FORMAT, self.cfg, self, extra)

    @classmethod
    def load_export(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Tokenizer":
        payload = read_export(path, EXPORT_FORMAT, "tokenizer", "; write one with `python launch/export_tokenizer.py "
                              f"--run-dir RUN_DIR --out {path}`", map_location)
        model = cls(from_dict(TokenizerConfig, payload["config"]))
        model.load_state_dict(payload["state_dict"], strict=True)
        model.export_extra = payload.get("extra", {})
        return model.eval()
