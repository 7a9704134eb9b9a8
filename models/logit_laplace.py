"""The logit-Laplace decoder head (DALL-E, 2102.12092 section A.3): its likelihood and the image it stands for.

The decoder predicts per pixel and channel a location mu and a log-scale ln b of a Laplace in logit space over
squeezed pixels ``x' = (1 - 2e) x + e``. ``models.tokenizer`` needs only the mean image (to turn decoder output
into pixels) and ``models.losses`` the NLL; both live here so that loading a tokenizer imports no LPIPS.
Computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's squeeze: x' = (1 - 2e) x + e keeps logit(x') finite


def _squeeze(x01: torch.Tensor) -> torch.Tensor:
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x01.float().clamp(0, 1) + LOGIT_LAPLACE_EPS


def logit_laplace_nll(params: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """Mean NLL of pixels ``x01`` (B, 3, H, W) in [0, 1] under the logit-Laplace ``params`` (B, 6, H, W).

    ``params[:, :3]`` is mu and ``params[:, 3:]`` is ln b. With x' the squeezed pixel and y = logit(x'),
    -ln p(x') = ln(2b) + ln(x'(1 - x')) + |y - mu| / b (a Laplace in y times the Jacobian dy/dx')."""
    mu, log_b = params.float().chunk(2, dim=1)  # (B, 3, H, W) each
    xs = _squeeze(x01)
    y = torch.log(xs) - torch.log1p(-xs)
    nll = math.log(2.0) + log_b + torch.log(xs * (1 - xs)) + (y - mu).abs() * torch.exp(-log_b)
    return nll.mean()


def logit_laplace_image(params: torch.Tensor) -> torch.Tensor:
    """Reconstruction in [0, 1] from logit-Laplace params (B, 6, H, W): un-squeezed sigmoid(mu), clamped."""
    mu = params.float()[:, : params.shape[1] // 2]
    return ((torch.sigmoid(mu) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)  # (B, 3, H, W)


def decoder_output_to_image(out: torch.Tensor, output_kind: str) -> torch.Tensor:
    """Decoder output -> image (B, 3, H, W) in [-1, 1]: identity for "pixels", the mean for "logit_laplace"."""
    if output_kind == "pixels":
        return out
    if output_kind == "logit_laplace":
        return logit_laplace_image(out) * 2 - 1
    raise ValueError(f"unknown decoder output kind {output_kind!r}; expected 'pixels' or 'logit_laplace'")
