"""What a token is, and the one check that a prior fits a tokenizer's tokens (issue 19).

A tokenizer's config states its token facts without building the model (``TokenizerConfig.token_facts``): the
vocabulary (values of one code), the codes at each grid position (1, or the levels of a residual quantizer) and the
side of the code grid at an image size. Token shards record the same facts in their index
(``data.tokens.index_token_facts``). :func:`check_prior_fits` compares a prior with them; the pipeline (recipes,
before anything runs), token encoding, stage 2 (the token index) and sampling (the tokenizer export) all call it,
each naming what it compared and how to fix it.

    facts = tokenizer_cfg.token_facts()          # TokenFacts(vocab_size=8192, codes_per_position=1, grid=32, ...)
    check_prior_fits(prior_cfg, facts, what="the prior does not fit the tokenizer")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from vitvq.models.prior import PriorConfig

SINGLE_CODEBOOK = "use a single-codebook tokenizer (quantizer.kind vq, ema or gumbel)"


@dataclass(frozen=True)
class TokenFacts:
    """The tokens of one tokenizer at one image size, or those held by token shards."""

    vocab_size: int
    """Values one code takes: the codebook size (per level for a residual quantizer)."""
    codes_per_position: int
    """Codes at each grid position: 1, or the number of residual levels."""
    grid: int
    """Side of the code grid: an image becomes grid x grid positions."""
    image_size: int
    """Side in pixels of the images the tokens stand for."""
    num_classes: Optional[int] = None
    """Classes of labelled token shards (0: unlabelled); None for a tokenizer alone, which knows no classes."""


def check_prior_fits(prior: Optional[PriorConfig], tokens: TokenFacts, *, what: str, source: str = "the tokenizer",
                     fix: Optional[str] = "{}", advice: str = "") -> None:
    """Raise one ``ValueError`` naming every way ``prior`` does not fit ``tokens``; ``prior=None`` checks what any
    prior needs (it models a single sequence of grid**2 codes: one code per position).

    The message is ``what`` (which prior, which tokens), then each mismatch, with ``source`` naming the tokens'
    side ("the stage-1 tokenizer") and, per field, ``set`` + ``fix`` formatted with the override that fits
    (``"stage2.overrides: [{}]"``; None for no per-field fix, e.g. a trained export), then ``advice``."""
    problems = []
    if tokens.codes_per_position != 1:
        problems.append(f"{source} uses a residual quantizer ({tokens.codes_per_position} codes per position) but "
                        f"the prior models one code per position: {SINGLE_CODEBOOK}")

    def mismatch(name: str, ours: int, theirs: int, says: str, note: str = "") -> None:
        setting = f": set {fix.format(f'prior.{name}={theirs}')}{note}" if fix is not None else ""
        problems.append(f"prior.{name}={ours} but {says}{setting}")

    if prior is not None:
        t = tokens
        if prior.vocab_size != t.vocab_size:
            mismatch("vocab_size", prior.vocab_size, t.vocab_size, f"{source} has {t.vocab_size} codes")
        if prior.grid != t.grid:
            mismatch("grid", prior.grid, t.grid, f"{source} makes {t.grid}x{t.grid} codes at {t.image_size} px")
        if t.num_classes is not None and prior.num_classes and prior.num_classes != t.num_classes:
            mismatch("num_classes", prior.num_classes, t.num_classes, f"the token shards have {t.num_classes} classes",
                     " (or 0 for an unconditional prior)" if t.num_classes else "")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + (f". {advice}" if advice else ""))


__all__ = ["TokenFacts", "check_prior_fits", "SINGLE_CODEBOOK"]
