"""Codebook storage, nearest-code lookup and the collective bookkeeping shared by every quantizer.

A :class:`Codebook` holds K code vectors of size D, learned by gradient (VQ-VAE, "vq") or by exponential
moving averages of cluster statistics (VQ-VAE appendix A.1, sonnet ``VectorQuantizerEMA``, "ema").
Everything that must agree across data-parallel ranks -- the code histogram behind perplexity and usage, the
EMA statistics, which dead codes restart and with which vectors -- goes through one injected
``all_reduce(t)`` that sums ``t`` in place over ranks (a no-op by default). The module never imports
``torch.distributed``, and every rank ends a training step with an identical codebook: data parallelism only
reduces gradients, and vector-quantize-pytorch's EMA and restarts hung or diverged under DDP until they were
made collective. Collectives run in training mode only: in eval mode ranks may hold different numbers of
batches, and a collective inside an uneven loop hangs.

State changes wait for a verdict: ``observe`` (in the forward) only computes what the EMA statistics and the
restart window would become; ``commit()`` applies it once the trainer knows the micro-batch's losses are finite
on every rank, ``discard()`` drops it. Dead-code restarts run at the end of an optimizer step (``end_step``),
and k-means initialisation (``init_from_data``) once, before the first step.

Restarted codes take distinct lookup vectors of the window (the steps since the last check; the most recent
``size`` vectors on each rank), since the nearest-code search only ever picks the first of identical codes. A check
waits until its window holds ``window_uses`` tokens per code (1: a vector for every code); longer windows tell rare
codes from dead ones better but restart too late. The usage measured either way (issue 10): README, "Design notes".
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AllReduce = Callable[[Tensor], object]
RowWriter = Callable[[nn.Parameter, Tensor, Tensor], None]


def no_reduce(t: Tensor) -> None:
    """Default all_reduce: one process holds the whole batch, nothing to sum."""


@torch.no_grad()
def write_rows_inplace(param: nn.Parameter, rows: Tensor, values: Tensor) -> None:
    """Default row writer: the parameter only (plain PyTorch optimizers keep no copy of it; their moments stay)."""
    param.data[rows] = values.to(param.dtype)


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int, seed: int, spherical: bool, chunk: int = 4096) -> Tensor:
    """k-means++ seeding then ``iters`` Lloyd iterations on rows of x (N, D) fp32; returns (k, D) centers.

    Spherical (centers l2-normalized after each update) for l2-normalized codebooks. An empty cluster keeps its
    center. With fewer points than codes, the missing seeds are drawn (with replacement) from the points, so
    several codes start equal and the first restarts separate them. Random draws come from a CPU generator
    seeded by ``seed``: the same points give the same centers on every rank."""
    x = x.float()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)

    first = int(torch.randint(n, (1,), generator=g))
    chosen = [first]
    d2 = (x - x[first]).pow(2).sum(1)  # (n,)
    for _ in range(1, min(k, n)):
        total = d2.sum()
        if total <= 0:  # every point is already a center
            break
        u = float(torch.rand((), generator=g)) * float(total)
        j = min(int(torch.searchsorted(d2.cumsum(0), torch.tensor(u, device=x.device))), n - 1)
        chosen.append(j)
        d2 = torch.minimum(d2, (x - x[j]).pow(2).sum(1))
    if len(chosen) < k:
        chosen += torch.randint(n, (k - len(chosen),), generator=g).tolist()
    centers = x[torch.tensor(chosen, device=x.device)].clone()  # (k, D)
    if spherical:
        centers = F.normalize(centers, dim=-1)
    for _ in range(iters):
        assign = torch.cat([torch.cdist(xs, centers).argmin(1) for xs in x.split(chunk)])  # (n,)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        live = counts > 0
        centers[live] = sums[live] / counts[live, None]
        if spherical:
            centers = F.normalize(centers, dim=-1)
    return centers


def fp32_island(device: torch.device) -> torch.autocast:
    """Context with autocast off; callers also cast to fp32 explicitly (bf16 parameters ignore autocast)."""
    return torch.autocast(device_type=device.type, enabled=False)


def code_histogram(indices: Tensor, size: int) -> Tensor:
    """(L, K) int64 uses of each code at each level: ``QuantizerOutput.indices`` (B, h, w) of one codebook (L = 1)
    or (B, h, w, L) of L residual levels."""
    levels = indices.reshape(-1, indices.shape[-1]) if indices.ndim == 4 else indices.reshape(-1, 1)  # (N, L)
    return torch.stack([torch.bincount(c, minlength=size) for c in levels.long().t()])


def code_stats(counts: Tensor) -> dict[str, Tensor]:
    """Codebook usage and perplexity of a code histogram, (K,) or (L, K) for L residual levels: the one definition,
    behind the quantizer's stats, the health window, validation and evaluation (``evaluation.metrics``).

    Per level, usage is the fraction of the K codes used at least once and perplexity exp(H(p)) of its code
    distribution; over levels, the mean of each. With a codebook per level the mean usage is the fraction of all
    L * K codes used; with a shared codebook it is how much of it each level uses (dead-code restarts count a shared
    code alive when any level uses it). Issue 19: the health window and validation counted level 0 only, while the
    quantizer and evaluation averaged the levels. Computed in the counts' precision, at least fp32."""
    c = counts.to(torch.promote_types(counts.dtype, torch.float32))
    c = c.reshape(-1, c.shape[-1])  # (L, K)
    p = c / c.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # (L,); 0 log 0 = 0
    return {"perplexity": entropy.exp().mean(), "usage": (c > 0).to(c.dtype).mean(-1).mean()}


