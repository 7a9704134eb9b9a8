"""Tests for models/losses.py and models/perceptual.py against independent hand computations: the
logit-Laplace density (scipy), GAN losses on hand numbers, adaptive weight and R1 with analytic gradients,
LeCam, the Stage1Loss wiring (disc warm-up, lazy R1, totals), and LPIPS built offline from local files."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import laplace

from vitvq.configs import ConfigError, field_docs, from_dict
from vitvq.models.losses import (LossConfig, Stage1Loss, adaptive_weight, decoder_output_to_image, gan_d_loss, gan_g_loss,
                           lecam_regularization, logit_laplace_image, logit_laplace_nll, r1_penalty)
from vitvq.models.perceptual import (BACKBONE_FILES, MissingWeightsError, PerceptualLoss, WeightsChecksumError,
                               WeightsFile, head_path, load_backbone_state, verify_file)

# Tests never need the ImageNet trunk; squeeze builds in milliseconds.
CFG = LossConfig(lpips_net="squeeze", lpips_pretrained_backbone=False, disc_start=10, adaptive_weight=False)


@pytest.fixture(scope="module")
def loss_ll() -> Stage1Loss:
    with pytest.warns(UserWarning, match="RANDOM backbone"):
        return Stage1Loss(CFG, "logit_laplace")


# -- logit-Laplace --------------------------------------------------------------------------------------
def test_logit_laplace_nll_is_the_change_of_variables_density() -> None:
    torch.manual_seed(0)
    params = torch.randn(2, 6, 4, 5) * torch.tensor([2.0] * 3 + [0.7] * 3)[None, :, None, None]
    x01 = torch.rand(2, 3, 4, 5)
    x01[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # the extremes stay finite thanks to the squeeze
    got = logit_laplace_nll(params, x01).item()

    p = params.double().numpy()
    mu, b = p[:, :3], np.exp(p[:, 3:])
    xs = 0.8 * x01.double().numpy() + 0.1
    y = np.log(xs / (1 - xs))
    # p(x') = Laplace(y; mu, b) * |dy/dx'|, dy/dx' = 1 / (x'(1 - x'))
    log_p = laplace.logpdf(y, loc=mu, scale=b) - np.log(xs * (1 - xs))
    assert got == pytest.approx(-log_p.mean(), rel=1e-5)


def test_logit_laplace_nll_is_minimized_at_the_pixel() -> None:
    x01 = torch.full((1, 3, 2, 2), 0.3)
    xs = 0.8 * 0.3 + 0.1
    mu_star = math.log(xs / (1 - xs))
    vals = [logit_laplace_nll(torch.cat([torch.full((1, 3, 2, 2), mu_star + d), torch.zeros(1, 3, 2, 2)], 1), x01)
            for d in (-0.1, 0.0, 0.1)]
    assert vals[1] < vals[0] and vals[1] < vals[2]


def test_logit_laplace_image_and_decoder_output_to_image() -> None:
    mu = torch.tensor([-5.0, -1.0, 0.0, 0.5, 3.0, 8.0]).reshape(1, 1, 2, 3).repeat(1, 3, 1, 1)
    params = torch.cat([mu, torch.randn(1, 3, 2, 3)], dim=1)  # (1, 6, 2, 3)
    sig = 1 / (1 + np.exp(-mu.numpy()))
    expected01 = np.clip((sig - 0.1) / 0.8, 0, 1)
    assert np.allclose(logit_laplace_image(params).numpy(), expected01, atol=1e-6)
    assert expected01.min() == 0 and expected01.max() == 1  # both clamps exercised
    assert np.allclose(decoder_output_to_image(params, "logit_laplace").numpy(), expected01 * 2 - 1, atol=1e-6)
    # sigmoid(mu) = x' exactly inverts the squeeze
    assert logit_laplace_image(torch.cat([torch.full((1, 3, 1, 1), math.log(0.5 / 0.5)),
                                          torch.zeros(1, 3, 1, 1)], 1)).flatten()[0].item() == pytest.approx(0.5)
    pix = torch.randn(2, 3, 4, 4)
    assert torch.equal(decoder_output_to_image(pix, "pixels"), pix)
    with pytest.raises(ValueError, match="output kind"):
        decoder_output_to_image(pix, "gaussian")


# -- GAN losses -----------------------------------------------------------------------------------------
REAL, FAKE = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])


def sp(v: float) -> float:
    return math.log1p(math.exp(v))


def test_gan_losses_on_hand_numbers() -> None:
    # hinge: relu(1-2)=0, relu(1+1)=2 -> 1; relu(1.5)=1.5, relu(-2)=0 -> 0.75; averaged -> 0.875
    assert gan_d_loss("hinge", REAL, FAKE).item() == pytest.approx(0.875)
    assert gan_g_loss("hinge", FAKE).item() == pytest.approx(1.25)
    ns_d = 0.5 * ((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2)
    assert gan_d_loss("non_saturating", REAL, FAKE).item() == pytest.approx(ns_d)
    assert gan_g_loss("non_saturating", FAKE).item() == pytest.approx((sp(-0.5) + sp(3)) / 2)
    # least squares: ((1, 4) -> 2.5, (0.25, 9) -> 4.625) / 2; generator ((-0.5)^2, (-4)^2) -> 8.125
    assert gan_d_loss("least_squares", REAL, FAKE).item() == pytest.approx(3.5625)
    assert gan_g_loss("least_squares", FAKE).item() == pytest.approx(8.125)
    with pytest.raises(ValueError):
        gan_d_loss("wasserstein", REAL, FAKE)


def test_non_saturating_uses_target_one_for_real() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(7), torch.randn(5)
    bce_real = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    bce_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    assert torch.allclose(gan_d_loss("non_saturating", real, fake), 0.5 * (bce_real + bce_fake))
    assert torch.allclose(gan_g_loss("non_saturating", fake),
                          F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)))
    # A confident, correct discriminator has a small loss (the swapped form would not).
    assert gan_d_loss("non_saturating", torch.full((4,), 8.0), torch.full((4,), -8.0)).item() < 1e-3


# -- adaptive weight, R1, LeCam --------------------------------------------------------------------------
def test_adaptive_weight_is_the_ratio_of_analytic_gradient_norms() -> None:
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(2, 3))  # last layer of a linear "decoder" out = W z
    z, t, v = torch.randn(3), torch.randn(2), torch.randn(2)
    out = W @ z
    rec = 0.5 * (out - t).square().sum()  # grad_W = (Wz - t) z^T
    g = -(v * out).sum()  # grad_W = -v z^T
    zn = z.norm().item()
    expected = ((out - t).norm().item() * zn) / (v.norm().item() * zn + 1e-4)
    lam = adaptive_weight(rec, g, W, max_weight=1e4, scale=0.8)
    assert lam.item() == pytest.approx(0.8 * expected, rel=1e-5)
    assert not lam.requires_grad
    # retain_graph: both losses can still be backpropagated afterwards
    (rec + g).backward()
    # clamp at max: a generator loss with a tiny gradient
    out2 = W @ z
    lam2 = adaptive_weight(0.5 * (out2 - t).square().sum(), -(1e-9 * v * out2).sum(), W, max_weight=3.0, scale=1.0)
    assert lam2.item() == pytest.approx(3.0)


def test_r1_penalty_equals_the_analytic_gradient_norm() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (w * x.square()).flatten(1).sum(1)  # D(x) = sum(w x^2), dD/dx = 2 w x
    r1 = r1_penalty(x, logits)
    grad = 2 * w.detach() * x.detach()
    assert r1.item() == pytest.approx(grad.square().flatten(1).sum(1).mean().item(), rel=1e-5)
    r1.backward()  # create_graph: d r1 / d w = mean_b sum 8 w x^2
    assert torch.allclose(w.grad, (8 * w.detach() * x.detach().square()).mean(0), rtol=1e-5)


def test_lecam_regularization_formula() -> None:
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([1.0, -2.0])
    ema_real, ema_fake = torch.tensor(0.3), torch.tensor(-0.5)
    # relu(real - ema_fake) = (1, 2.5, 0) -> squares mean 7.25/3; relu(ema_real - fake) = (0, 2.3) -> 5.29/2
    expected = (1 + 6.25 + 0) / 3 + (0 + 2.3 ** 2) / 2
    assert lecam_regularization(real, fake, ema_real, ema_fake).item() == pytest.approx(expected)


# -- Stage1Loss ----------------------------------------------------------------------------------------
class SquareDisc(nn.Module):
    """D(x) = sum(w x^2) per image; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((3, 1, 1), 0.1))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (self.w * x.square()).flatten(1).sum(1, keepdim=True) - 1.0  # (B, 1)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    dec = torch.randn(2, 6, 32, 32, generator=g, requires_grad=True)
    return x, dec


