"""Vector quantizers between encoder and decoder: VQ, EMA-VQ, Gumbel-softmax and residual (RQ-VAE).

``build_quantizer(cfg, dim)`` returns a :class:`Quantizer` mapping encoder features ``(B, dim, h, w)`` to a
:class:`QuantizerOutput` (quantized features, loss, code indices, codebook statistics). The default is the
ViT-VQGAN codebook (Yu et al. 2021, section 3.2): a linear projection to a 32-d lookup space, l2-normalized
vectors and codes, nearest code by Euclidean distance, straight-through gradients, commitment weight 0.25,
a projection back up. Codebook storage and the cross-rank bookkeeping live in ``models/codebook.py``.

Invariant relied on by the tokenizer: under ``torch.no_grad()`` ``forward`` returns exactly
``get_codes(indices)`` (in eval mode; in training mode EMA updates and restarts change the codebook after a
forward). With gradients it returns the straight-through form, equal up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vitvq.models.codebook import AllReduce, Codebook, RowWriter, code_stats, fp32_island, no_reduce
from vitvq.configs import ConfigError, check
from vitvq.configs.schema import lookup


@dataclass
class QuantizerConfig:
    kind: str = "vq"
    """vq: codebook learned by gradient; ema: by moving averages; gumbel: Gumbel-softmax; residual: RQ-VAE."""
    codebook_size: int = 8192
    """Number of codes K."""
    code_dim: int = 32
    """Dimension of the lookup space (ViT-VQGAN factorized codes: 32)."""
    factorize: bool = True
    """Learned projections dim -> code_dim before the lookup and code_dim -> dim after; false needs code_dim == dim."""
    l2_norm: bool = True
    """l2-normalize projected vectors and codes before the nearest-code search (ViT-VQGAN; usage 2% -> 96%)."""
    beta: float = 0.25
    """Commitment weight on ||z - sg[q]||^2 (never on the codebook term: taming's legacy=True swap is a bug)."""
    ema_decay: float = 0.99
    """Decay of the EMA cluster sizes and sums (kind ema, or residual_kind ema)."""
    ema_eps: float = 1e-5
    """Laplace smoothing of the EMA cluster sizes."""
    gumbel_temp_start: float = 1.0
    """Gumbel-softmax temperature at step 0."""
    gumbel_temp_end: float = 0.0625
    """Temperature reached at gumbel_anneal_steps (DALL-E anneals 1 -> 1/16), kept after."""
    gumbel_anneal_steps: int = 150_000
    """Steps of the exponential temperature decay from start to end."""
    gumbel_kl_weight: float = 5e-4
    """Weight of KL(softmax(logits) || uniform) (taming's GumbelQuantize default)."""
    gumbel_hard: bool = True
    """Straight-through one-hot samples in training; false feeds the soft relaxation to the decoder."""
    residual_depth: int = 4
    """Number of residual quantization levels."""
    residual_kind: Literal["vq", "ema"] = "vq"
    """How each residual level learns its codebook."""
    residual_shared_codebook: bool = False
    """One codebook for all residual levels instead of one per level."""
    restart_dead_codes: bool = False
    """Replace rarely used codes by encoder vectors of the current batch (vq, ema, residual)."""
    dead_threshold: float = 1.0
    """A code is dead when used fewer times than this (summed over ranks) in a restart window."""
    restart_every: int = 200
    """Steps between dead-code checks; a check whose window is still too short (restart_window_uses) waits."""
    restart_window_uses: float = 1.0
    """A restart window (the steps since the last check) closes only once it holds this many tokens per code, the
    uses a uniformly used code expects (1: a distinct restart vector for every code; 0: close at every check)."""
    init: Literal["random", "kmeans"] = "random"
    """Codebook start: random codes, or k-means on the encoder's lookup vectors of the first batches (all ranks)."""
    kmeans_points: int = 65_536
    """Lookup vectors gathered over all ranks for the k-means initialisation (the trainer reads enough batches)."""
    kmeans_iters: int = 10
    """Lloyd iterations after k-means++ seeding."""
    health_window: int = 100
    """Optimizer steps of the code histogram behind codebook/usage, codebook/perplexity and codebook/dead_codes."""

    def __post_init__(self) -> None:
        lookup(QUANTIZERS, self.kind, "kind", "quantizer kind")  # the allowed kinds are the table's keys
        check(self.codebook_size >= 2, "codebook_size", self.codebook_size, "use at least 2 codes")
        check(self.code_dim >= 1, "code_dim", self.code_dim, "must be a positive dimension")
        check(self.beta >= 0, "beta", self.beta, "commitment weight must be >= 0")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "use a decay in [0, 1), e.g. 0.99")
        check(self.ema_eps > 0, "ema_eps", self.ema_eps, "Laplace smoothing must be > 0, e.g. 1e-5")
        check(self.gumbel_temp_start > 0, "gumbel_temp_start", self.gumbel_temp_start, "must be > 0")
        check(self.gumbel_temp_end > 0, "gumbel_temp_end", self.gumbel_temp_end, "must be > 0")
        check(self.gumbel_anneal_steps >= 1, "gumbel_anneal_steps", self.gumbel_anneal_steps,
              "must be >= 1 (set gumbel_temp_end = gumbel_temp_start for a constant temperature)")
        check(self.gumbel_kl_weight >= 0, "gumbel_kl_weight", self.gumbel_kl_weight, "must be >= 0")
        check(self.residual_depth >= 1, "residual_depth", self.residual_depth, "use at least 1 level")
        check(not (self.kind == "residual" and self.l2_norm), "l2_norm", self.l2_norm,
              "residual levels approximate shrinking residuals, which unit-norm codes cannot: set l2_norm: false")
        check(not (self.kind == "gumbel" and self.restart_dead_codes), "restart_dead_codes",
              self.restart_dead_codes, "gumbel picks codes from logits, not by distance: set it false")
        check(self.dead_threshold >= 0, "dead_threshold", self.dead_threshold, "must be >= 0")
        check(self.restart_every >= 1, "restart_every", self.restart_every, "must be >= 1 step")
        check(self.restart_window_uses >= 0, "restart_window_uses", self.restart_window_uses,
              "must be >= 0 expected uses per code (0 closes the window at every check)")
        check(not (self.kind == "gumbel" and self.init == "kmeans"), "init", self.init,
              "gumbel picks codes from logits, not by distance: set it to random")
        check(self.kmeans_points >= 1, "kmeans_points", self.kmeans_points, "must be positive")
        check(self.kmeans_iters >= 0, "kmeans_iters", self.kmeans_iters, "must be >= 0")
        check(self.health_window >= 1, "health_window", self.health_window, "must be >= 1 step")


