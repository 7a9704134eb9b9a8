"""Registries raise (issue 19): quantizer kinds, discriminator kinds, backbone arches and CNN kinds each come from one
table. For each family: every kind in the table builds its module at a debug size; an unknown kind is refused at
config load and by the builder (a config changed after validation), naming the known kinds; and the schema allows
exactly the table's keys, with no second list of them. CPU only, a few seconds."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import pytest
import torch
import torch.nn as nn

from vitvq.configs import ConfigError, from_dict, to_dict
from vitvq.models.cnn import CNN_KINDS, CNNConfig, CNNDecoder, CNNEncoder, Mid, ResidualLayer
from vitvq.models.discriminators import (DISCRIMINATORS, DiscConfig, PatchGANDiscriminator, StyleGAN2Discriminator,
                                         build_discriminator)
from vitvq.models.quantizers import (QUANTIZERS, GumbelQuantizer, QuantizerConfig, ResidualQuantizer,
                                     VectorQuantizer, build_quantizer)
from vitvq.models.tokenizer import BACKBONES, Tokenizer, TokenizerConfig
from vitvq.models.vit import ViTDecoder, ViTEncoder
from vitvq.trainer.config import load_stage1_config

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "stage1" / "debug.yaml"
UNKNOWN = "lfq"  # a plausible next kind that no table has


def debug_preset(presets: Mapping[str, Any], kind: str) -> Any:
    """A copy (tests change kinds in place) of the debug-size preset of ``kind``; every kind has one, ``debug*``."""
    return dataclasses.replace(next(p for name, p in presets.items() if name.startswith("debug") and p.kind == kind))


def debug_tokenizer(arch: str) -> TokenizerConfig:
    base = TokenizerConfig.PRESETS["debug"]
    if arch == "vit":
        return dataclasses.replace(base)
    return dataclasses.replace(base, arch=arch, cnn=debug_preset(CNNConfig.PRESETS, arch))


def cnn_pair(cfg: CNNConfig) -> nn.Module:
    return nn.ModuleList([CNNEncoder(cfg, 32, 3, 16), CNNDecoder(cfg, 32, 16, 3)])


class Family(NamedTuple):
    table: Mapping[str, Any]
    config: type
    """The config dataclass holding the kind field."""
    attr: str
    path: str
    """The kind field's dotted name in a stage-1 recipe."""
    debug: Callable[[str], Any]
    """A valid debug-size config of a kind."""
    build: Callable[[Any], nn.Module]
    describe: Callable[[nn.Module], tuple]
    """What was built, compared with EXPECTED."""


FAMILIES: dict[str, Family] = {
    "quantizer": Family(
        QUANTIZERS, QuantizerConfig, "kind", "model.quantizer.kind",
        lambda k: QuantizerConfig(kind=k, codebook_size=16, code_dim=8, l2_norm=k != "residual"),
        lambda cfg: build_quantizer(cfg, 16),
        lambda q: (type(q), q.codebooks()[0].ema)),
    "discriminator": Family(
        DISCRIMINATORS, DiscConfig, "kind", "disc.kind",
        lambda k: debug_preset(DiscConfig.PRESETS, k),
        lambda cfg: build_discriminator(cfg, 32),
        lambda d: (type(d),)),
    "backbone": Family(
        BACKBONES, TokenizerConfig, "arch", "model.arch", debug_tokenizer, Tokenizer,
        lambda t: (type(t.encoder), type(t.decoder), getattr(t.encoder.cfg, "kind", None))),
    "cnn": Family(
        CNN_KINDS, CNNConfig, "kind", "model.cnn.kind",
        lambda k: debug_preset(CNNConfig.PRESETS, k), cnn_pair,
        # block types, the config's downsampling, and the latent side the encoder really makes of 32 px
        lambda m: (type(m[0].blocks[-1]), type(m[1].blocks[0]), m[0].cfg.downsample,
                   m[0](torch.zeros(1, 3, 32, 32)).shape[-1])),
}

EXPECTED: dict[str, dict[str, tuple]] = {
    "quantizer": {"vq": (VectorQuantizer, False), "ema": (VectorQuantizer, True), "gumbel": (GumbelQuantizer, False),
                  "residual": (ResidualQuantizer, False)},
    "discriminator": {"stylegan2": (StyleGAN2Discriminator,), "patchgan": (PatchGANDiscriminator,)},
    "backbone": {"vit": (ViTEncoder, ViTDecoder, None), "vqgan": (CNNEncoder, CNNDecoder, "vqgan"),
                 "vqvae": (CNNEncoder, CNNDecoder, "vqvae")},
    "cnn": {"vqgan": (Mid, Mid, 2, 16), "vqvae": (ResidualLayer, ResidualLayer, 4, 8)},
}


def known(family: str) -> str:
    return "known: " + ", ".join(sorted(FAMILIES[family].table))


@pytest.mark.parametrize("family, kind", [(f, k) for f, fam in FAMILIES.items() for k in fam.table],
                         ids=lambda v: str(v))
def test_every_kind_in_the_table_builds_its_module(family: str, kind: str) -> None:
    fam = FAMILIES[family]
    torch.manual_seed(0)
    with torch.no_grad():
        built = fam.describe(fam.build(fam.debug(kind)))
    assert kind in EXPECTED[family], f"new {family} kind {kind!r}: add what it builds to EXPECTED"
    assert built == EXPECTED[family][kind]


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unknown_kind_is_refused_at_load_naming_the_known_kinds(family: str) -> None:
    path = FAMILIES[family].path
    with pytest.raises(ConfigError) as err:
        load_stage1_config(DEBUG, [f"{path}={UNKNOWN}"])
    assert (err.value.field, err.value.value) == (path, UNKNOWN), str(err.value)
    assert known(family) in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unknown_kind_is_refused_by_the_builder_naming_the_known_kinds(family: str) -> None:
    """A config whose kind changed after validation (``__post_init__`` never saw it) must not fall through to
    some other model."""
    fam = FAMILIES[family]
    cfg = fam.debug(next(iter(fam.table)))
    object.__setattr__(cfg, fam.attr, UNKNOWN)
    with pytest.raises(ValueError) as err:
        fam.build(cfg)
    message = str(err.value)
    assert fam.path in message and repr(UNKNOWN) in message and known(family) in message, message


@pytest.mark.parametrize("family", FAMILIES)
def test_the_schema_allows_exactly_the_tables_kinds(family: str) -> None:
    fam = FAMILIES[family]
    # No second list (a Literal) that could disagree with the table: the field is a str the table validates.
    assert typing.get_type_hints(fam.config)[fam.attr] is str
    for kind in fam.table:
        cfg = fam.debug(kind)
        assert from_dict(fam.config, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError) as err:
        from_dict(fam.config, {**to_dict(fam.debug(next(iter(fam.table)))), fam.attr: UNKNOWN})
    assert err.value.field == fam.attr
    assert err.value.hint.split("known: ")[1].split(", ") == sorted(fam.table)