def test_generator_loss_does_not_call_the_discriminator_before_disc_start(loss_ll: Stage1Loss) -> None:
    x, dec = batch()

    def exploding(_: torch.Tensor) -> torch.Tensor:
        raise AssertionError("discriminator called before disc_start")

    assert not loss_ll.disc_active(9) and loss_ll.disc_active(10)
    loss, m = loss_ll.generator_loss(x, dec, torch.tensor(0.5), exploding, step=9)
    assert m["g_loss"].item() == 0 and m["d_weight"].item() == 0
    assert torch.isclose(loss, m["rec_loss"] + 0.1 * m["perceptual_loss"] + 0.5)
    d = SquareDisc()
    loss_ll.generator_loss(x, dec, torch.tensor(0.5), d, step=10)
    assert d.calls == 1
    loss_ll.generator_loss(x, dec, torch.tensor(0.5), None, step=10)  # no discriminator at all: fine
    with pytest.warns(UserWarning):
        off = Stage1Loss(dataclasses.replace(CFG, adv_weight=0.0), "logit_laplace")
    assert not off.disc_active(10 ** 6)  # adversarial weight 0: never active, D never trained
    off.generator_loss(x, dec, torch.tensor(0.5), exploding, step=10 ** 6)


def test_generator_loss_total_matches_hand_computation(loss_ll: Stage1Loss) -> None:
    x, dec = batch(1)
    d = SquareDisc()
    quant = torch.tensor(0.25)
    loss, m = loss_ll.generator_loss(x, dec, quant, d, step=10)
    # independent recomputation of every term in numpy
    xn, p = x.double().numpy(), dec.detach().double().numpy()
    img = np.clip((1 / (1 + np.exp(-p[:, :3])) - 0.1) / 0.8, 0, 1) * 2 - 1
    l2 = ((img - xn) ** 2).mean()
    xs = 0.8 * (xn + 1) / 2 + 0.1
    nll = (-(laplace.logpdf(np.log(xs / (1 - xs)), loc=p[:, :3], scale=np.exp(p[:, 3:]))
             - np.log(xs * (1 - xs)))).mean()
    rec = 1.0 * l2 + 0.1 * nll
    assert m["rec_loss"].item() == pytest.approx(rec, rel=1e-5)
    assert m["l2_loss"].item() == pytest.approx(l2, rel=1e-5) and m["nll_loss"].item() == pytest.approx(nll, rel=1e-5)
    logits = (0.1 * img ** 2).reshape(2, -1).sum(1) - 1.0
    g = -logits.mean()  # hinge generator loss
    assert m["g_loss"].item() == pytest.approx(g, rel=1e-5) and m["d_weight"].item() == 1.0
    lp = loss_ll.lpips_distance(x, torch.from_numpy(img).float()).mean().item()
    assert m["perceptual_loss"].item() == pytest.approx(lp, rel=1e-4)
    expected = rec + 0.1 * lp + 1.0 * 0.25 + 0.1 * 1.0 * g
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert all(not v.requires_grad for v in m.values())
    loss.backward()
    assert dec.grad is not None and torch.isfinite(dec.grad).all()
    assert not any(p.requires_grad for p in loss_ll.perceptual.parameters())