@dataclass
class QuantizerOutput:
    quantized: Tensor
    """(B, dim, h, w) in the input dtype."""
    loss: Tensor
    """Scalar fp32 quantization loss (codebook + beta * commitment, or the Gumbel KL term)."""
    indices: Tensor
    """(B, h, w) long; (B, h, w, depth) for residual."""
    stats: dict[str, Tensor] = field(default_factory=dict)
    """fp32 scalars: perplexity, usage (code_stats; global over ranks in training mode); residual adds *_level{i}."""
    counts: Optional[Tensor] = None
    """(K,) fp32 code histogram of this batch (summed over ranks in training mode); residual: (depth, K)."""


class Quantizer(nn.Module):
    """Base: projections in and out of the lookup space, collective and schedule hooks."""

    def __init__(self, cfg: QuantizerConfig, dim: int, project_in: bool = True):
        super().__init__()
        if not cfg.factorize and cfg.code_dim != dim:
            raise ConfigError("code_dim", cfg.code_dim,
                              f"without factorize the codes live in the {dim}-d feature space: set code_dim: "
                              f"{dim} or factorize: true")
        self.cfg, self.dim, self.step = cfg, dim, 0
        if project_in:
            self.proj_in = nn.Linear(dim, cfg.code_dim) if cfg.factorize else nn.Identity()
        self.proj_out = nn.Linear(cfg.code_dim, dim) if cfg.factorize else nn.Identity()
        # Follows module.to(dtype) so that get_codes returns what forward returns for inputs of that dtype.
        self.register_buffer("_dtype_ref", torch.zeros(()), persistent=False)

    def codebooks(self) -> list[Codebook]:
        return [m for m in self.modules() if isinstance(m, Codebook)]

    def set_all_reduce(self, fn: AllReduce | None, *, rank: int = 0, world_size: int = 1) -> None:
        """fn(t) sums t in place over data-parallel ranks; rank/world_size are needed by dead-code restarts."""
        for cb in self.codebooks():
            cb.all_reduce, cb.rank, cb.world_size = fn or no_reduce, rank, world_size

    def set_row_writer(self, fn: RowWriter) -> None:
        """fn(param, rows, values) writes codebook rows where the optimizer keeps them too (restarts, k-means)."""
        for cb in self.codebooks():
            cb.write_rows = fn

    def set_step(self, step: int) -> None:
        self.step = step
        for cb in self.codebooks():
            cb.step = step

    def commit(self) -> None:
        """Apply the statistics of the micro-batches observed since the last commit (EMA codes, restart window)."""
        for cb in self.codebooks():
            cb.commit()

    def discard(self) -> None:
        """Drop them: the micro-batch was not used (a non-finite loss on some rank)."""
        for cb in self.codebooks():
            cb.discard()

    def end_step(self, step: int) -> int:
        """After optimizer step ``step``: dead-code restarts when due (collective); the number of codes replaced."""
        return sum(cb.end_step(step) for cb in self.codebooks())

    @property
    def needs_init(self) -> bool:
        """Whether k-means initialisation is configured and has not run yet (it is saved with the weights)."""
        return self.cfg.init == "kmeans" and not all(bool(cb.initialized) for cb in self.codebooks())

    def lookup_vectors(self, z: Tensor) -> Tensor:
        """(B, dim, h, w) encoder features -> (B*h*w, code_dim) fp32 vectors as the nearest-code search sees them."""
        return self._vectors_in(z)

    @torch.no_grad()
    def gather_vectors(self, x: Tensor) -> Tensor:
        """Every rank's lookup vectors (N, code_dim), rank order, on every rank (one summed collective of each rank's
        rows in its own slot and zeros elsewhere: exact). Every rank must bring the same N."""
        cb = self.codebooks()[0]
        n = torch.zeros(cb.world_size, device=x.device)
        n[cb.rank] = x.shape[0]
        cb.all_reduce(n)
        if not bool((n == x.shape[0]).all()):
            raise ValueError(f"k-means initialisation needs the same number of vectors on every rank, got {n.tolist()}")
        out = torch.zeros(cb.world_size, *x.shape, device=x.device)
        out[cb.rank] = x.float()
        cb.all_reduce(out)
        return out.reshape(-1, x.shape[1])

    @torch.no_grad()
    def init_codebooks(self, x: Tensor, seed: int = 0) -> None:
        """k-means initialisation from this rank's lookup vectors x (N, code_dim): the codebook is fitted to the
        vectors of all ranks and is identical on every rank (collective)."""
        x = self.gather_vectors(x)
        self._init_from(x, seed)

    def _init_from(self, x: Tensor, seed: int) -> None:
        self.codebooks()[0].init_from_data(x, self.cfg.kmeans_iters, seed)

    def _vectors_in(self, z: Tensor) -> Tensor:
        """(B, dim, h, w) -> (B*h*w, code_dim) fp32 lookup vectors, l2-normalized when configured."""
        x = self.proj_in(rearrange(z, "b d h w -> (b h w) d"))
        with fp32_island(z.device):
            x = x.float()
            return F.normalize(x, dim=-1) if self.cfg.l2_norm else x

    def _module_dtype(self) -> torch.dtype:
        """The dtype the rest of the model runs in. DeepSpeed's bf16 casts parameters but leaves buffers fp32,
        so a parameter decides; a module without one (EMA codebook, no projection) follows its buffer."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return self._dtype_ref.dtype

    def _vectors_out(self, zq: Tensor, b: int, h: int, w: int) -> Tensor:
        """(B*h*w, code_dim) fp32 -> (B, dim, h, w) in the module dtype."""
        y = self.proj_out(zq.to(self._module_dtype()))
        return rearrange(y, "(b h w) d -> b d h w", b=b, h=h, w=w)

    def _distance_loss(self, x: Tensor, q: Tensor, learned_by_grad: bool) -> Tensor:
        """beta ||x - sg[q]||^2 (+ ||sg[x] - q||^2 when the codebook learns by gradient), means over elements."""
        loss = self.cfg.beta * F.mse_loss(x, q.detach())
        return loss + F.mse_loss(q, x.detach()) if learned_by_grad else loss

    def get_codes(self, indices: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, z: Tensor) -> QuantizerOutput:
        raise NotImplementedError


class VectorQuantizer(Quantizer):
    """Nearest-code VQ with straight-through gradients; codebook by gradient ("vq") or EMA ("ema")."""

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__(cfg, dim)
        self.codebook = _make_codebook(cfg, ema=cfg.kind == "ema")

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape  # (B, dim, h, w)
        x = self._vectors_in(z)  # (N, C) fp32
        idx = self.codebook.nearest(x)  # (N,)
        with fp32_island(z.device):
            q = self.codebook.codes()[idx]  # (N, C), carries the codebook gradient for "vq"
            loss = self._distance_loss(x, q, learned_by_grad=not self.codebook.ema)
        indices = idx.view(b, h, w)
        if torch.is_grad_enabled():
            quantized = self._vectors_out(x + (q - x).detach(), b, h, w)  # straight-through estimator
        else:
            quantized = self.get_codes(indices)
        counts = self.codebook.observe([(x, idx)])[0]  # applied by commit(): updates serve the next micro-batch
        return QuantizerOutput(quantized.to(z.dtype), loss, indices, code_stats(counts), counts)

    def get_codes(self, indices: Tensor) -> Tensor:
        b, h, w = indices.shape
        with fp32_island(indices.device):
            q = self.codebook.codes()[indices.reshape(-1)]  # (N, C)
        return self._vectors_out(q, b, h, w)


class GumbelQuantizer(Quantizer):
    """Gumbel-softmax relaxation over the codebook (Jang et al. 2017; DALL-E; taming's GumbelQuantize)."""

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__(cfg, dim, project_in=False)
        self.to_logits = nn.Linear(dim, cfg.codebook_size)
        self.codebook = _make_codebook(cfg, ema=False)

    @property
    def temperature(self) -> float:
        """Exponential decay start -> end over the anneal steps, constant after."""
        c = self.cfg
        frac = min(max(self.step, 0) / c.gumbel_anneal_steps, 1.0)
        return c.gumbel_temp_start * (c.gumbel_temp_end / c.gumbel_temp_start) ** frac

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        k = self.cfg.codebook_size
        logits = self.to_logits(rearrange(z, "b d h w -> (b h w) d"))  # (N, K)
        with fp32_island(z.device):
            logits = logits.float()
            log_q = logits.log_softmax(-1)
            kl = (log_q.exp() * (log_q + math.log(k))).sum(-1).mean()  # KL(q || uniform), per position
            if self.training:  # Gumbel(0, 1) noise = -log(Exp(1))
                logits = logits - torch.empty_like(logits).exponential_().log()
            idx = logits.argmax(-1)  # (N,) the sample's code; argmax of the logits in eval
            if torch.is_grad_enabled():
                y = (logits / self.temperature).softmax(-1)  # (N, K)
                if self.cfg.gumbel_hard or not self.training:  # one-hot forward, soft gradient
                    y = F.one_hot(idx, k).float() - y.detach() + y
                zq = y @ self.codebook.codes()  # (N, C)
        indices = idx.view(b, h, w)
        quantized = self._vectors_out(zq, b, h, w) if torch.is_grad_enabled() else self.get_codes(indices)
        counts = self.codebook.observe([(None, idx)])[0]
        loss = self.cfg.gumbel_kl_weight * kl
        return QuantizerOutput(quantized.to(z.dtype), loss, indices, code_stats(counts), counts)

    def get_codes(self, indices: Tensor) -> Tensor:
        b, h, w = indices.shape
        with fp32_island(indices.device):
            q = self.codebook.codes()[indices.reshape(-1)]
        return self._vectors_out(q, b, h, w)


class ResidualQuantizer(Quantizer):
    """RQ-VAE (Lee et al. 2022): level i quantizes the residual left by levels < i; quantized = sum of levels.

    Gradients reach the encoder through the straight-through sum and every level's commitment term
    (enhancing-transformers detaches the encoder here; we do not). The commitment of level i is
    ||r_i - sg[q_i]||^2 with r_i = x - sum_{j<i} sg[q_j], i.e. RQ-VAE's ||x - sg[partial sum]||^2.
    """

    def __init__(self, cfg: QuantizerConfig, dim: int):
        super().__init__(cfg, dim)
        n = 1 if cfg.residual_shared_codebook else cfg.residual_depth
        self.levels = nn.ModuleList(_make_codebook(cfg, ema=cfg.residual_kind == "ema") for _ in range(n))

    def _level(self, i: int) -> Codebook:
        return self.levels[0 if self.cfg.residual_shared_codebook else i]

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        depth, shared = self.cfg.residual_depth, self.cfg.residual_shared_codebook
        x = self._vectors_in(z)  # (N, C) fp32
        r, q_sum, loss, seen = x, torch.zeros_like(x), x.new_zeros(()), []
        for i in range(depth):
            cb = self._level(i)
            idx = cb.nearest(r)  # (N,)
            with fp32_island(z.device):
                q = cb.codes()[idx]  # (N, C)
                loss = loss + self._distance_loss(r, q, learned_by_grad=not cb.ema) / depth
            seen.append((r, idx))
            q_sum = q_sum + q.detach()
            r = r - q.detach()
        indices = torch.stack([idx for _, idx in seen], dim=-1).view(b, h, w, depth)
        if torch.is_grad_enabled():
            quantized = self._vectors_out(x + (q_sum - x).detach(), b, h, w)
        else:
            quantized = self.get_codes(indices)
        if shared:  # one collective; the EMA pools every level's assignments; restarts draw from level 0's
            counts = list(self.levels[0].observe(seen))  # vectors (the encoder's), the first group
        else:
            counts = [self.levels[i].observe([seen[i]])[0] for i in range(depth)]
        counts = torch.stack(list(counts))  # (depth, K)
        stats = code_stats(counts)  # the mean over levels (code_stats' definition)
        for i, c in enumerate(counts):
            stats.update({f"{key}_level{i}": v for key, v in code_stats(c).items()})
        return QuantizerOutput(quantized.to(z.dtype), loss, indices, stats, counts)

    @torch.no_grad()
    def _init_from(self, x: Tensor, seed: int) -> None:
        """Level by level, as RQ-VAE's residuals are: level i from the residuals left by levels < i."""
        r = x.float()
        for i in range(1 if self.cfg.residual_shared_codebook else self.cfg.residual_depth):
            cb = self._level(i)
            cb.init_from_data(r, self.cfg.kmeans_iters, seed + i)
            r = r - cb.codes()[cb.nearest(r)]

    def get_codes(self, indices: Tensor) -> Tensor:
        b, h, w, depth = indices.shape
        flat = indices.reshape(-1, depth)
        with fp32_island(indices.device):
            q = torch.zeros(flat.shape[0], self.cfg.code_dim, device=indices.device)
            for i in range(depth):  # same order as forward, so fp32 sums match bit for bit
                q = q + self._level(i).codes()[flat[:, i]]
        return self._vectors_out(q, b, h, w)


def _make_codebook(cfg: QuantizerConfig, ema: bool) -> Codebook:
    return Codebook(cfg.codebook_size, cfg.code_dim, l2_norm=cfg.l2_norm, ema=ema, decay=cfg.ema_decay,
                    eps=cfg.ema_eps, restart=cfg.restart_dead_codes, dead_threshold=cfg.dead_threshold,
                    restart_every=cfg.restart_every, window_uses=cfg.restart_window_uses)


# The one table of quantizer kinds: QuantizerConfig accepts exactly its keys and build_quantizer reads it, so a
# new kind is one line here (issue 19). vq and ema share a class; cfg.kind picks the codebook's update rule.
QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "ema": VectorQuantizer,
    "gumbel": GumbelQuantizer,
    "residual": ResidualQuantizer,
}


def build_quantizer(cfg: QuantizerConfig, dim: int) -> Quantizer:
    """The quantizer for encoder features of width ``dim``; an unknown kind raises, naming the known ones."""
    return lookup(QUANTIZERS, cfg.kind, "model.quantizer.kind", "quantizer kind")(cfg, dim)


__all__ = ["QuantizerConfig", "QuantizerOutput", "Quantizer", "VectorQuantizer", "GumbelQuantizer",
           "ResidualQuantizer", "QUANTIZERS", "build_quantizer"]
