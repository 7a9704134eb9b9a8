"""Codebook bookkeeping (models/codebook.py) through a quantizer, against hand counts: perplexity and usage,
dead-code restarts and their token windows, commit / discard of a micro-batch, the usage window behind the health
metrics, and k-means initialization (single process, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def test_perplexity_and_usage_equal_hand_values(quant):
    q = quant.make(dim=4, kind="vq", codebook_size=4, code_dim=4, l2_norm=False, factorize=False).train()
    with torch.no_grad():
        q.codebook.weight.copy_(torch.eye(4))
    rows = torch.tensor([[0.9, 0, 0, 0], [1.1, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.8, 0]])  # counts [2, 1, 1, 0]
    out = q(rows.T.reshape(1, 4, 2, 2))
    # p = [1/2, 1/4, 1/4, 0]: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2, perplexity 2^1.5; 3 of 4 codes used.
    assert out.stats["perplexity"].item() == pytest.approx(2 ** 1.5, rel=1e-6)
    assert out.stats["usage"].item() == 0.75


def test_dead_code_restart_replaces_exactly_the_dead_codes_with_batch_vectors(quant):
    q = quant.make(dim=4, kind="vq", codebook_size=8, code_dim=4, l2_norm=False, factorize=False,
             restart_dead_codes=True, restart_every=2, dead_threshold=1.0, restart_window_uses=0.0).train()
    init = torch.cat([torch.eye(4), 50 + torch.arange(16.0).reshape(4, 4)])  # codes 4..7 far from the data
    with torch.no_grad():
        q.codebook.weight.copy_(init)

    def batch(seed: int) -> torch.Tensor:  # 12 vectors near e0, e1, e2: codes 3..7 stay unused
        g = torch.Generator().manual_seed(seed)
        rows = torch.eye(4)[torch.arange(12) % 3] + 0.01 * torch.randn(12, 4, generator=g)
        return rows.T.reshape(1, 4, 3, 4)

    def step(n: int, *seeds: int) -> int:  # one optimizer step of len(seeds) micro-batches
        q.set_step(n)
        for seed in seeds:
            q(batch(seed))
            q.commit()
        return q.end_step(n)

    assert step(1, 0) == 0 and torch.equal(q.codebook.weight, init)  # not a restart step
    q.set_step(2)
    q(batch(1))
    q.commit()
    z2 = batch(2)
    q(z2)  # second micro-batch of step 2 (gradient accumulation): its vectors fill the dead codes
    q.commit()
    assert q.end_step(2) == 5  # codes 3..7
    w = q.codebook.weight.detach()
    assert torch.equal(w[:3], init[:3])  # live codes untouched
    x2 = torch.from_numpy(quant.to_rows(z2)).float()
    for k in range(3, 8):  # each dead code is now one of the last micro-batch's vectors
        assert any(torch.equal(w[k], row) for row in x2), k
    assert q.codebook.window_counts.sum() == 0  # a new window starts after each check
    assert q(batch(3)).indices.max() >= 3  # the new codes serve the next batch
    q.discard()
    snapshot = w.clone()
    assert step(3, 3) == 0
    q.eval()
    q.set_step(4)
    q(batch(4))
    assert q.end_step(4) == 0  # eval mode never restarts
    assert torch.equal(q.codebook.weight, snapshot)


def test_a_restart_window_stays_open_until_it_holds_enough_tokens_per_code(quant):
    """8 codes, restart_window_uses 2: a check needs 16 tokens in its window. 12 tokens (one micro-batch) keep it
    open, counts and vectors kept; 24 close it. A code used once in 24 tokens is then dead (threshold 2)."""
    q = quant.make(dim=4, kind="vq", codebook_size=8, code_dim=4, l2_norm=False, factorize=False, restart_dead_codes=True,
             restart_every=1, dead_threshold=2.0, restart_window_uses=2.0).train()
    with torch.no_grad():
        q.codebook.weight.copy_(torch.cat([torch.eye(4), -torch.eye(4)]))  # code k+4 = -e_k

    def batch(seed: int) -> torch.Tensor:  # 12 vectors: 5 near e0, 5 near e1, 1 near e2, 1 near -e0
        g = torch.Generator().manual_seed(seed)
        rows = torch.cat([torch.eye(4)[[0] * 5 + [1] * 5 + [2]], -torch.eye(4)[:1]])
        rows = rows + 0.01 * torch.randn(12, 4, generator=g)
        return rows.T.reshape(1, 4, 3, 4)

    q.set_step(1)
    q(batch(0))
    q.commit()
    assert q.end_step(1) == 0  # 12 < 2 x 8 tokens: no check yet
    assert q.codebook.window_counts.tolist() == [5, 5, 1, 0, 1, 0, 0, 0]  # the window goes on
    q.set_step(2)
    q(batch(1))
    q.commit()
    assert q.end_step(2) == 4  # 24 tokens: codes 3, 5, 6, 7 (unused) restart; codes 2 and 4 were used twice
    assert q.codebook.window_counts.sum() == 0


def test_restarts_take_distinct_vectors_from_the_whole_window(quant):
    """7 dead codes, micro-batches of 4 vectors: the last micro-batch alone would give at least 3 duplicates (the
    nearest-code search only ever picks the first of equal codes); the newest 8 of the window's 12 vectors give 7
    distinct ones."""
    q = quant.make(dim=4, kind="vq", codebook_size=8, code_dim=4, l2_norm=False, factorize=False, restart_dead_codes=True,
             restart_every=3, restart_window_uses=1.0).train()
    with torch.no_grad():
        q.codebook.weight.copy_(torch.cat([torch.zeros(1, 4), 100 + torch.randn(7, 4)]))  # only code 0 near the data
    window = []
    for step in (1, 2, 3):
        z = 0.1 * torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(step))
        window.append(torch.from_numpy(quant.to_rows(z)).float())
        q.set_step(step)
        q(z)
        q.commit()
        assert q.end_step(step) == (7 if step == 3 else 0)
    w = q.codebook.weight.detach()
    rows = torch.cat(window)  # (12, 4)
    assert all(any(torch.equal(w[k], r) for r in rows) for k in range(1, 8))
    assert len({tuple(w[k].tolist()) for k in range(1, 8)}) == 7, "restarted codes are not distinct"
    assert q.codebook._pool is None  # the next window draws from its own vectors


def test_a_discarded_micro_batch_changes_no_statistics(quant):
    """EMA codes, cluster sizes and the restart window change only on commit (issue: a NaN micro-batch)."""
    q = quant.make(dim=4, kind="ema", codebook_size=8, code_dim=4, restart_dead_codes=True, restart_every=1).train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.set_step(1)
    q(torch.randn(2, 4, 3, 3))
    q.discard()
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
    assert q.end_step(1) == 0  # nothing committed: no restart either
    q(torch.randn(2, 4, 3, 3))
    q.commit()
    assert not torch.equal(q.codebook.embed_sum, before["codebook.embed_sum"])


def test_restart_with_wrong_topology_fails_loudly(quant):
    q = quant.make(dim=4, kind="ema", codebook_size=8, code_dim=4, restart_dead_codes=True, restart_every=1,
             dead_threshold=1e9, restart_window_uses=0.0).train()
    q.set_all_reduce(lambda t: t.mul_(2))  # two ranks that both claim rank 0 of world size 1
    q.set_step(1)
    q(torch.randn(1, 4, 2, 2))
    q.commit()
    with pytest.raises(RuntimeError, match="world_size"):
        q.end_step(1)



def test_usage_window_matches_a_hand_count():
    from vitvq.models.codebook import UsageWindow
    w = UsageWindow(size=6, steps=3)
    steps = [[0, 0, 1], [2], [2, 3, 3], [4], [4, 4]]  # codes used by each optimizer step (one micro-batch each)
    for i, codes in enumerate(steps):
        w.add(torch.bincount(torch.tensor(codes), minlength=6).float())
        w.end_step(restarted=1 if i == 1 else 0)
    # The window holds the last 3 steps: codes 2, 3, 3, 4, 4, 4 -> counts [0, 0, 1, 2, 3, 0].
    s = w.stats()
    p = np.array([1, 2, 3]) / 6
    assert s["usage"] == pytest.approx(3 / 6) and s["dead_codes"] == 3 and s["window_steps"] == 3
    assert s["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert s["restarts"] == 1
    restored = UsageWindow(size=6, steps=3)
    restored.load_state_dict(w.state_dict())
    assert restored.stats() == s
    with pytest.raises(ValueError, match="health_window"):
        UsageWindow(size=6, steps=4).load_state_dict(w.state_dict())


def test_kmeans_init_puts_one_code_on_each_cluster(quant):
    """Well-separated clusters: k-means++ plus Lloyd lands one code per cluster centre, and every code is used."""
    from vitvq.models.codebook import code_stats
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    x = F.normalize(centres[torch.arange(800) % 8] + 0.02 * torch.randn(800, 16, generator=g), dim=-1)
    q = quant.make(dim=16, kind="vq", codebook_size=8, code_dim=16, factorize=False, l2_norm=True, init="kmeans").train()
    assert q.needs_init
    q.init_codebooks(x, seed=1)
    assert not q.needs_init
    codes = q.codebook.codes()
    dist = torch.cdist(centres, codes)  # (8 centres, 8 codes)
    assert sorted(dist.argmin(1).tolist()) == list(range(8)) and dist.min(1).values.max() < 0.05
    assert code_stats(torch.bincount(q.codebook.nearest(x), minlength=8))["usage"] == 1.0
