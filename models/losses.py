"""Stage-1 losses: reconstruction (L2, L1, logit-Laplace), LPIPS, GAN losses and their regularizers.

ViT-VQGAN (2110.04627, section 3.3) trains the tokenizer with
``L = L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-laplace + 1.0 L_2``. :class:`Stage1Loss` computes
that sum for the generator step and the discriminator loss for the discriminator step, with the options of
the reference implementations: taming's adaptive adversarial weight and discriminator warm-up, lazy R1
(StyleGAN2 section 4 / appendix B), LeCam regularization (Tseng et al., 2104.03310).

The logit-Laplace likelihood follows DALL-E (2102.12092, section A.3): the decoder predicts per pixel and
channel a location mu and a log-scale ln b of a Laplace in logit space over squeezed pixels. Public PyTorch
ports call plain L1 "loglaplace"; this is the density itself (the tests check it against scipy).

Everything here is computed in fp32 whatever the module dtypes (DeepSpeed bf16 casts the models, not us).
The trainer runs the discriminator itself and passes it in as a callable, frozen for the generator step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitvq.configs import check
from vitvq.models.logit_laplace import LOGIT_LAPLACE_EPS, decoder_output_to_image, logit_laplace_image, logit_laplace_nll
from vitvq.models.perceptual import PerceptualLoss

OutputKind = Literal["pixels", "logit_laplace"]
GanLoss = Literal["hinge", "non_saturating", "least_squares"]


@dataclass
class LossConfig:
    l2_weight: float = 1.0
    """Weight of the mean squared error on images in [-1, 1] (ViT-VQGAN: 1.0)."""
    l1_weight: float = 0.0
    """Weight of the mean absolute error on images in [-1, 1] (taming's reconstruction term)."""
    logit_laplace_weight: float = 0.1
    """Weight of the logit-Laplace NLL (ViT-VQGAN: 0.1); needs model.output=logit_laplace, else set 0."""
    perceptual_weight: float = 0.1
    """Weight of LPIPS (ViT-VQGAN: 0.1, taming: 1.0)."""
    quant_weight: float = 1.0
    """Weight of the quantizer's loss (codebook + commitment, or the Gumbel KL)."""
    adv_weight: float = 0.1
    """Weight of the generator's adversarial loss (ViT-VQGAN: 0.1); 0 turns the GAN off."""
    gan_loss: GanLoss = "hinge"
    """GAN objective on the discriminator logits (taming: hinge; StyleGAN2: non_saturating)."""
    adaptive_weight: bool = True
    """Multiply the adversarial loss by taming's ||grad rec|| / ||grad adv|| on the decoder's last layer."""
    adaptive_weight_max: float = 1e4
    """Upper clamp of the adaptive weight (taming: 1e4)."""
    adaptive_weight_scale: float = 0.8
    """Factor on the adaptive weight (taming's disc_weight 0.8); taming itself = adv_weight 1.0 with this."""
    disc_start: int = 20_000
    """First step of the adversarial terms (taming ImageNet: 250001, LlamaGen: 20000); before it D is unused."""
    r1_gamma: float = 0.0
    """R1 penalty weight gamma (0 = off; StyleGAN2 uses 10 at 1024px, ADA's heuristic 2e-4 * res^2 / batch)."""
    r1_every: int = 16
    """Lazy R1: applied every this many steps, multiplied by this number (StyleGAN2 lazy regularization)."""
    lecam_weight: float = 0.0
    """LeCam regularization weight (0 = off; Tseng et al. use 0.1-0.3 with limited data)."""
    lecam_decay: float = 0.999
    """EMA decay of the mean real and fake logits that LeCam anchors to."""
    lpips_net: Literal["vgg", "alex", "squeeze"] = "vgg"
    """LPIPS trunk (ViT-VQGAN and taming: vgg)."""
    lpips_pretrained_backbone: bool = True
    """Load the ImageNet trunk weights (false only for tests/debug: the score is then not LPIPS)."""
    lpips_backbone_path: Optional[str] = None
    """Trunk weights file (or a folder holding it); None = the torch hub cache ($TORCH_HOME/hub/checkpoints)."""

    def __post_init__(self) -> None:
        for name in ("l2_weight", "l1_weight", "logit_laplace_weight", "perceptual_weight", "quant_weight",
                     "adv_weight", "r1_gamma", "lecam_weight"):
            value = getattr(self, name)
            check(value >= 0, name, value, "must be >= 0 (0 turns the term off)")
        check(self.adaptive_weight_max > 0, "adaptive_weight_max", self.adaptive_weight_max, "must be positive")
        check(self.adaptive_weight_scale >= 0, "adaptive_weight_scale", self.adaptive_weight_scale, "must be >= 0")
        check(self.disc_start >= 0, "disc_start", self.disc_start, "must be >= 0")
        check(self.r1_every > 0, "r1_every", self.r1_every, "must be a positive number of steps")
        check(0 <= self.lecam_decay < 1, "lecam_decay", self.lecam_decay, "must be in [0, 1)")


# -- GAN losses ---------------------------------------------------------------------------------------
# Convention: the discriminator loss averages its real and fake terms (taming's 0.5 factor, which is also
# LSGAN's 1/2); the generator loss is the plain fake term. So hinge and non-saturating match taming exactly.
def gan_d_loss(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    if kind == "non_saturating":
        # BCE with logits, target 1 for real and 0 for fake: softplus(-real) and softplus(fake).
        # (LlamaGen passes BCE's input and target swapped; this is the written-out form.)
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    if kind == "least_squares":
        return 0.5 * ((real - 1).square().mean() + fake.square().mean())
    raise ValueError(f"unknown gan loss {kind!r}")


def gan_g_loss(kind: str, logits_fake: torch.Tensor) -> torch.Tensor:
    fake = logits_fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()  # -log sigmoid(D(G(z))), Goodfellow et al.'s non-saturating form
    if kind == "least_squares":
        return (fake - 1).square().mean()
    raise ValueError(f"unknown gan loss {kind!r}")


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, scale: float = 1.0) -> torch.Tensor:
    """taming's lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4) on the last layer L, clamped to [0, max],
    detached, times ``scale`` (Esser et al. 2012.09841, eq. 7). Norms in fp32."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    ratio = g_rec.float().norm() / (g_adv.float().norm() + 1e-4)
    return ratio.clamp(0.0, max_weight).detach() * scale


def r1_penalty(real: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """E_batch ||d sum(D(x)) / dx||^2 at the real images (Mescheder et al. 1801.04406), differentiable
    (create_graph) so it trains D. ``real`` must be the tensor D was called on, with requires_grad."""
    wide = torch.promote_types(logits_real.dtype, torch.float32)  # at least fp32 (fp64 stays, for checks)
    (grad,) = torch.autograd.grad(logits_real.to(wide).sum(), real, create_graph=True)
    return grad.to(wide).square().flatten(1).sum(1).mean()


def lecam_regularization(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor,
                         ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam (Tseng et al. 2104.03310, eq. 3): mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2)."""
    return (F.relu(logits_real.float() - ema_fake).square().mean()
            + F.relu(ema_real - logits_fake.float()).square().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB between images in [0, 1], per image (the MSE floored at 1e-10: 100 dB for equal images)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _noop(t: torch.Tensor) -> torch.Tensor:
    return t


class Stage1Loss(nn.Module):
    """The tokenizer's generator and discriminator objectives; holds the frozen LPIPS and LeCam's EMAs.

    The LPIPS network is deliberately kept out of the module tree: it is not in ``parameters()`` (no
    optimizer can take it), not in ``state_dict()`` (its weights come from files, not from checkpoints,
    which would otherwise carry 59 MB of VGG each), and ``train()`` cannot flip it; ``.to()`` moves it.
    """

    def __init__(self, cfg: LossConfig, output_kind: OutputKind):
        super().__init__()
        check(output_kind in ("pixels", "logit_laplace"), "model.output", output_kind,
              "must be 'pixels' or 'logit_laplace'")
        check(output_kind == "logit_laplace" or cfg.logit_laplace_weight == 0, "loss.logit_laplace_weight",
              cfg.logit_laplace_weight, f"must be 0 with model.output={output_kind!r} (no scale is predicted)")
        self.cfg, self.output_kind = cfg, output_kind
        perceptual = PerceptualLoss(cfg.lpips_net, cfg.lpips_pretrained_backbone, cfg.lpips_backbone_path)
        object.__setattr__(self, "perceptual", perceptual)  # not registered: see the class docstring
        self.register_buffer("lecam_ema", torch.zeros(2))  # EMA of mean D(real), mean D(fake)
        self.register_buffer("lecam_initialized", torch.zeros((), dtype=torch.bool))
        self._all_reduce: Callable[[torch.Tensor], torch.Tensor] = _noop
        self._lecam_pending: Optional[torch.Tensor] = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Stage1Loss":
        self.perceptual._apply(fn, recurse)  # .to()/.cuda() go through _apply: move the unregistered LPIPS too
        return super()._apply(fn, recurse)

    def set_all_reduce(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``fn(t)`` sums ``t`` in place over data-parallel ranks; keeps LeCam's EMAs identical on all ranks."""
        self._all_reduce = fn

    def disc_active(self, step: int) -> bool:
        """Whether the adversarial terms (and the discriminator update) run at ``step``."""
        return self.cfg.adv_weight > 0 and step >= self.cfg.disc_start

    @torch.no_grad()
    def lpips_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) LPIPS between images in [-1, 1], for validation."""
        return self.perceptual(x, y)

    def generator_loss(self, x: torch.Tensor, dec_out: torch.Tensor, quant_loss: torch.Tensor,
                       disc: Optional[Callable[[torch.Tensor], torch.Tensor]], step: int,
                       last_layer: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Tokenizer loss for images ``x`` (B, 3, H, W) in [-1, 1] and the raw decoder output ``dec_out``."""
        cfg = self.cfg
        x = x.float()
        x_rec = decoder_output_to_image(dec_out.float(), self.output_kind)  # (B, 3, H, W) in [-1, 1]
        zero = x.new_zeros(())
        l2 = (x_rec - x).square().mean()
        l1 = (x_rec - x).abs().mean()
        nll = logit_laplace_nll(dec_out, (x + 1) / 2) if self.output_kind == "logit_laplace" else zero
        rec = cfg.l2_weight * l2 + cfg.l1_weight * l1 + cfg.logit_laplace_weight * nll
        p = self.perceptual(x, x_rec).mean() if cfg.perceptual_weight > 0 else zero
        quant = quant_loss.float()

        g_loss, d_weight = zero, zero  # d_weight 0: no adversarial gradient at this step
        if disc is not None and self.disc_active(step):
            g_loss = gan_g_loss(cfg.gan_loss, disc(x_rec))
            d_weight = x.new_ones(())
            if cfg.adaptive_weight and last_layer is not None and self.training and torch.is_grad_enabled():
                # Balances the two gradients at the decoder output, reconstruction incl. LPIPS (taming's nll_loss).
                d_weight = adaptive_weight(rec + cfg.perceptual_weight * p, g_loss, last_layer,
                                           cfg.adaptive_weight_max, cfg.adaptive_weight_scale)
        total = rec + cfg.perceptual_weight * p + cfg.quant_weight * quant + cfg.adv_weight * d_weight * g_loss
        metrics = {"total_loss": total, "rec_loss": rec, "perceptual_loss": p, "quant_loss": quant, "g_loss": g_loss,
                   "d_weight": d_weight, "l2_loss": l2, "l1_loss": l1, "nll_loss": nll}
        return total, {k: v.detach() for k, v in metrics.items()}

    def discriminator_loss(self, x: torch.Tensor, x_rec_detached: torch.Tensor,
                           disc: Callable[[torch.Tensor], torch.Tensor],
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on reals ``x`` and (detached) reconstructions, both (B, 3, H, W) in [-1, 1].

        R1 runs on steps where ``step % r1_every == 0`` (metric ``r1`` is 0 on the others), scaled by
        gamma / 2 * r1_every (StyleGAN2's lazy regularization keeps the average strength at gamma / 2)."""
        cfg = self.cfg
        do_r1 = cfg.r1_gamma > 0 and step % cfg.r1_every == 0
        real = x.detach().float().requires_grad_(do_r1)
        logits_real = disc(real).float()
        logits_fake = disc(x_rec_detached.detach()).float()
        loss = gan_d_loss(cfg.gan_loss, logits_real, logits_fake)
        zero = loss.new_zeros(())
        r1 = r1_penalty(real, logits_real) if do_r1 else zero
        loss = loss + (0.5 * cfg.r1_gamma * cfg.r1_every) * r1
        lecam = zero
        if cfg.lecam_weight > 0:
            anchors = self._lecam_anchors(logits_real.detach(), logits_fake.detach())  # applied by commit()
            lecam = lecam_regularization(logits_real, logits_fake, anchors[0], anchors[1])
            loss = loss + cfg.lecam_weight * lecam
        metrics = {"disc_loss": loss, "r1": r1, "lecam": lecam, "logits_real": logits_real.mean(),
                   "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach() for k, v in metrics.items()}

    @torch.no_grad()
    def _lecam_anchors(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """LeCam's EMAs updated with this micro-batch, (2,): used by its loss, stored only by :meth:`commit`."""
        # Global means over ranks (sum of means / number of ranks), so every rank keeps the same anchors.
        stats = torch.stack([logits_real.mean(), logits_fake.mean(), logits_real.new_ones(())])
        self._all_reduce(stats)
        means = stats[:2] / stats[2]
        if not bool(self.lecam_initialized):  # start at the first values rather than biasing toward 0
            self._lecam_pending = means.clone()
        else:
            self._lecam_pending = self.lecam_ema * self.cfg.lecam_decay + means * (1 - self.cfg.lecam_decay)
        return self._lecam_pending

    def commit(self) -> None:
        """Keep the LeCam EMAs of the last micro-batch (the trainer calls this once its losses were finite)."""
        if self._lecam_pending is not None:
            self.lecam_ema.copy_(self._lecam_pending)
            self.lecam_initialized.fill_(True)
        self._lecam_pending = None

    def discard(self) -> None:
        """Forget them: the micro-batch was dropped."""
        self._lecam_pending = None


__all__ = ["LossConfig", "Stage1Loss", "logit_laplace_nll", "logit_laplace_image", "decoder_output_to_image",
           "gan_d_loss", "gan_g_loss", "adaptive_weight", "r1_penalty", "lecam_regularization", "psnr",
           "LOGIT_LAPLACE_EPS"]
