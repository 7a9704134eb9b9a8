"""Quantizer math against independent hand / numpy computations (single process, CPU, < 10 s)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitvq.configs import ConfigError, field_docs, from_dict
from vitvq.models.quantizers import QuantizerConfig, build_quantizer

KINDS = {
    "vq": dict(kind="vq"),
    "vq-raw": dict(kind="vq", l2_norm=False, factorize=False, code_dim=6),
    "ema": dict(kind="ema"),
    "ema-raw": dict(kind="ema", l2_norm=False, factorize=False, code_dim=6),
    "gumbel": dict(kind="gumbel"),
    "gumbel-soft": dict(kind="gumbel", gumbel_hard=False),
    "residual": dict(kind="residual", l2_norm=False, residual_depth=3),
    "residual-ema-shared": dict(kind="residual", l2_norm=False, residual_depth=3, residual_kind="ema",
                                residual_shared_codebook=True),
}


def make(dim: int = 6, **kw):
    return build_quantizer(QuantizerConfig(**{"codebook_size": 16, "code_dim": 4, **kw}), dim)


def to_rows(z: torch.Tensor) -> np.ndarray:
    """(B, D, h, w) -> (B*h*w, D) float64, the (b h w) order the quantizers use."""
    return z.detach().double().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()


def bruteforce(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - codes[None]) ** 2).sum(-1).argmin(1)


@pytest.mark.parametrize("name", KINDS)
def test_shapes_loss_and_gradients_reach_the_encoder(name):
    torch.manual_seed(0)
    q = make(**KINDS[name]).train()
    z = torch.randn(2, 6, 3, 5, requires_grad=True)
    out = q(z)
    depth = q.cfg.residual_depth if q.cfg.kind == "residual" else None
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == ((2, 3, 5, depth) if depth else (2, 3, 5)) and out.indices.dtype == torch.long
    assert 0 <= out.indices.min() and out.indices.max() < 16
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    assert 1.0 <= out.stats["perplexity"] <= 16.0 and 0 < out.stats["usage"] <= 1
    (g_st,) = torch.autograd.grad(out.quantized.sum(), z, retain_graph=True)  # decoder -> encoder
    (g_loss,) = torch.autograd.grad(out.loss, z)  # commitment / KL -> encoder
    assert g_st.abs().sum() > 0 and g_loss.abs().sum() > 0
    if name in ("vq-raw", "ema-raw"):  # no projection: straight-through is the identity
        assert torch.equal(g_st, torch.ones_like(z))


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("training", [False, True])
def test_get_codes_reproduces_quantized_exactly(name, training):
    torch.manual_seed(1)
    q = make(**KINDS[name]).train(training)
    z = torch.randn(2, 6, 4, 3)
    before = copy.deepcopy(q)  # in training, EMA updates the codebook after the lookup
    with torch.no_grad():
        out = q(z)
        assert torch.equal(before.get_codes(out.indices), out.quantized)
        if not training:
            assert torch.equal(q.get_codes(out.indices), out.quantized)
    if not (training and name == "gumbel-soft"):  # with grad: straight-through, equal up to rounding
        out = copy.deepcopy(before)(z.requires_grad_())
        torch.testing.assert_close(before.get_codes(out.indices), out.quantized, atol=1e-5, rtol=1e-5)


def test_nearest_code_matches_numpy_bruteforce_on_normalized_projections():
    torch.manual_seed(2)
    q = make(dim=6, kind="vq", codebook_size=32, code_dim=4).eval()
    z = torch.randn(3, 6, 4, 4)
    with torch.no_grad():
        out = q(z)
    npy = {k: v.double().numpy() for k, v in q.state_dict().items()}
    w_in, b_in = npy["proj_in.weight"], npy["proj_in.bias"]
    x = to_rows(z) @ w_in.T + b_in
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = npy["codebook.weight"]
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    idx = bruteforce(x, codes)
    np.testing.assert_array_equal(out.indices.reshape(-1).numpy(), idx)
    w_out, b_out = npy["proj_out.weight"], npy["proj_out.bias"]
    expected = (codes[idx] @ w_out.T + b_out).reshape(3, 4, 4, 6).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.quantized.numpy(), expected, atol=1e-5)


def test_vq_beta_weights_the_commitment_term_gradients_by_hand():
    torch.manual_seed(3)
    beta = 0.25
    q = make(dim=3, kind="vq", codebook_size=5, code_dim=3, l2_norm=False, factorize=False, beta=beta)
    with torch.no_grad():
        q.codebook.weight.copy_(torch.randn(5, 3))
    z = torch.randn(2, 3, 2, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    x, codes = to_rows(z), q.codebook.weight.detach().double().numpy()
    idx = bruteforce(x, codes)
    qv, n = codes[idx], x.size
    assert out.loss.item() == pytest.approx((1 + beta) * ((x - qv) ** 2).sum() / n, rel=1e-5)
    # d/dz beta*||z - sg[q]||^2 / N = 2 beta (z - q) / N; d/dC ||sg[z] - q||^2 / N = 2 (q - z) / N per use
    expected_z = (2 * beta * (x - qv) / n).reshape(2, 2, 3, 3).transpose(0, 3, 1, 2)
    expected_c = np.zeros_like(codes)
    np.add.at(expected_c, idx, 2 * (qv - x) / n)
    np.testing.assert_allclose(z.grad.numpy(), expected_z, atol=1e-7)
    np.testing.assert_allclose(q.codebook.weight.grad.numpy(), expected_c, atol=1e-7)


def test_one_ema_update_equals_hand_computation():
    q = make(dim=2, kind="ema", codebook_size=2, code_dim=2, l2_norm=False, factorize=False,
             ema_decay=0.5, ema_eps=0.1, beta=0.25)
    cb = q.codebook
    cb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    cb.embed_sum.copy_(cb.weight)
    cb.cluster_size.fill_(1.0)
    rows = torch.tensor([[2.0, 0.0], [0.8, 0.2], [1.0, -0.5], [0.0, 3.0]])  # codes 0, 0, 0, 1
    z = rows.T.reshape(1, 2, 2, 2)
    out = q.train()(z)
    q.commit()
    assert out.indices.reshape(-1).tolist() == [0, 0, 0, 1]
    # The lookup used the codebook before the update.
    old = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(out.quantized, old.T.reshape(1, 2, 2, 2))
    assert out.loss.item() == pytest.approx(0.25 * ((rows - old) ** 2).mean().item())
    # cluster sizes 0.5*[1,1] + 0.5*[3,1]; sums 0.5*I + 0.5*[[3.8,-0.3],[0,3]]; n = 3, K = 2, eps = 0.1.
    assert cb.cluster_size.tolist() == [2.0, 1.0]
    torch.testing.assert_close(cb.embed_sum, torch.tensor([[2.4, -0.15], [0.0, 2.0]]))
    smoothed = [2.1 / 3.2 * 3, 1.1 / 3.2 * 3]  # (N_k + eps) / (n + K eps) * n = 1.96875, 1.03125
    expected = torch.tensor([[2.4 / smoothed[0], -0.15 / smoothed[0]], [0.0, 2.0 / smoothed[1]]])
    torch.testing.assert_close(cb.weight, expected)
    frozen = {k: v.clone() for k, v in cb.state_dict().items()}
    q.eval()(z)  # eval mode never updates
    assert all(torch.equal(frozen[k], v) for k, v in cb.state_dict().items())


def test_ema_update_with_l2_norm_renormalizes_from_normalized_inputs():
    torch.manual_seed(4)
    q = make(dim=3, kind="ema", codebook_size=4, code_dim=3, factorize=False, ema_decay=0.9, ema_eps=1e-3)
    cb = q.codebook
    w0, s0, n0 = cb.weight.double().numpy(), cb.embed_sum.double().numpy(), cb.cluster_size.double().numpy()
    z = torch.randn(2, 3, 3, 3)
    q.train()(z)
    q.commit()
    x = to_rows(z)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = w0 / np.linalg.norm(w0, axis=1, keepdims=True)
    idx = bruteforce(x, c)
    counts, sums = np.bincount(idx, minlength=4), np.zeros((4, 3))
    np.add.at(sums, idx, x)
    size, esum = 0.9 * n0 + 0.1 * counts, 0.9 * s0 + 0.1 * sums
    smoothed = (size + 1e-3) / (size.sum() + 4e-3) * size.sum()
    new = esum / smoothed[:, None]
    np.testing.assert_allclose(cb.weight.numpy(), new / np.linalg.norm(new, axis=1, keepdims=True), atol=1e-6)


def test_perplexity_and_usage_equal_hand_values():
    q = make(dim=4, kind="vq", codebook_size=4, code_dim=4, l2_norm=False, factorize=False).train()
    with torch.no_grad():
        q.codebook.weight.copy_(torch.eye(4))
    rows = torch.tensor([[0.9, 0, 0, 0], [1.1, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.8, 0]])  # counts [2, 1, 1, 0]
    out = q(rows.T.reshape(1, 4, 2, 2))
    # p = [1/2, 1/4, 1/4, 0]: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2, perplexity 2^1.5; 3 of 4 codes used.
    assert out.stats["perplexity"].item() == pytest.approx(2 ** 1.5, rel=1e-6)
    assert out.stats["usage"].item() == 0.75


def test_bf16_module_picks_codes_in_fp32():
    # Codes a = 1 + 2^-7 and b = 1 - 2^-8 (both exact in bf16) around x = 1: |x-a|^2 = 2^-14 > |x-b|^2 = 2^-16.
    # The expanded distance |x|^2 - 2x.c + |c|^2 evaluated in bf16 rounds both to 0 and picks a.
    codes = torch.tensor([[1 + 2 ** -7, 0.0], [1 - 2 ** -8, 0.0], [0.0, 1.0]])
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    xb, cb = rows.bfloat16(), codes.bfloat16()
    naive = ((xb * xb).sum(1, keepdim=True) - 2 * xb @ cb.T + (cb * cb).sum(1)).argmin(1)
    assert naive.tolist() == [0, 2]  # the failure the fp32 cast prevents
    for kind in ("vq", "ema"):
        q32 = make(dim=2, kind=kind, codebook_size=3, code_dim=2, l2_norm=False, factorize=False).eval()
        q32.codebook.weight.data.copy_(codes)
        q16 = copy.deepcopy(q32).to(torch.bfloat16)
        z = rows.T.reshape(1, 2, 1, 2)
        with torch.no_grad():
            o32, o16 = q32(z), q16(z.bfloat16())
        assert o32.indices.reshape(-1).tolist() == [1, 2] and torch.equal(o16.indices, o32.indices)
        assert o16.quantized.dtype == torch.bfloat16 and o16.loss.dtype == torch.float32
        if kind == "ema":  # EMA statistics stay fp32 under module.to(bf16)
            assert all(b.dtype == torch.float32 for n, b in q16.codebook.named_buffers() if b.is_floating_point())
    # Random l2-normalized case: bf16 module == fp32 module on the same bf16-representable values.
    torch.manual_seed(5)
    q32 = make(dim=8, kind="vq", codebook_size=64, code_dim=8, factorize=False).eval()
    q32.codebook.weight.data = q32.codebook.weight.data.bfloat16().float()
    q16 = copy.deepcopy(q32).to(torch.bfloat16)
    z = torch.randn(4, 8, 6, 6).bfloat16()
    with torch.no_grad():
        assert torch.equal(q16(z).indices, q32(z.float()).indices)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_autocast_does_not_reach_the_lookup(device):
    torch.manual_seed(9)
    q = make(dim=8, kind="vq", codebook_size=256, code_dim=8, factorize=False).to(device).eval()
    z = torch.randn(8, 8, 8, 8, device=device)
    with torch.no_grad():
        ref = q(z)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = q(z)
    assert torch.equal(out.indices, ref.indices)
    assert out.stats["perplexity"].dtype == torch.float32


def test_gumbel_temperature_schedule_kl_and_eval_argmax():
    q = make(dim=3, kind="gumbel", codebook_size=5, code_dim=3, factorize=False, gumbel_temp_start=1.0,
             gumbel_temp_end=0.0625, gumbel_anneal_steps=100, gumbel_kl_weight=0.5)
    for step, tau in [(0, 1.0), (50, 0.25), (100, 0.0625), (1000, 0.0625), (25, 0.5)]:
        q.set_step(step)
        assert q.temperature == pytest.approx(tau)
    torch.manual_seed(6)
    z = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        out = q.eval()(z)
    npy = {k: v.double().numpy() for k, v in q.state_dict().items()}
    logits = to_rows(z) @ npy["to_logits.weight"].T + npy["to_logits.bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = (p * np.log(p * 5)).sum(1).mean()  # KL(q || uniform over 5 codes)
    assert out.loss.item() == pytest.approx(0.5 * kl, rel=1e-5)
    np.testing.assert_array_equal(out.indices.reshape(-1).numpy(), logits.argmax(1))


@pytest.mark.parametrize("tau", [1e-4, 1e4])
def test_gumbel_soft_sample_follows_the_temperature(tau):
    q = make(dim=3, kind="gumbel", codebook_size=5, code_dim=3, factorize=False, l2_norm=False,
             gumbel_hard=False, gumbel_temp_start=tau, gumbel_temp_end=tau).train()
    torch.manual_seed(7)
    out = q(torch.randn(2, 3, 2, 2, requires_grad=True))
    codes = q.codebook.weight.detach()
    # tau -> 0: the relaxed sample is one-hot at the sampled code; tau -> inf: uniform mixture of all codes.
    expected = q.get_codes(out.indices).detach() if tau < 1 else codes.mean(0)[None, :, None, None].expand(2, 3, 2, 2)
    torch.testing.assert_close(out.quantized.detach(), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_residual_level_two_quantizes_the_residual_of_level_one(shared):
    torch.manual_seed(8)
    beta = 0.25
    q = make(dim=3, kind="residual", codebook_size=6, code_dim=3, l2_norm=False, factorize=False, beta=beta,
             residual_depth=2, residual_shared_codebook=shared).train()
    with torch.no_grad():
        q.levels[0].weight.copy_(torch.randn(6, 3))
        if not shared:
            q.levels[1].weight.copy_(0.3 * torch.randn(6, 3))
    c0 = q.levels[0].weight.detach().double().numpy()
    c1 = c0 if shared else q.levels[1].weight.detach().double().numpy()
    z = torch.randn(2, 3, 3, 3, requires_grad=True)
    out = q(z)
    x = to_rows(z)
    i0 = bruteforce(x, c0)
    r1 = x - c0[i0]
    i1 = bruteforce(r1, c1)
    np.testing.assert_array_equal(out.indices.reshape(-1, 2).numpy(), np.stack([i0, i1], 1))
    expected_q = (c0[i0] + c1[i1]).reshape(2, 3, 3, 3).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.quantized.detach().numpy(), expected_q, atol=1e-6)
    mse0, mse1 = ((x - c0[i0]) ** 2).mean(), ((r1 - c1[i1]) ** 2).mean()
    assert out.loss.item() == pytest.approx((1 + beta) * (mse0 + mse1) / 2, rel=1e-5)
    for i, idx in enumerate((i0, i1)):  # per-level stats from the level's own histogram
        p = np.bincount(idx, minlength=6) / idx.size
        assert out.stats[f"usage_level{i}"].item() == pytest.approx((p > 0).mean())
        ent = -(p[p > 0] * np.log(p[p > 0])).sum()
        assert out.stats[f"perplexity_level{i}"].item() == pytest.approx(math.exp(ent), rel=1e-5)
    # Encoder gradient of the commitment terms: sum_i 2 beta (r_i - q_i) / (N * depth), nothing detached.
    (g,) = torch.autograd.grad(out.loss, z)
    expected_g = 2 * beta * ((x - c0[i0]) + (r1 - c1[i1])) / (x.size * 2)
    np.testing.assert_allclose(g.numpy(), expected_g.reshape(2, 3, 3, 3).transpose(0, 3, 1, 2), atol=1e-7)


def test_dead_code_restart_replaces_exactly_the_dead_codes_with_batch_vectors():
    q = make(dim=4, kind="vq", codebook_size=8, code_dim=4, l2_norm=False, factorize=False,
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
    x2 = torch.from_numpy(to_rows(z2)).float()
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


def test_a_restart_window_stays_open_until_it_holds_enough_tokens_per_code():
    """8 codes, restart_window_uses 2: a check needs 16 tokens in its window. 12 tokens (one micro-batch) keep it
    open, counts and vectors kept; 24 close it. A code used once in 24 tokens is then dead (threshold 2)."""
    q = make(dim=4, kind="vq", codebook_size=8, code_dim=4, l2_norm=False, factorize=False, restart_dead_codes=True,
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


def test_restarts_take_distinct_vectors_from_the_whole_window():
    """7 dead codes, micro-batches of 4 vectors: the last micro-batch alone would give at least 3 duplicates (the
    nearest-code search only ever picks the first of equal codes); the newest 8 of the window's 12 vectors give 7
    distinct ones."""
    q = make(dim=4, kind="vq", codebook_size=8, code_dim=4, l2_norm=False, factorize=False, restart_dead_codes=True,
             restart_every=3, restart_window_uses=1.0).train()
    with torch.no_grad():
        q.codebook.weight.copy_(torch.cat([torch.zeros(1, 4), 100 + torch.randn(7, 4)]))  # only code 0 near the data
    window = []
    for step in (1, 2, 3):
        z = 0.1 * torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(step))
        window.append(torch.from_numpy(to_rows(z)).float())
        q.set_step(step)
        q(z)
        q.commit()
        assert q.end_step(step) == (7 if step == 3 else 0)
    w = q.codebook.weight.detach()
    rows = torch.cat(window)  # (12, 4)
    assert all(any(torch.equal(w[k], r) for r in rows) for k in range(1, 8))
    assert len({tuple(w[k].tolist()) for k in range(1, 8)}) == 7, "restarted codes are not distinct"
    assert q.codebook._pool is None  # the next window draws from its own vectors


def test_a_discarded_micro_batch_changes_no_statistics():
    """EMA codes, cluster sizes and the restart window change only on commit (issue: a NaN micro-batch)."""
    q = make(dim=4, kind="ema", codebook_size=8, code_dim=4, restart_dead_codes=True, restart_every=1).train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.set_step(1)
    q(torch.randn(2, 4, 3, 3))
    q.discard()
    assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
    assert q.end_step(1) == 0  # nothing committed: no restart either
    q(torch.randn(2, 4, 3, 3))
    q.commit()
    assert not torch.equal(q.codebook.embed_sum, before["codebook.embed_sum"])


def test_restart_with_wrong_topology_fails_loudly():
    q = make(dim=4, kind="ema", codebook_size=8, code_dim=4, restart_dead_codes=True, restart_every=1,
             dead_threshold=1e9, restart_window_uses=0.0).train()
    q.set_all_reduce(lambda t: t.mul_(2))  # two ranks that both claim rank 0 of world size 1
    q.set_step(1)
    q(torch.randn(1, 4, 2, 2))
    q.commit()
    with pytest.raises(RuntimeError, match="world_size"):
        q.end_step(1)


def test_config_validation_and_docs():
    with pytest.raises(ConfigError, match="l2_norm"):
        QuantizerConfig(kind="residual")
    with pytest.raises(ConfigError, match="restart_dead_codes"):
        QuantizerConfig(kind="gumbel", restart_dead_codes=True)
    with pytest.raises(ConfigError, match="code_dim"):
        make(dim=6, factorize=False, code_dim=4)
    with pytest.raises(ConfigError, match="ema_decay"):
        from_dict(QuantizerConfig, {"kind": "ema", "ema_decay": 1.0})
    cfg = from_dict(QuantizerConfig, {"kind": "residual", "l2_norm": False, "residual_depth": 2})
    assert cfg.residual_depth == 2 and cfg.codebook_size == 8192
    assert set(field_docs(QuantizerConfig)) == {f.name for f in dataclasses.fields(QuantizerConfig)}


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("factorize", [True, False])
def test_deepspeed_style_bf16_params_with_fp32_buffers(name, factorize):
    """DeepSpeed bf16 casts parameters only; buffers (EMA statistics, dtype markers) stay fp32. The quantized
    output must then follow the parameters, or the next bf16 layer meets an fp32 input."""
    from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
    cfg = dataclasses.replace(TokenizerConfig.PRESETS["debug"],
                              quantizer=from_dict(QuantizerConfig, {**KINDS[name], "factorize": factorize,
                                                                    "code_dim": 8 if factorize else 64}))
    tok = Tokenizer(cfg)
    for p in tok.parameters():
        p.data = p.data.bfloat16()
    x = torch.rand(2, 3, 32, 32).bfloat16() * 2 - 1
    dec_out, q = tok(x)  # raised "mat1 and mat2 must have the same dtype" before the fix
    assert dec_out.dtype == torch.bfloat16
    assert tok.decode_codes(q.indices).dtype == torch.bfloat16


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


def test_kmeans_init_puts_one_code_on_each_cluster():
    """Well-separated clusters: k-means++ plus Lloyd lands one code per cluster centre, and every code is used."""
    from vitvq.models.codebook import code_stats
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    x = F.normalize(centres[torch.arange(800) % 8] + 0.02 * torch.randn(800, 16, generator=g), dim=-1)
    q = make(dim=16, kind="vq", codebook_size=8, code_dim=16, factorize=False, l2_norm=True, init="kmeans").train()
    assert q.needs_init
    q.init_codebooks(x, seed=1)
    assert not q.needs_init
    codes = q.codebook.codes()
    dist = torch.cdist(centres, codes)  # (8 centres, 8 codes)
    assert sorted(dist.argmin(1).tolist()) == list(range(8)) and dist.min(1).values.max() < 0.05
    assert code_stats(torch.bincount(q.codebook.nearest(x), minlength=8))["usage"] == 1.0
