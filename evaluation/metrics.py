"""Evaluation statistics that merge exactly across workers: FID, IS, PSNR/SSIM/LPIPS, codebook usage.

Every statistic here is a sum (float64 for features), so workers each accumulate their slice of the data and the
driver adds the partial sums: the result does not depend on how many workers there were
(../shared/REFERENCE.md, "FID from accumulated statistics ... is exact whatever the number of workers").

- FID: count, sum of features (d,) and sum of outer products (d, d); mean and covariance from them, then the
  Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``.
- IS: ``exp(E_x KL(p(y|x) || p(y)))`` per split, mean and std over 10 splits. Splits are chosen as torch-fidelity
  does (a permutation of the N samples with seed 2020, then contiguous chunks), keyed by each sample's global
  index, and each split keeps ``count``, ``sum_x p(y|x)`` and ``sum_x sum_y p log p``; since
  ``mean KL = mean(sum p log p) - sum_y q log q`` with ``q`` the split's mean ``p``, these sums give the exact
  score whichever worker saw which sample.
- Reconstructions: per-image PSNR, SSIM (torchmetrics' functional versions) and LPIPS summed; a code histogram
  gives the usage and perplexity over the whole evaluated set (not a mean of per-batch values).

Reference statistics are ``.npz`` files with ``mu`` and ``sigma`` (ADM's layout, so ADM's files are read as
they are) plus our ``protocol`` (JSON) and ``count``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from vitvq.models.codebook import code_histogram, code_stats


# -- FID -------------------------------------------------------------------------------------------
@dataclass
class FIDStats:
    """Sufficient statistics of a feature set; ``a + b`` is the statistics of the union."""

    n: int
    sum: np.ndarray  # (d,) float64
    outer: np.ndarray  # (d, d) float64

    @classmethod
    def zeros(cls, dim: int) -> "FIDStats":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().double().cpu()  # (N, d): fp64 before the products, as torchmetrics' FID states
        self.n += int(f.shape[0])
        self.sum += f.sum(0).numpy()
        self.outer += (f.T @ f).numpy()

    def __add__(self, other: "FIDStats") -> "FIDStats":
        return FIDStats(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (d,) and unbiased covariance (d, d), as numpy.cov and torch-fidelity compute them."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 samples, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians; ``tr (S1 S2)^1/2`` from a symmetric eigenproblem.

    ``S1 S2`` is similar to ``A S2 A`` with ``A = S1^1/2`` (symmetric PSD), so its eigenvalues are those of a
    symmetric PSD matrix: we take ``eigvalsh`` and clip round-off negatives, which is stable where
    ``scipy.linalg.sqrtm(S1 @ S2)`` may return complex parts for the rank-deficient covariances of small sets.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape} (different feature extractors?)")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# -- Inception Score -------------------------------------------------------------------------------
def is_split_ids(n: int, splits: int = 10, seed: int = 2020) -> np.ndarray:
    """Split of each global sample index (n,), as torch-fidelity: permute with ``seed``, then contiguous chunks."""
    perm = np.random.RandomState(seed).permutation(n)
    pos = np.empty(n, np.int64)
    pos[perm] = np.arange(n)  # position of sample i in the shuffled order
    bounds = np.array([k * n // splits for k in range(1, splits)], np.int64)
    return np.searchsorted(bounds, pos, side="right")


@dataclass
class ISStats:
    """Per-split sums over samples of p(y|x) and of sum_y p log p; additive across workers."""

    n: np.ndarray  # (splits,) int64
    psum: np.ndarray  # (splits, K) float64
    plogp: np.ndarray  # (splits,) float64

    @classmethod
    def zeros(cls, classes: int, splits: int = 10) -> "ISStats":
        return cls(np.zeros(splits, np.int64), np.zeros((splits, classes)), np.zeros(splits))

    def update(self, logits: torch.Tensor, split_ids: np.ndarray) -> None:
        logp = torch.log_softmax(logits.detach().double().cpu(), dim=1)  # (N, K)
        p = logp.exp()
        ids = np.asarray(split_ids, np.int64)
        np.add.at(self.n, ids, 1)
        np.add.at(self.psum, ids, p.numpy())
        np.add.at(self.plogp, ids, (p * logp).sum(1).numpy())

    def __add__(self, other: "ISStats") -> "ISStats":
        return ISStats(self.n + other.n, self.psum + other.psum, self.plogp + other.plogp)

    def score(self) -> tuple[float, float]:
        """(mean, std) over the non-empty splits of exp(mean KL(p(y|x) || p(y)))."""
        keep = self.n > 0
        n = self.n[keep].astype(np.float64)
        q = self.psum[keep] / n[:, None]  # (S, K) the split's marginal p(y)
        q_logq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum(1)
        scores = np.exp(self.plogp[keep] / n - q_logq)
        return float(scores.mean()), float(scores.std())


# -- reconstructions --------------------------------------------------------------------------------
def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped and in fp32 (the range PSNR/SSIM use with data_range=1)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255] with rounding, as images are saved and fed to Inception."""
    return (to_unit(x) * 255).round().to(torch.uint8)