def test_generator_loss_uses_the_adaptive_weight_when_asked() -> None:
    with pytest.warns(UserWarning, match="RANDOM backbone"):
        loss = Stage1Loss(dataclasses.replace(CFG, adaptive_weight=True, perceptual_weight=0.0,
                                              adaptive_weight_scale=0.5), "logit_laplace")
    torch.manual_seed(0)
    last = nn.Parameter(torch.randn(6, 6))  # a 1x1 "last layer" on a fixed feature map
    feats = torch.randn(2, 6, 32, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    dec = torch.einsum("oc,bchw->bohw", last, feats)
    total, m = loss.generator_loss(x, dec, torch.tensor(0.0), SquareDisc(), step=10, last_layer=last)
    # recompute the ratio by hand with separate autograd passes
    dec2 = torch.einsum("oc,bchw->bohw", last, feats)
    x_rec = logit_laplace_image(dec2) * 2 - 1
    rec = (x_rec - x).square().mean() + 0.1 * logit_laplace_nll(dec2, (x + 1) / 2)
    g = -SquareDisc()(x_rec).mean()
    gr = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last)[0].norm()
    assert m["d_weight"].item() == pytest.approx(0.5 * (gr / (gg + 1e-4)).item(), rel=1e-4)
    assert total.item() == pytest.approx((rec + 0.1 * m["d_weight"] * g).item(), rel=1e-5)
    loss.eval()  # not training: no adaptive weight
    _, m_eval = loss.generator_loss(x, dec2.detach(), torch.tensor(0.0), SquareDisc(), step=10, last_layer=last)
    assert m_eval["d_weight"].item() == 1.0