class Codebook(nn.Module):
    """K codes of size D with lookup, cross-rank statistics, EMA updates, dead-code restarts and k-means init.

    ``weight`` is an ``nn.Parameter`` for gradient-learned codes and an fp32 buffer for EMA codes, so the
    state-dict key is the same either way. With ``l2_norm`` every lookup uses the l2-normalized rows.
    ``initialized`` (saved with the weights) records a finished k-means initialisation, so a resumed run does
    not initialise again.
    """

    _FP32_BUFFERS = ("weight", "cluster_size", "embed_sum", "window_counts")

    def __init__(self, size: int, dim: int, *, l2_norm: bool, ema: bool, decay: float = 0.99,
                 eps: float = 1e-5, restart: bool = False, dead_threshold: float = 1.0,
                 restart_every: int = 200, window_uses: float = 0.0):
        super().__init__()
        self.size, self.dim, self.l2_norm, self.ema = size, dim, l2_norm, ema
        self.decay, self.eps = decay, eps
        self.restart, self.dead_threshold, self.restart_every = restart, dead_threshold, restart_every
        self.window_uses = window_uses
        if l2_norm or ema:
            init = torch.randn(size, dim)
            if l2_norm:  # unit rows from the start: the data they stand for has norm 1
                init = F.normalize(init, dim=-1)
        else:  # taming / VQ-VAE ports: small uniform codes for an unnormalized gradient codebook
            init = torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size)
        if ema:
            self.register_buffer("weight", init)
            # Start at one member per cluster so that weight == embed_sum / cluster_size from the first
            # step: an unused code keeps its direction instead of being divided by a near-zero size.
            self.register_buffer("cluster_size", torch.ones(size))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.weight = nn.Parameter(init)
            self.weight._no_weight_decay = True  # read by the trainer's optimizer groups: decay would shrink codes
        if restart:
            self.register_buffer("window_counts", torch.zeros(size))  # global counts since the last check
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.all_reduce: AllReduce = no_reduce
        self.write_rows: RowWriter = write_rows_inplace
        self.rank, self.world_size, self.step = 0, 1, 0
        self._pending: list[tuple[Tensor, Optional[Tensor], Tensor]] = []  # (counts, EMA sums, vectors)
        # This rank's vectors since the last check, the newest max(size, one micro-batch) of them: per-rank state,
        # saved in the rank's checkpoint file (pool_state), so a run resumed between two checks restarts the same codes.
        self._pool: Optional[Tensor] = None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's private signature
        # DeepSpeed bf16 calls module.bfloat16(): keep the EMA statistics fp32 (a 0.99-decay average in bf16
        # drops every update smaller than 1/256 of its value); follow device moves only.
        keep = {n: b for n, b in self._buffers.items() if n in self._FP32_BUFFERS and b is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def pool_state(self) -> Optional[Tensor]:
        """This rank's restart pool (a copy on the CPU), for the rank's checkpoint file; None when empty."""
        return None if self._pool is None else self._pool.detach().to("cpu", copy=True)

    def load_pool_state(self, pool: Optional[Tensor]) -> None:
        self._pool = None if pool is None else pool.to(self.weight.device)

    def codes(self) -> Tensor:
        """(K, D) fp32 code vectors as lookups see them (l2-normalized when configured)."""
        w = self.weight.float()
        return F.normalize(w, dim=-1) if self.l2_norm else w

    @torch.no_grad()
    def nearest(self, x: Tensor, chunk: int = 4096) -> Tensor:
        """Index (N,) of the nearest code by Euclidean distance for each row of x (N, D), in fp32."""
        with fp32_island(x.device):
            c = self.codes()  # (K, D)
            c_sq = c.pow(2).sum(1)  # (K,)
            out = []
            for xs in x.detach().float().split(chunk):  # bounds the (N, K) distance matrix
                d = xs.pow(2).sum(1, keepdim=True) - 2 * xs @ c.t() + c_sq  # (n, K)
                out.append(d.argmin(1))
            return torch.cat(out)

    # -- statistics: computed in the forward, applied by commit() --------------------------------------
    @torch.no_grad()
    def observe(self, groups: Sequence[tuple[Tensor | None, Tensor]]) -> Tensor:
        """Code counts (G, K) of each (vectors (N, D) or None, indices (N,)) group.

        In training mode the counts (and, for EMA, the per-code vector sums) are summed over ranks in one
        collective, and what they would do to the EMA statistics and the restart window is kept for
        :meth:`commit`. In eval mode the counts stay local and nothing is kept.
        """
        device = groups[0][1].device
        with fp32_island(device):
            counts = torch.stack([torch.bincount(idx.reshape(-1), minlength=self.size)
                                  for _, idx in groups]).float()  # (G, K)
            if not self.training:
                return counts
            parts = [counts.reshape(-1)]
            if self.ema:
                sums = torch.zeros(self.size, self.dim, device=device)
                for x, idx in groups:
                    sums.index_add_(0, idx.reshape(-1), x.detach().float())  # (K, D)
                parts.append(sums.reshape(-1))
            packed = torch.cat(parts)
            self.all_reduce(packed)  # sum over ranks BEFORE any update: identical codebooks everywhere
            g = counts.shape[0]
            counts = packed[: g * self.size].view(g, self.size)
            ema_sums = packed[g * self.size:].view(self.size, self.dim) if self.ema else None
            vectors = groups[0][0]
            self._pending.append((counts.sum(0), ema_sums, vectors.detach() if vectors is not None else None))
        return counts

    @torch.no_grad()
    def commit(self) -> None:
        """Apply what the observed micro-batches since the last commit do to the EMA codes and the restart window
        (the trainer calls this once the losses are known to be finite on every rank)."""
        for counts, ema_sums, vectors in self._pending:
            if self.ema:
                self._ema_update(counts, ema_sums)
            if self.restart:
                self.window_counts += counts
            if vectors is not None and self.restart:
                keep = max(self.size, vectors.shape[0])
                self._pool = vectors if self._pool is None else torch.cat([self._pool, vectors])[-keep:]
        self._pending.clear()

    def discard(self) -> None:
        """Forget the observed micro-batches since the last commit (a dropped, non-finite micro-batch)."""
        self._pending.clear()

    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        """VQ-VAE appendix A.1 with Laplace smoothing of the cluster sizes (sonnet, VQ-VAE-2)."""
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)  # (K,)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)  # (K, D)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.size * self.eps) * n  # never zero
        w = self.embed_sum / smoothed[:, None]
        self.weight.copy_(F.normalize(w, dim=-1) if self.l2_norm else w)

    @torch.no_grad()
    def _set_rows(self, rows: Tensor, values: Tensor) -> None:
        """Rows of the codebook := values (identical on every rank), for EMA buffers or through ``write_rows``."""
        if self.ema:  # one member, consistent with weight == embed_sum / cluster_size
            self.weight[rows] = values
            self.cluster_size[rows] = 1.0
            self.embed_sum[rows] = values
        else:
            self.write_rows(self.weight, rows, values)

    # -- restarts: at the end of an optimizer step ------------------------------------------------------
    @torch.no_grad()
    def end_step(self, step: int) -> int:
        """At a check (every ``restart_every`` optimizer steps, once the window holds ``window_uses`` tokens per
        code), replace the dead codes by distinct vectors of the window; returns how many were replaced.
        Collective when due: every rank calls it.

        Dead = fewer than ``dead_threshold`` global uses in the window (the steps since the last check); the window
        is built from all-reduced counts, so every rank decides alike. Slot j is filled by rank ``j % world_size``
        with one of its own vectors while the other ranks contribute zeros; one summed collective then gives
        every rank the same new codes (a sum of one vector and zeros is exact).
        """
        if not (self.restart and self.training and step > 0 and step % self.restart_every == 0):
            return 0
        total = float(self.window_counts.sum())  # global tokens of the window, the same on every rank
        if total == 0 or self._pool is None:  # nothing observed since the last check
            return 0
        if total < self.window_uses * self.size:  # too short to tell dead from rare: keep the window open
            return 0
        window = self.window_counts.clone()
        self.window_counts.zero_()
        x, self._pool = self._pool, None
        dead = (window < self.dead_threshold).nonzero().squeeze(1)  # identical on every rank
        n = dead.numel()
        if n == 0:
            return 0
        mine = torch.arange(n, device=x.device) % self.world_size == self.rank  # (n,) slots this rank owns
        k = int(mine.sum())
        gen = torch.Generator().manual_seed(step * 65_537 + self.rank)  # reproducible per (step, rank)
        if k <= x.shape[0]:  # distinct vectors: identical codes would leave all but the first unused
            pos = torch.randperm(x.shape[0], generator=gen)[:k]
        else:  # fewer vectors than slots (window_uses < 1): some codes start equal
            pos = torch.randint(x.shape[0], (k,), generator=gen)
        with fp32_island(x.device):
            buf = torch.zeros(n, self.dim + 1, device=x.device)
            buf[mine, : self.dim] = x.float()[pos.to(x.device)]
            buf[mine, self.dim] = 1.0
            self.all_reduce(buf)
            if not bool((buf[:, self.dim] == 1).all()):  # same verdict on every rank: no one hangs
                raise RuntimeError(
                    "dead-code restart: each slot must be filled by exactly one rank, got owner counts "
                    f"{buf[:, self.dim].tolist()}; pass the real topology with "
                    "quantizer.set_all_reduce(fn, rank=rank, world_size=world_size)")
            self._set_rows(dead, buf[:, : self.dim])
        return n

    # -- initialisation from data, once -----------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor, iters: int, seed: int) -> None:
        """k-means codes from x (N, D): the lookup vectors of every rank, identical on every rank. Rank 0's
        result is then copied to the others (one summed collective of its codes and zeros: exact), so float
        differences between devices (atomic adds on GPUs) cannot leave the ranks with different codebooks."""
        with fp32_island(x.device):
            centers = kmeans(x, self.size, iters, seed, spherical=self.l2_norm)
            centers = centers * (1.0 if self.rank == 0 else 0.0)
            self.all_reduce(centers)
            self._set_rows(torch.arange(self.size, device=x.device), centers)
        self.initialized.fill_(True)