def psnr_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [-1, 1], measured on [0, 1] (data range 1)."""
    return peak_signal_noise_ratio(to_unit(x), to_unit(y), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> torch.Tensor:
    """(B,) SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) of images in [-1, 1], on [0, 1].

    torchmetrics' SSIM map averaged over the valid region only (``window // 2`` border pixels left out), as
    Wang et al.'s reference code and scikit-image do; torchmetrics 1.9's own mean also takes the reflect-padded
    border in, which moves SSIM by ~1e-2 on 32 px images (less at 256 px)."""
    _, full = structural_similarity_index_measure(to_unit(x), to_unit(y), data_range=1.0, kernel_size=window,
                                                  reduction="none", return_full_image=True)  # (B, 3, H, W) map
    pad = window // 2
    return full[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))


def lpips_per_image(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) LPIPS of images in [-1, 1] (the range lpips.LPIPS and torchmetrics' _LPIPS take by default)."""
    with torch.no_grad():
        d = net(x.float(), y.float())
    return rearrange(d, "b ... -> b (...)").mean(1)  # (B, 1, 1, 1) -> (B,)


LPIPS_MODES = {
    "vgg": "LPIPS v0.1 vgg (models.perceptual: lpips 0.1.4 heads, torchvision VGG16 backbone, verified)",
    "random": "LPIPS v0.1 vgg heads on a RANDOM VGG16 backbone -- a test stand-in, not LPIPS",
    "off": "not measured (--lpips off, or auto without torchvision's vgg16-397923af.pth; see --lpips-weights)",
}


def resolve_lpips_mode(mode: str, weights: Optional[str] = None) -> str:
    """``auto`` -> ``vgg`` when the VGG16 backbone file is found (``weights`` or the torch hub cache), else ``off``:
    evaluation never downloads, and never silently reports a random-backbone LPIPS."""
    from vitvq.models.perceptual import MissingWeightsError, find_backbone_file
    if mode not in (*LPIPS_MODES, "auto"):
        raise ValueError(f"unknown LPIPS mode {mode!r}; choose auto, vgg, random or off")
    if mode != "auto":
        return mode
    try:
        find_backbone_file("vgg", weights)
        return "vgg"
    except MissingWeightsError:
        return "off"


def build_lpips(mode: str = "auto", weights: Optional[str] = None) -> Optional[nn.Module]:
    """The LPIPS network (``forward(x, y) -> (B,)``, images in [-1, 1]) for ``mode``; None for ``off``."""
    from vitvq.models.perceptual import PerceptualLoss
    mode = resolve_lpips_mode(mode, weights)
    if mode == "off":
        return None
    if mode == "vgg":
        return PerceptualLoss("vgg", backbone_path=weights)
    with torch.random.fork_rng(devices=[]):  # the same random trunk in every worker, so workers agree
        torch.manual_seed(0)
        return PerceptualLoss("vgg", pretrained_backbone=False)


