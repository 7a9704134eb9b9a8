"""Quantizer math against independent hand / numpy computations (single process, CPU): the nearest code, the VQ
commitment term and its gradients, one EMA update, the Gumbel temperature schedule and KL, residual levels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


def bruteforce(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return ((x[:, None, :] - codes[None]) ** 2).sum(-1).argmin(1)



def test_nearest_code_matches_numpy_bruteforce_on_normalized_projections(quant):
    torch.manual_seed(2)
    q = quant.make(dim=6, kind="vq", codebook_size=32, code_dim=4).eval()
    z = torch.randn(3, 6, 4, 4)
    with torch.no_grad():
        out = q(z)
    npy = {k: v.double().numpy() for k, v in q.state_dict().items()}
    w_in, b_in = npy["proj_in.weight"], npy["proj_in.bias"]
    x = quant.to_rows(z) @ w_in.T + b_in
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = npy["codebook.weight"]
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    idx = bruteforce(x, codes)
    np.testing.assert_array_equal(out.indices.reshape(-1).numpy(), idx)
    w_out, b_out = npy["proj_out.weight"], npy["proj_out.bias"]
    expected = (codes[idx] @ w_out.T + b_out).reshape(3, 4, 4, 6).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.quantized.numpy(), expected, atol=1e-5)


def test_vq_beta_weights_the_commitment_term_gradients_by_hand(quant):
    torch.manual_seed(3)
    beta = 0.25
    q = quant.make(dim=3, kind="vq", codebook_size=5, code_dim=3, l2_norm=False, factorize=False, beta=beta)
    with torch.no_grad():
        q.codebook.weight.copy_(torch.randn(5, 3))
    z = torch.randn(2, 3, 2, 3, requires_grad=True)
    out = q(z)
    out.loss.backward()
    x, codes = quant.to_rows(z), q.codebook.weight.detach().double().numpy()
    idx = bruteforce(x, codes)
    qv, n = codes[idx], x.size
    assert out.loss.item() == pytest.approx((1 + beta) * ((x - qv) ** 2).sum() / n, rel=1e-5)
    # d/dz beta*||z - sg[q]||^2 / N = 2 beta (z - q) / N; d/dC ||sg[z] - q||^2 / N = 2 (q - z) / N per use
    expected_z = (2 * beta * (x - qv) / n).reshape(2, 2, 3, 3).transpose(0, 3, 1, 2)
    expected_c = np.zeros_like(codes)
    np.add.at(expected_c, idx, 2 * (qv - x) / n)
    np.testing.assert_allclose(z.grad.numpy(), expected_z, atol=1e-7)
    np.testing.assert_allclose(q.codebook.weight.grad.numpy(), expected_c, atol=1e-7)


def test_one_ema_update_equals_hand_computation(quant):
    q = quant.make(dim=2, kind="ema", codebook_size=2, code_dim=2, l2_norm=False, factorize=False,
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


def test_ema_update_with_l2_norm_renormalizes_from_normalized_inputs(quant):
    torch.manual_seed(4)
    q = quant.make(dim=3, kind="ema", codebook_size=4, code_dim=3, factorize=False, ema_decay=0.9, ema_eps=1e-3)
    cb = q.codebook
    w0, s0, n0 = cb.weight.double().numpy(), cb.embed_sum.double().numpy(), cb.cluster_size.double().numpy()
    z = torch.randn(2, 3, 3, 3)
    q.train()(z)
    q.commit()
    x = quant.to_rows(z)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = w0 / np.linalg.norm(w0, axis=1, keepdims=True)
    idx = bruteforce(x, c)
    counts, sums = np.bincount(idx, minlength=4), np.zeros((4, 3))
    np.add.at(sums, idx, x)
    size, esum = 0.9 * n0 + 0.1 * counts, 0.9 * s0 + 0.1 * sums
    smoothed = (size + 1e-3) / (size.sum() + 4e-3) * size.sum()
    new = esum / smoothed[:, None]
    np.testing.assert_allclose(cb.weight.numpy(), new / np.linalg.norm(new, axis=1, keepdims=True), atol=1e-6)



def test_gumbel_temperature_schedule_kl_and_eval_argmax(quant):
    q = quant.make(dim=3, kind="gumbel", codebook_size=5, code_dim=3, factorize=False, gumbel_temp_start=1.0,
             gumbel_temp_end=0.0625, gumbel_anneal_steps=100, gumbel_kl_weight=0.5)
    for step, tau in [(0, 1.0), (50, 0.25), (100, 0.0625), (1000, 0.0625), (25, 0.5)]:
        q.set_step(step)
        assert q.temperature == pytest.approx(tau)
    torch.manual_seed(6)
    z = torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        out = q.eval()(z)
    npy = {k: v.double().numpy() for k, v in q.state_dict().items()}
    logits = quant.to_rows(z) @ npy["to_logits.weight"].T + npy["to_logits.bias"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kl = (p * np.log(p * 5)).sum(1).mean()  # KL(q || uniform over 5 codes)
    assert out.loss.item() == pytest.approx(0.5 * kl, rel=1e-5)
    np.testing.assert_array_equal(out.indices.reshape(-1).numpy(), logits.argmax(1))


@pytest.mark.parametrize("tau", [1e-4, 1e4])
def test_gumbel_soft_sample_follows_the_temperature(tau, quant):
    q = quant.make(dim=3, kind="gumbel", codebook_size=5, code_dim=3, factorize=False, l2_norm=False,
             gumbel_hard=False, gumbel_temp_start=tau, gumbel_temp_end=tau).train()
    torch.manual_seed(7)
    out = q(torch.randn(2, 3, 2, 2, requires_grad=True))
    codes = q.codebook.weight.detach()
    # tau -> 0: the relaxed sample is one-hot at the sampled code; tau -> inf: uniform mixture of all codes.
    expected = q.get_codes(out.indices).detach() if tau < 1 else codes.mean(0)[None, :, None, None].expand(2, 3, 2, 2)
    torch.testing.assert_close(out.quantized.detach(), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("shared", [False, True])
def test_residual_level_two_quantizes_the_residual_of_level_one(shared, quant):
    torch.manual_seed(8)
    beta = 0.25
    q = quant.make(dim=3, kind="residual", codebook_size=6, code_dim=3, l2_norm=False, factorize=False, beta=beta,
             residual_depth=2, residual_shared_codebook=shared).train()
    with torch.no_grad():
        q.levels[0].weight.copy_(torch.randn(6, 3))
        if not shared:
            q.levels[1].weight.copy_(0.3 * torch.randn(6, 3))
    c0 = q.levels[0].weight.detach().double().numpy()
    c1 = c0 if shared else q.levels[1].weight.detach().double().numpy()
    z = torch.randn(2, 3, 3, 3, requires_grad=True)
    out = q(z)
    x = quant.to_rows(z)
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