class UsageWindow:
    """The global code histogram of the last ``steps`` optimizer steps, behind the codebook-health metrics.

    Usage of one batch is capped at tokens per batch / codes (the demo's 1024 tokens can use at most 1024 of
    8192 codes), so a per-batch figure says little; over a window it measures the codebook. Fed with the
    all-reduced counts of the micro-batches that were used (``add``), closed at each optimizer step
    (``end_step``); plain bookkeeping whose state goes into the trainer's checkpoint. A residual quantizer's
    ``levels`` histograms are kept side by side, so each level counts (``code_stats``).
    """

    def __init__(self, size: int, steps: int, levels: int = 1):
        self.size, self.steps, self.levels = size, steps, levels
        self.hist = torch.zeros(steps, levels * size, dtype=torch.float64)  # ring of per-step counts, level-major
        self.current = torch.zeros(levels * size, dtype=torch.float64)
        self.pos, self.filled, self.restarts = 0, 0, 0

    def add(self, counts: Tensor) -> None:
        """Counts (K,) of one codebook or (L, K) of the levels (``QuantizerOutput.counts``)."""
        self.current += counts.detach().double().cpu().reshape(-1)

    def end_step(self, restarted: int = 0) -> None:
        self.hist[self.pos] = self.current
        self.pos, self.filled = (self.pos + 1) % self.steps, min(self.filled + 1, self.steps)
        self.current.zero_()
        self.restarts += int(restarted)

    def counts(self) -> Tensor:
        """(K,) uses of each code over the window; (L, K) for L levels."""
        counts = self.hist.sum(0)
        return counts if self.levels == 1 else counts.view(self.levels, self.size)

    def stats(self) -> dict[str, float]:
        """``code_stats`` over the window; dead codes are the (level, code) pairs unused in it."""
        counts = self.counts()
        s = code_stats(counts)
        return {"usage": float(s["usage"]), "perplexity": float(s["perplexity"]),
                "dead_codes": float((counts == 0).sum()), "restarts": float(self.restarts),
                "window_steps": float(self.filled)}

    def state_dict(self) -> dict:
        return {"hist": self.hist.clone(), "current": self.current.clone(), "pos": self.pos, "filled": self.filled,
                "restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["hist"].shape) != (self.steps, self.levels * self.size):
            raise ValueError(f"usage window of shape {tuple(state['hist'].shape)} in the checkpoint, this run has "
                             f"({self.steps}, {self.levels * self.size}): keep quantizer.health_window, codebook_size "
                             "and residual_depth on resume")
        self.hist, self.current = state["hist"].clone(), state["current"].clone()
        self.pos, self.filled, self.restarts = state["pos"], state["filled"], state["restarts"]
