"""Token facts on the tokenizer (issue 19): vocabulary, codes per position and grid from the config agree with what a
built tokenizer encodes; the one prior/tokens check names each mismatch; the one codebook-usage definition on a
hand-made residual histogram, as the quantizer, the health window and evaluation compute it (CPU, a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitvq.configs import ConfigError, from_dict
from vitvq.evaluation.metrics import ReconStats, codebook_usage
from vitvq.models.codebook import UsageWindow, code_histogram, code_stats
from vitvq.models.prior import PriorConfig
from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
from vitvq.models.tokens import TokenFacts, check_prior_fits

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH4 = {"preset": "debug", "patch_size": 4}
RESIDUAL = {"kind": "residual", "l2_norm": False, "codebook_size": 64, "code_dim": 8, "residual_depth": 3}
# name: (config, vocab_size, codes_per_position, grid at the config's image size)
CONFIGS = {
    "vit-8px": ("debug", 64, 1, 4),
    "vit-4px": ({"preset": "debug", "encoder": PATCH4, "decoder": PATCH4}, 64, 1, 8),
    "vqgan-f16": ({"preset": "vqgan-f16", "image_size": 64}, 16384, 1, 4),
    "vqvae": ("vqvae", 512, 1, 8),
    "residual": ({"preset": "debug", "quantizer": RESIDUAL}, 64, 3, 4),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_facts_agree_with_what_the_built_tokenizer_encodes(name: str) -> None:
    spec, vocab, per_position, grid = CONFIGS[name]
    cfg = from_dict(TokenizerConfig, spec)
    assert (cfg.vocab_size, cfg.codes_per_position, cfg.token_grid()) == (vocab, per_position, grid)
    assert cfg.token_facts() == TokenFacts(vocab, per_position, grid, cfg.image_size)
    torch.manual_seed(0)
    tok = Tokenizer(cfg).eval()
    assert (tok.vocab_size, tok.codes_per_position, tok.token_grid()) == (vocab, per_position, grid)
    assert tok.token_facts() == cfg.token_facts()
    with torch.no_grad():
        indices = tok.encode(torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1).indices
    assert tuple(indices.shape) == (2, grid, grid) + ((per_position,) if per_position > 1 else ())
    assert 0 <= int(indices.min()) and int(indices.max()) < vocab


def test_paper_presets_unbuilt() -> None:
    """The 256 px recipes, never built: 8 px ViT patches, taming's f16, VQ-VAE's 4x at CIFAR's 32 px."""
    facts = {name: TokenizerConfig.PRESETS[name].token_facts() for name in ("vit-ss", "vqgan-f16", "vqvae")}
    assert facts["vit-ss"] == TokenFacts(8192, 1, 32, 256)
    assert facts["vqgan-f16"] == TokenFacts(16384, 1, 16, 256)
    assert facts["vqvae"] == TokenFacts(512, 1, 8, 32)
    assert TokenizerConfig.PRESETS["vqgan-f16"].token_grid(512) == 32  # a CNN runs at any multiple of 16


@pytest.mark.parametrize("preset,size,factor", [("debug", 36, 8), ("vqgan-f16", 100, 16), ("vqvae", 30, 4),
                                                ("debug", 0, 8)])
def test_a_size_that_does_not_fit_the_patch_is_refused(preset: str, size: int, factor: int) -> None:
    cfg = TokenizerConfig.PRESETS[preset]
    with pytest.raises(ConfigError, match=rf"'image_size' = {size}: must be a positive multiple of {factor}") as e:
        cfg.token_grid(size)
    assert f"one code per {factor}x{factor} px" in str(e.value)
    with pytest.raises(ConfigError, match="image_size"):
        cfg.token_facts(size)


# -- the one prior/tokens check -----------------------------------------------------------------------------
FACTS = TokenFacts(vocab_size=64, codes_per_position=1, grid=4, image_size=32, num_classes=10)


def prior(**over) -> PriorConfig:
    return from_dict(PriorConfig, {"preset": "debug", **over})  # vocab 64, grid 4, 10 classes


def test_a_fitting_prior_passes() -> None:
    check_prior_fits(prior(), FACTS, what="x")
    check_prior_fits(prior(num_classes=0), FACTS, what="x")  # an unconditional prior ignores the labels
    check_prior_fits(prior(), TokenFacts(64, 1, 4, 32), what="x")  # a tokenizer alone knows no classes
    check_prior_fits(None, FACTS, what="x")


@pytest.mark.parametrize("over,facts,problem", [
    ({"vocab_size": 32}, FACTS, "prior.vocab_size=32 but the tokenizer has 64 codes: set prior.vocab_size=64"),
    ({"grid": 8}, FACTS, "prior.grid=8 but the tokenizer makes 4x4 codes at 32 px: set prior.grid=4"),
    ({"num_classes": 5}, FACTS, "prior.num_classes=5 but the token shards have 10 classes: set prior.num_classes=10 "
                                "(or 0 for an unconditional prior)"),
    ({"num_classes": 5}, TokenFacts(64, 1, 4, 32, num_classes=0),
     "prior.num_classes=5 but the token shards have 0 classes: set prior.num_classes=0"),
    ({}, TokenFacts(64, 3, 4, 32), "the tokenizer uses a residual quantizer (3 codes per position) but the prior "
                                   "models one code per position: use a single-codebook tokenizer"),
])
def test_each_mismatch_is_named_with_its_fix(over: dict, facts: TokenFacts, problem: str) -> None:
    with pytest.raises(ValueError) as e:
        check_prior_fits(prior(**over), facts, what="P does not fit T")
    assert str(e.value).startswith("P does not fit T: ") and problem in str(e.value)
    assert str(e.value).count(" but ") == 1