def test_discriminator_loss_lazy_r1_and_lecam() -> None:
    cfg = dataclasses.replace(CFG, r1_gamma=2.0, r1_every=4, lecam_weight=0.5, lecam_decay=0.9, gan_loss="hinge")
    with pytest.warns(UserWarning):
        loss = Stage1Loss(cfg, "logit_laplace")
    x, _ = batch(2)
    fake = torch.rand(2, 3, 32, 32) * 2 - 1
    d = SquareDisc()
    w = 0.1
    lr = (w * x ** 2).flatten(1).sum(1) - 1  # hand logits
    lf = (w * fake ** 2).flatten(1).sum(1) - 1
    hinge = 0.5 * (F.relu(1 - lr).mean() + F.relu(1 + lf).mean())
    r1_hand = (2 * w * x).square().flatten(1).sum(1).mean()

    # step 8: R1 step (8 % 4 == 0); first LeCam call initializes the EMAs to the current means
    l8, m8 = loss.discriminator_loss(x, fake, d, step=8)
    ema = torch.stack([lr.mean(), lf.mean()])
    lecam8 = F.relu(lr - ema[1]).square().mean() + F.relu(ema[0] - lf).square().mean()
    assert m8["r1"].item() == pytest.approx(r1_hand.item(), rel=1e-5)
    assert l8.item() == pytest.approx((hinge + 0.5 * 2.0 * 4 * r1_hand + 0.5 * lecam8).item(), rel=1e-5)
    assert not bool(loss.lecam_initialized)  # nothing stored until the micro-batch is known to be used
    loss.commit()
    assert torch.allclose(loss.lecam_ema, ema)
    l8.backward()
    assert d.w.grad is not None

    # step 9: no R1; EMA decays toward the new means
    fake2 = fake * 0.5
    lf2 = (w * fake2 ** 2).flatten(1).sum(1) - 1
    l9, m9 = loss.discriminator_loss(x, fake2, d, step=9)
    ema2 = 0.9 * ema + 0.1 * torch.stack([lr.mean(), lf2.mean()])
    loss.discard()  # a dropped micro-batch leaves the EMAs as they were
    assert torch.allclose(loss.lecam_ema, ema)
    l9, m9 = loss.discriminator_loss(x, fake2, d, step=9)
    loss.commit()
    assert torch.allclose(loss.lecam_ema, ema2)
    hinge2 = 0.5 * (F.relu(1 - lr).mean() + F.relu(1 + lf2).mean())
    lecam9 = F.relu(lr - ema2[1]).square().mean() + F.relu(ema2[0] - lf2).square().mean()
    assert m9["r1"].item() == 0
    assert l9.item() == pytest.approx((hinge2 + 0.5 * lecam9).item(), rel=1e-5)
    assert m9["logits_fake"].item() == pytest.approx(lf2.mean().item(), rel=1e-5)
    # the EMAs are the module's state; LPIPS is not
    sd = loss.state_dict()
    assert set(sd) == {"lecam_ema", "lecam_initialized"}
    assert list(loss.parameters()) == []
    loss.to(torch.float64)  # .to() still reaches the unregistered LPIPS
    assert next(loss.perceptual.parameters()).dtype == torch.float64


