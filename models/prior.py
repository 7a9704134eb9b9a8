"""The stage-2 prior: a decoder-only transformer over a tokenizer's raster-ordered token grid (VIM / LlamaGen).

An image is ``N = grid**2`` codebook indices ``z_0 .. z_{N-1}`` in raster order (token ``t`` sits at row
``t // grid``, column ``t % grid``). The model reads ``[cond, z_0 .. z_{N-2}]`` and predicts all of
``z_0 .. z_{N-1}``: ``cond`` is a class embedding (``num_classes + 1`` rows, the last the null class for
classifier-free guidance) or, unconditional (``num_classes = 0``), a single learned start embedding, which
is the same table with only the null row.

The blocks follow LlamaGen (``autoregressive/models/gpt.py``): pre-norm RMSNorm, SwiGLU MLP, no biases,
``F.scaled_dot_product_attention``, 2-D RoPE (half of each head's dims rotate with the row, half with the
column), std-0.02 init and a zero output head, so the loss at step 0 is exactly ``ln(vocab_size)``. Unlike
LlamaGen, the condition position gets the identity rotation instead of an all-zero table, which zeroed its
query and key so that the condition reached other tokens only through its value.

Blocks live in ``.blocks`` (an ``nn.ModuleList`` read on every call), so the trainer can wrap them for
activation checkpointing from outside (``trainer/parallelize.py``). Decoding writes into a :class:`KVCache`
of static per-layer buffers and by default attends over their full length under a mask, so that one token
costs the same at every position (``benchmarks/sample_prior.py`` measures it). Sampling: ``models/sampling.py``.

    model = Prior(from_dict(PriorConfig, {"preset": "small", "vocab_size": 8192, "grid": 32}))
    logits = model(idx, labels)          # (B, N) int64, (B,) int64 -> (B, N, vocab) fp32
    loss, acc = prior_loss(logits, idx)  # nats per token, token accuracy
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitvq.configs import check, from_dict
from vitvq.models.export import read_export, write_export

EXPORT_FORMAT = "vitvq-prior/1"


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - n % k


@dataclass
class PriorConfig:
    vocab_size: int = 8192
    """Token vocabulary: the tokenizer's codebook size."""
    grid: int = 32
    """Side of the token grid (32 for ViT-VQGAN at 256px); a sequence holds grid**2 tokens."""
    num_classes: int = 1000
    """Classes to condition on (plus one null row for guidance); 0 = unconditional (one start embedding)."""
    width: int = 512
    """Transformer width (token dimension)."""
    depth: int = 8
    """Number of transformer blocks."""
    heads: int = 8
    """Attention heads; width / heads must be divisible by 4 (2-D RoPE rotates pairs in two halves)."""
    rope_base: float = 10000.0
    """RoPE frequency base theta."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    token_dropout: float = 0.1
    """Dropout on the input embeddings (LlamaGen's token_dropout_p)."""
    resid_dropout: float = 0.1
    """Dropout on the attention and MLP outputs before each residual add (LlamaGen's resid/ffn dropout)."""
    attn_dropout: float = 0.0
    """Dropout on the attention weights (0 in LlamaGen)."""
    label_dropout: float = 0.1
    """Probability that ``drop_labels`` replaces a label by the null class in training (CFG; LlamaGen 0.1)."""

    PRESETS: ClassVar[dict[str, "PriorConfig"]] = {}

    def __post_init__(self) -> None:
        for name in ("vocab_size", "grid", "width", "depth", "heads"):
            value = getattr(self, name)
            check(value > 0, name, value, "must be a positive integer")
        check(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0 (0 = unconditional)")
        check(self.width % self.heads == 0, "width", self.width, f"must be divisible by heads={self.heads}")
        check(self.head_dim % 4 == 0, "heads", self.heads,
              f"width / heads = {self.width / self.heads:g} must be divisible by 4 (2-D RoPE: row and column "
              f"halves of rotated pairs); choose another head count")
        check(self.rope_base > 1.0, "rope_base", self.rope_base, "must be > 1")
        check(self.norm_eps > 0.0, "norm_eps", self.norm_eps, "must be positive")
        for name in ("token_dropout", "resid_dropout", "attn_dropout"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, name, value, "must be in [0, 1)")
        check(0.0 <= self.label_dropout <= 1.0, "label_dropout", self.label_dropout, "must be in [0, 1]")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden size: 2/3 of 4 * width (same parameters as a 4x GELU MLP), rounded up to 256 (LLaMA)."""
        return find_multiple(int(2 * 4 * self.width / 3), 256)

    @property
    def seq_len(self) -> int:
        """Tokens per image, and the model's input length: the condition plus the first N - 1 tokens."""
        return self.grid * self.grid

    @property
    def null_class(self) -> int:
        """Row of the condition table used for guidance; the start embedding of an unconditional model."""
        return self.num_classes


# vocab / grid / classes are those of the tokenizer and dataset: recipes override them per run.
# llamagen-*: LlamaGen's GPT-B/L/XL at its own settings (VQ-16: 16384 codes, 16x16 tokens at 256px, ImageNet),
# where the parameter counts match its published 111M / 343M / 775M (tests/models/test_prior.py).
# vim-*: ViT-VQGAN's VIM-Base (16 heads) and VIM-Large (32 heads) shapes with our SwiGLU blocks; both count
# about 9-11% above the paper's 650M / 1.7B, which are below the blocks of its own stated shapes (see the test).
PriorConfig.PRESETS = {
    "debug": PriorConfig(vocab_size=64, grid=4, num_classes=10, width=64, depth=2, heads=4),
    "small": PriorConfig(width=512, depth=8, heads=8),
    "vim-base": PriorConfig(width=1536, depth=24, heads=16),
    "vim-large": PriorConfig(width=2048, depth=36, heads=32),
    "llamagen-b": PriorConfig(vocab_size=16384, grid=16, width=768, depth=12, heads=12),
    "llamagen-l": PriorConfig(vocab_size=16384, grid=16, width=1024, depth=24, heads=16),
    "llamagen-xl": PriorConfig(vocab_size=16384, grid=16, width=1280, depth=36, heads=20),
}


def drop_labels(labels: torch.Tensor, *, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``p`` (label dropout for classifier-free guidance).

    One uniform per label from ``generator`` (on the generator's device), so the same generator state drops the
    same labels wherever the batch lives."""
    u = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
    return torch.where(u < p, torch.full_like(labels, null_class), labels)


def rope_2d(grid: int, head_dim: int, base: float = 10000.0, device: Optional[torch.device] = None) -> torch.Tensor:
    """cos/sin table of the 2-D RoPE, fp32, shape (1 + grid**2, head_dim / 2, 2) (last dim: cos, sin).

    Row 0 is the condition position: the identity rotation (cos 1, sin 0). Row ``1 + t`` is token ``z_t`` at
    (r, c) = (t // grid, t % grid). Dims are rotated in adjacent pairs (2i, 2i + 1); pairs ``[0, head_dim/4)``
    turn by ``r * w_k`` and pairs ``[head_dim/4, head_dim/2)`` by ``c * w_k``, with ``w_k = base^(-4k/head_dim)``
    (1-D RoPE's frequencies for a half-width head), so q.k depends on the (row, column) offset only.
    """
    quarter = head_dim // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (hd/4,)
    t = torch.arange(grid * grid, device=device)
    rows, cols = (t // grid).double(), (t % grid).double()  # (N,)
    angles = torch.cat([rows[:, None] * omega, cols[:, None] * omega], dim=1)  # (N, hd/2)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (N, hd/2, 2)
    cond = torch.stack([torch.ones_like(angles[:1]), torch.zeros_like(angles[:1])], dim=-1)  # (1, hd/2, 2)
    return torch.cat([cond, table]).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, ..., head_dim) by table (T, head_dim / 2, 2), in fp32; returns x's dtype."""
    shape = (x.shape[1],) + (1,) * (x.dim() - 3) + (x.shape[-1] // 2,)  # broadcast over batch and heads
    cos, sin = table[..., 0].reshape(shape), table[..., 1].reshape(shape)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, ..., hd/2) each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (DeepSpeed bf16 casts the weight, not the math)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerCache(NamedTuple):
    """One layer's view of a :class:`KVCache` for one call: where to write, what a query may see."""

    k: torch.Tensor  # (B, heads, max_len, head_dim), written in place
    v: torch.Tensor
    start: int  # position of this call's first input
    mask: Optional[torch.Tensor]  # (T, keys) bool: query i sees keys <= start + i


class KVCache:
    """Static keys and values for decoding one batch: per layer (B, heads, max_len, head_dim), allocated once.

    Each call writes its keys at ``[pos, pos + T)`` in place (never ``torch.cat``, which copies the whole cache
    at every token). With ``full_length`` (the default) a query attends over the whole buffer under a mask:
    every position then costs what the last one does, and the shapes never change (what CUDA graphs need, as in
    gpt-fast and LlamaGen). Without it, over the filled part only: cheaper on average but growing with the
    position, since reading the cache is most of a late token's cost on a CPU (``benchmarks/sample_prior.py``).
    Slots not yet written hold zeros and are masked out."""

    def __init__(self, batch: int, max_len: int, depth: int, heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, full_length: bool = True):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()  # (L, L)
        self.batch, self.max_len, self.full_length, self.pos = batch, max_len, full_length, 0

    def layer(self, i: int, length: int) -> LayerCache:
        start, end = self.pos, self.pos + length
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {start} filled, {length} more asked")
        if self.full_length:
            return LayerCache(self.k[i], self.v[i], start, self.causal[start:end])
        # Views of the filled prefix (writes go to the buffer); one query needs no mask.
        mask = None if length == 1 else self.causal[start:end, :end]
        return LayerCache(self.k[i][:, :, :end], self.v[i][:, :, :end], start, mask)


class Attention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.attn_dropout
        self.wqkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.wo = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: Optional[LayerCache] = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.wqkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, H, hd)
        q, k = apply_rope(qkv[:, :, :2], rope).transpose(1, 3).unbind(2)  # (B, H, T, hd) each
        v = qkv[:, :, 2].transpose(1, 2)
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 dropout_p=self.dropout if self.training else 0.0)
        else:
            kv.k[:, :, kv.start:kv.start + T] = k
            kv.v[:, :, kv.start:kv.start + T] = v
            out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=kv.mask)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.w3 = nn.Linear(cfg.width, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: Optional[LayerCache] = None) -> torch.Tensor:
        x = x + self.drop(self.attention(self.attention_norm(x), rope, kv))  # (B, T, D)
        return x + self.drop(self.feed_forward(self.ffn_norm(x)))


class Prior(nn.Module):
    """Logits over the next token for a class- (or un-) conditional raster-order token sequence."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.cond_embed = nn.Embedding(cfg.num_classes + 1, cfg.width)  # last row: null class / start token
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.drop = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        # Not a buffer: module.to(bf16) (DeepSpeed's bf16) would cast it, and the rotation must stay fp32.
        self._rope: dict[torch.device, torch.Tensor] = {}
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; call after ``to_empty()`` from meta."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.zeros_(self.head.weight)  # LlamaGen: uniform first prediction, loss ln(vocab) at step 0

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """The fp32 2-D RoPE table (1 + grid**2, head_dim / 2, 2) on ``device``, computed once per device."""
        if device not in self._rope:
            self._rope[device] = rope_2d(self.cfg.grid, self.cfg.head_dim, self.cfg.rope_base, device=device)
        return self._rope[device]

    def _cond(self, labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:  # -> (B, 1, D)
        if labels is None:
            if self.cfg.num_classes > 0:
                raise ValueError("a class-conditional prior needs labels (pass the null class explicitly for none)")
            labels = torch.full((batch,), self.cfg.null_class, dtype=torch.long, device=self.tok_embed.weight.device)
        return self.cond_embed(labels)[:, None]

    def _embed(self, idx: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:  # (B, t) -> (B, 1 + t, D)
        if idx.shape[1] >= self.cfg.seq_len:
            raise ValueError(f"prior built for {self.cfg.seq_len} tokens ({self.cfg.grid}x{self.cfg.grid}): at most "
                             f"{self.cfg.seq_len - 1} given tokens, got {idx.shape[1]}")
        return torch.cat([self._cond(labels, idx.shape[0]), self.tok_embed(idx)], dim=1)

    def _trunk(self, x: torch.Tensor, cache: Optional[KVCache] = None, last: bool = False) -> torch.Tensor:
        """(B, T, D) inputs at positions [cache.pos, + T) (0 without cache) -> logits (B, T, V), or (B, 1, V)."""
        T = x.shape[1]
        start = 0 if cache is None else cache.pos
        rope = self.rope_table(x.device)[start:start + T]  # (T, hd/2, 2) fp32
        h = self.drop(x)
        for i, block in enumerate(self.blocks):  # read from the ModuleList each call: the trainer may wrap them
            h = block(h, rope, None if cache is None else cache.layer(i, T))
        if cache is not None:
            cache.pos += T
        if last:
            h = h[:, -1:]
        return self.head(self.norm(h)).float()

    def forward(self, idx: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits: (B, T) tokens, T <= grid**2, (B,) labels -> (B, T, vocab) fp32, where
        ``logits[:, t]`` predicts ``idx[:, t]`` from the condition and ``idx[:, :t]`` (``idx[:, -1]`` is never read).

        Labels are used as given: label dropout is the caller's (:meth:`drop_labels`). None = unconditional."""
        return self._trunk(self._embed(idx[:, :-1], labels))

    def next_logits(self, prefix: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, vocab) for z_t given z_<t (B, t), recomputing the whole prefix: decoding without a cache."""
        return self._trunk(self._embed(prefix, labels), last=True)[:, -1]

    # -- decoding ---------------------------------------------------------------------------------
    def new_cache(self, batch: int, full_length: bool = True) -> KVCache:
        """Static buffers for decoding ``batch`` sequences in the model's device and dtype."""
        w, c = self.tok_embed.weight, self.cfg
        return KVCache(batch, c.seq_len, c.depth, c.heads, c.head_dim, w.device, w.dtype, full_length=full_length)

    def prefill(self, cache: KVCache, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed the condition at position 0 of an empty cache: (B,) labels -> logits (B, vocab) for z_0."""
        if cache.pos != 0:
            raise ValueError(f"prefill needs an empty cache, this one holds {cache.pos} positions")
        return self._trunk(self._cond(labels, cache.batch), cache)[:, -1]

    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the next tokens (B, T) after the cache's ``pos - 1`` given ones -> logits (B, T, vocab), each for the
        token after it. Sampling feeds one at a time; T > 1 prefills a known part (e.g. the top rows of an image)."""
        return self._trunk(self.tok_embed(tokens), cache)

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator, p: Optional[float] = None) -> torch.Tensor:
        """Label dropout for training with guidance: each label -> the null class with probability p
        (default ``cfg.label_dropout``)."""
        p = self.cfg.label_dropout if p is None else p
        return drop_labels(labels, p=p, null_class=self.cfg.null_class, generator=generator)

    # -- export -----------------------------------------------------------------------------------
    def save_export(self, path: str | Path, extra: Optional[dict[str, Any]] = None) -> Path:
        """One file with fp32 weights and the config (``models/export.py``, the tokenizer's format too)."""
        return write_export(path, EXPORT_FORMAT, self.cfg, self, extra)

    @classmethod
    def load_export(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Prior":
        payload = read_export(path, EXPORT_FORMAT, "prior", map_location=map_location)
        model = cls(from_dict(PriorConfig, payload["config"]))
        model.load_state_dict(payload["state_dict"], strict=True)
        model.export_extra = payload.get("extra", {})
        return model.eval()


def prior_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy in nats per token (fp32) and token accuracy (no gradient): (B, N, V), (B, N)."""
    flat = logits.float().flatten(0, 1)  # (B*N, V)
    loss = F.cross_entropy(flat, targets.flatten())
    acc = (flat.detach().argmax(-1) == targets.flatten()).float().mean()
    return loss, acc


__all__ = ["PriorConfig", "Prior", "KVCache", "Block", "RMSNorm", "rope_2d", "apply_rope", "drop_labels",
           "prior_loss", "find_multiple", "EXPORT_FORMAT"]