@dataclass
class ReconStats:
    """Sums of per-image PSNR, SSIM, LPIPS and a code histogram (depth, K) over the evaluated set."""

    n: int = 0
    psnr: float = 0.0
    ssim: float = 0.0
    lpips: Optional[float] = None  # None when no LPIPS network was given
    hist: Optional[np.ndarray] = None  # (depth, K) int64; depth > 1 for residual quantization

    def update(self, x: torch.Tensor, rec: torch.Tensor, indices: Optional[torch.Tensor] = None,
               codebook_size: int = 0, lpips_net: Optional[nn.Module] = None) -> None:
        self.n += int(x.shape[0])
        self.psnr += float(psnr_per_image(rec, x).double().sum())
        self.ssim += float(ssim_per_image(rec, x).double().sum())
        if lpips_net is not None:
            self.lpips = (self.lpips or 0.0) + float(lpips_per_image(lpips_net, rec, x).double().sum())
        if indices is not None:
            hist = code_histogram(indices.detach().cpu(), codebook_size).numpy()  # (depth, K)
            self.hist = hist if self.hist is None else self.hist + hist

    def __add__(self, other: "ReconStats") -> "ReconStats":
        lp = None if self.lpips is None and other.lpips is None else (self.lpips or 0.0) + (other.lpips or 0.0)
        hist = self.hist if other.hist is None else other.hist if self.hist is None else self.hist + other.hist
        return ReconStats(self.n + other.n, self.psnr + other.psnr, self.ssim + other.ssim, lp, hist)

    def summary(self) -> dict[str, float]:
        out = {"psnr": self.psnr / self.n, "ssim": self.ssim / self.n}
        if self.lpips is not None:
            out["lpips"] = self.lpips / self.n
        if self.hist is not None:
            out.update(codebook_usage(self.hist))
        return out


def codebook_usage(hist: np.ndarray) -> dict[str, float]:
    """Usage and perplexity of a (K,) or (depth, K) code histogram, in float64: ``models.codebook.code_stats``, the
    definition training uses too (per level, then the mean over residual levels)."""
    s = code_stats(torch.from_numpy(np.asarray(hist, np.float64)))
    return {"codebook_usage": float(s["usage"]), "perplexity": float(s["perplexity"])}


# -- reference statistics --------------------------------------------------------------------------
@dataclass
class RefStats:
    mu: np.ndarray  # (d,)
    sigma: np.ndarray  # (d, d)
    protocol: dict[str, Any] = field(default_factory=dict)


def save_ref_stats(path: str | Path, stats: FIDStats, protocol: dict[str, Any]) -> Path:
    """Write ``mu``, ``sigma`` (ADM's keys), ``count`` and the ``protocol`` as JSON into an ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = stats.mean_cov()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, count=np.int64(stats.n), protocol=np.array(json.dumps(protocol, sort_keys=True)))
    tmp.replace(path)
    return path


def load_ref_stats(path: str | Path) -> RefStats:
    """Read our ``.npz`` or ADM's reference batch (``mu``/``sigma``; its protocol is then unknown to us)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found; make them with "
                                f"`python launch/evaluate.py ref-stats --shards ... --out {path}`")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(z.keys())}); expected reference "
                             "statistics from `launch/evaluate.py ref-stats` or an ADM reference batch")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        if "protocol" in z:
            protocol = json.loads(str(z["protocol"]))
        else:
            protocol = {"source": f"external reference statistics {path.name} (e.g. ADM); protocol not recorded",
                        "feature_dim": int(mu.shape[0])}
    return RefStats(mu, sigma, protocol)


PROTOCOL_KEYS_MUST_MATCH = ("implementation", "weights_sha256", "inception_resize", "resolution", "crop")
NETWORK_KEYS = PROTOCOL_KEYS_MUST_MATCH[:3]  # generated samples are not cropped: only the network must match


def protocol_mismatches(ref: dict[str, Any], ours: dict[str, Any],
                        keys: tuple[str, ...] = PROTOCOL_KEYS_MUST_MATCH) -> list[str]:
    """Protocol fields that differ between the reference statistics and this evaluation (FID not comparable)."""
    return [f"{k}: reference {ref[k]!r} vs ours {ours.get(k)!r}" for k in keys if k in ref and ref[k] != ours.get(k)]


def fid_against(stats: FIDStats, ref: RefStats) -> float:
    mu, sigma = stats.mean_cov()
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


__all__ = ["FIDStats", "ISStats", "ReconStats", "RefStats", "frechet_distance", "is_split_ids", "codebook_usage",
           "psnr_per_image", "ssim_per_image", "lpips_per_image", "build_lpips", "resolve_lpips_mode", "LPIPS_MODES",
           "to_unit", "to_uint8", "save_ref_stats", "load_ref_stats", "protocol_mismatches", "NETWORK_KEYS",
           "PROTOCOL_KEYS_MUST_MATCH", "fid_against"]