def test_every_mismatch_in_one_error_with_the_callers_fix() -> None:
    facts = TokenFacts(64, 2, 4, 32, num_classes=10)
    with pytest.raises(ValueError) as e:
        check_prior_fits(prior(vocab_size=32, grid=8, num_classes=5), facts, what="stage2: P does not fit T",
                         source="the stage-1 tokenizer", fix="stage2.overrides: [{}]", advice="Retrain.")
    msg = str(e.value)
    for part in ("the stage-1 tokenizer uses a residual quantizer (2 codes per position)",
                 "prior.vocab_size=32 but the stage-1 tokenizer has 64 codes: set stage2.overrides: [prior.vocab_size=64]",
                 "prior.grid=8 but the stage-1 tokenizer makes 4x4 codes at 32 px: set stage2.overrides: [prior.grid=4]",
                 "prior.num_classes=5 but the token shards have 10 classes: set stage2.overrides: [prior.num_classes=10]"):
        assert part in msg, part
    assert msg.endswith(". Retrain.")
    with pytest.raises(ValueError) as e:
        check_prior_fits(prior(vocab_size=32), facts, what="x", fix=None)  # a trained export: no per-field fix
    assert "prior.vocab_size=32 but the tokenizer has 64 codes" in str(e.value) and "set prior" not in str(e.value)
    with pytest.raises(ValueError, match="residual quantizer"):  # no prior: what every prior needs
        check_prior_fits(None, facts, what="x")


# -- the one codebook-usage definition ----------------------------------------------------------------------
HIST = np.array([[3, 1, 0, 0],   # level 0: 2 of 4 codes, p = (3/4, 1/4)
                 [2, 0, 0, 0],   # level 1: 1 of 4, perplexity 1
                 [1, 1, 1, 1]])  # level 2: 4 of 4, perplexity 4
USAGE = (2 / 4 + 1 / 4 + 4 / 4) / 3
PERPLEXITY = (math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) + 1 + 4) / 3


def test_codebook_usage_is_the_mean_over_residual_levels() -> None:
    s = code_stats(torch.from_numpy(HIST))
    assert float(s["usage"]) == pytest.approx(USAGE) and float(s["perplexity"]) == pytest.approx(PERPLEXITY)
    assert s["usage"].dtype == torch.float32  # integer counts: fp32, as the quantizer's stats
    assert codebook_usage(HIST) == pytest.approx({"codebook_usage": USAGE, "perplexity": PERPLEXITY})  # evaluation
    window = UsageWindow(size=4, steps=2, levels=3)  # training's health window, fed over two steps
    for part in (HIST - HIST // 2, HIST // 2):
        window.add(torch.from_numpy(part).float())
        window.end_step()
    assert torch.equal(window.counts(), torch.from_numpy(HIST).double())
    stats = window.stats()
    assert stats["usage"] == pytest.approx(USAGE) and stats["perplexity"] == pytest.approx(PERPLEXITY)
    assert stats["dead_codes"] == 5  # unused (level, code) pairs
    # The histogram of residual indices (B, h, w, depth), as validation and evaluation count them.
    indices = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 1, 3]]).reshape(1, 2, 2, 3)  # 4 positions
    assert code_histogram(indices, 4).tolist() == [[3, 1, 0, 0], [3, 1, 0, 0], [1, 1, 1, 1]]
    assert code_histogram(indices[..., 0], 4).tolist() == [[3, 1, 0, 0]]  # one codebook: one level
    recon = ReconStats()
    x = torch.zeros(1, 3, 8, 8)
    recon.update(x, x, indices, 4)
    assert recon.summary()["codebook_usage"] == pytest.approx((2 / 4 + 2 / 4 + 4 / 4) / 3)


@pytest.mark.parametrize("shared", [False, True])
def test_the_residual_quantizer_reports_every_level(shared: bool, quant) -> None:
    q = quant.make(kind="residual", l2_norm=False, residual_depth=3, residual_shared_codebook=shared).eval()
    torch.manual_seed(0)
    out = q(torch.randn(2, 6, 3, 5))
    assert torch.equal(out.counts, code_histogram(out.indices, 16).float())  # (depth, K): the window sees every level
    s = code_stats(out.counts)
    assert torch.equal(out.stats["usage"], s["usage"]) and torch.equal(out.stats["perplexity"], s["perplexity"])
    levels = [code_stats(c)["usage"] for c in out.counts]
    assert float(out.stats["usage"]) == pytest.approx(float(torch.stack(levels).mean()))