def test_pixels_output_refuses_a_logit_laplace_weight() -> None:
    with pytest.raises(ConfigError, match="logit_laplace_weight"):
        Stage1Loss(CFG, "pixels")


def test_loss_config_validation() -> None:
    with pytest.raises(ConfigError, match="perceptual_weight"):
        LossConfig(perceptual_weight=-0.1)
    with pytest.raises(ConfigError, match="loss.adv_weight"):
        from_dict(LossConfig, {"adv_weight": -1}, "loss")
    with pytest.raises(ConfigError, match="gan_loss"):
        from_dict(LossConfig, {"gan_loss": "vanilla"})
    with pytest.raises(ConfigError, match="r1_every"):
        LossConfig(r1_every=0)
    docs = field_docs(LossConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(LossConfig))


# -- LPIPS ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net", ["squeeze", "alex"])
def test_lpips_builds_offline_with_the_shipped_linear_heads(net: str) -> None:
    with pytest.warns(UserWarning, match="not LPIPS"):
        lp = PerceptualLoss(net, pretrained_backbone=False)
    shipped = torch.load(head_path(net), map_location="cpu", weights_only=True)
    own = lp.model.state_dict()
    assert len(shipped) == (7 if net == "squeeze" else 5)
    for k, v in shipped.items():
        assert torch.equal(own[k], v), k
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.training  # a metric never switches to train mode
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = lp(x, x.flip(-1))
    assert d.shape == (2,) and (d > 0).all() and torch.allclose(lp(x, x), torch.zeros(2))


def test_missing_backbone_names_file_checksum_and_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    spec = BACKBONE_FILES["vgg"]
    with pytest.raises(MissingWeightsError) as err:
        PerceptualLoss("vgg")
    msg = str(err.value)
    assert spec.filename == "vgg16-397923af.pth" and spec.filename in msg
    assert "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0" in msg and "553,433,881" in msg
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "loss.lpips_backbone_path" in msg
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "nowhere.pth")):
        PerceptualLoss("vgg", backbone_path=str(tmp_path / "nowhere.pth"))


def test_backbone_with_wrong_bytes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    bad.write_bytes(b"not squeezenet")
    with pytest.raises(WeightsChecksumError, match="4,958,839"):  # wrong size
        PerceptualLoss("squeeze", backbone_path=str(tmp_path))  # a folder holding the file works too
    # same size, other bytes: the sha256 check refuses it (found through the hub cache this time)
    hub = tmp_path / "th" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / bad.name).write_bytes(b"\0" * BACKBONE_FILES["squeeze"].size)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(WeightsChecksumError, match="b8a52dc049b60e4b6ab68ad0df457362afab8b6304b2febdc1650a5dab4d7e7b"):
        PerceptualLoss("squeeze")


@pytest.mark.parametrize("net, tv_name, last", [("squeeze", "squeezenet1_1", 12), ("alex", "alexnet", 11),
                                                 ("vgg", "vgg16", 29)])
def test_torchvision_backbone_maps_into_lpips_slices(net: str, tv_name: str, last: int, tmp_path: Path) -> None:
    import torchvision
    torch.manual_seed(0)
    tv = getattr(torchvision.models, tv_name)(weights=None).eval()
    path = tmp_path / f"{tv_name}.pth"
    torch.save(tv.state_dict(), path)
    data = path.read_bytes()
    spec = WeightsFile(path.name, hashlib.sha256(data).hexdigest(), len(data), "file://test")
    verify_file(path, spec)  # the right bytes pass
    with pytest.warns(UserWarning):
        lp = PerceptualLoss(net, pretrained_backbone=False)
    load_backbone_state(lp.model, torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(lp.model.net(x)[-1], tv.features[: last + 1](x), atol=1e-5)
    with pytest.raises(RuntimeError, match="missing"):
        load_backbone_state(lp.model, {k: v for k, v in tv.state_dict().items() if not k.startswith("features.0.")})
