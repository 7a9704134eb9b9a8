"""Feature extractors for FID and IS: torch-fidelity's InceptionV3 from a verified local file, or a tiny stand-in.

FID and IS are only comparable between papers when computed with the same network, weights and resize
(../shared/REFERENCE.md, "Evaluation protocol"). We use torch-fidelity's port of the TF Inception graph (the
one torchmetrics wraps), which resizes uint8 images to 299x299 with the TF1-compatible bilinear kernel and no
antialiasing, as the original. The weights cannot be downloaded at run time, so they are resolved from

    1. an explicit path (``--inception-weights PATH``),
    2. the environment variable ``VITVQ_INCEPTION_WEIGHTS``,
    3. the torch hub cache (``torch.hub.get_dir()/checkpoints/``, torch-fidelity's or pytorch-fid's file name),

and checked against the known size and sha256; a missing or wrong file raises :class:`InceptionWeightsError`
saying which file, which checksum and where to put it.

``TinyExtractor`` is a randomly initialised (fixed-seed) conv net with the same interface, for tests and
benchmarks on machines without the weights. Its numbers are NOT comparable to published FID/IS, and its
``protocol`` says so.

    ext = build_extractor("inception", weights="/data/weights-inception-2015-12-05-6726825d.pth")
    feats, logits = ext(images_uint8)     # (N, 3, H, W) uint8 -> (N, 2048), (N, 1008)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitvq.models.perceptual import file_sha256

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_FILE_PYTORCH_FID = "pt_inception-2015-12-05-6726825d.pth"  # the same bytes under pytorch-fid's name
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_SIZE = 95_628_359
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILE
WEIGHTS_ENV = "VITVQ_INCEPTION_WEIGHTS"
NOT_COMPARABLE = "NOT comparable to published numbers (tiny randomly initialised extractor, not InceptionV3)"

ExtractorKind = Literal["inception", "inception-random", "tiny"]


class InceptionWeightsError(FileNotFoundError):
    """The FID InceptionV3 weights are missing or are not the expected file."""


def _how_to_fix() -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"Need {WEIGHTS_FILE} (sha256 {WEIGHTS_SHA256}, {WEIGHTS_SIZE:,} bytes; pytorch-fid's "
            f"{WEIGHTS_FILE_PYTORCH_FID} is the same file), downloadable on a machine with internet from "
            f"{WEIGHTS_URL}. Then either copy it to {hub}/, pass --inception-weights PATH, or set "
            f"{WEIGHTS_ENV}=PATH.")


def verify_weights(path: str | Path) -> Path:
    """Return ``path`` if it is the expected InceptionV3 file (size, then sha256), else raise with the fix.
    The hash is computed once per process (``file_sha256``), so every actor and checkpoint pays it once."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(f"InceptionV3 weights file {path} does not exist. {_how_to_fix()}")
    size = path.stat().st_size
    if size != WEIGHTS_SIZE:
        raise InceptionWeightsError(f"InceptionV3 weights file {path} has {size:,} bytes, expected "
                                    f"{WEIGHTS_SIZE:,} (sha256 {WEIGHTS_SHA256}): wrong or truncated file. "
                                    f"{_how_to_fix()}")
    got = file_sha256(path)
    if got != WEIGHTS_SHA256:
        raise InceptionWeightsError(f"InceptionV3 weights file {path} has sha256 {got}, expected "
                                    f"{WEIGHTS_SHA256}: wrong file. {_how_to_fix()}")
    return path


def resolve_inception_weights(path: Optional[str | Path] = None) -> Path:
    """Find and verify the weights: explicit path, then $VITVQ_INCEPTION_WEIGHTS, then the torch hub cache.

    An explicit path or env var that is wrong is an error (we never fall through to another file silently).
    """
    if path:
        return verify_weights(path)
    if os.environ.get(WEIGHTS_ENV):
        return verify_weights(os.environ[WEIGHTS_ENV])
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = [hub / WEIGHTS_FILE, hub / WEIGHTS_FILE_PYTORCH_FID]
    for cand in candidates:
        if cand.is_file():
            return verify_weights(cand)
    raise InceptionWeightsError(
        "InceptionV3 weights for FID/IS not found. Looked at: --inception-weights (not given), "
        f"${WEIGHTS_ENV} (not set), {candidates[0]}, {candidates[1]}. {_how_to_fix()}")


class InceptionExtractor(nn.Module):
    """torch-fidelity's InceptionV3: uint8 (N, 3, H, W) -> pool3 features (N, 2048) and logits (N, 1008).

    The logits are torch-fidelity's ``logits_unbiased`` (fc without bias), the layer its Inception Score uses.
    ``weights=None`` keeps a fixed-seed random initialisation: the real network's cost with meaningless numbers,
    for throughput benchmarks and for testing this wrapper where the file is absent.
    """

    def __init__(self, weights: Optional[Path], seed: int = 0):
        super().__init__()
        import torch_fidelity
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        features = ["2048", "logits_unbiased"]
        if weights is not None:
            # Checked by verify_weights, so torch.load(weights_only=False) inside torch-fidelity reads a known file.
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", features,
                                                   feature_extractor_weights_path=str(weights))
        else:
            self.net = _random_inception(FeatureExtractorInceptionV3, features, seed)
        comparable = weights is not None
        self.protocol: dict[str, Any] = {
            "implementation": f"torch-fidelity {torch_fidelity.__version__} FeatureExtractorInceptionV3 "
                              "(pool3 2048-d for FID, logits_unbiased for IS)"
                              + ("" if comparable else f" with RANDOM weights -- {NOT_COMPARABLE}"),
            "weights_sha256": WEIGHTS_SHA256 if comparable else "none (random init)",
            "inception_resize": "uint8 -> 299x299 bilinear, TF1-compatible (torch-fidelity), antialias off",
            "feature_dim": 2048,
            "comparable_to_papers": comparable,
        }

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.net(x)  # the resize to 299 happens inside, on the uint8 values
        return feats.float(), logits.float()  # (N, 2048), (N, 1008)


def _random_inception(base: type, features: list[str], seed: int) -> nn.Module:
    """torch-fidelity's module with its load step skipped (it always reads a file): random, seeded layers."""
    import tempfile

    class _Unloaded(base):  # type: ignore[misc, valid-type]
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return None

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.save({}, Path(tmp) / "empty.pth")
        return _Unloaded("inception-v3-compat", features, feature_extractor_weights_path=str(Path(tmp) / "empty.pth"))


class TinyExtractor(nn.Module):
    """A fixed-seed random conv net with the Inception interface, for tests. NOT comparable to published numbers.

    Every process that builds it with the same seed gets the same weights, so workers agree with each other.
    """

    def __init__(self, dim: int = 64, classes: int = 16, size: int = 32, seed: int = 0):
        super().__init__()
        self.size = size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.convs = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, dim, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(dim, classes)
            for m in self.modules():  # He init: features of order 1, so distances between image sets are visible
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        self.requires_grad_(False).eval()
        self.protocol = {
            "implementation": f"tiny-random-extractor(seed={seed}, dim={dim}) -- {NOT_COMPARABLE}",
            "weights_sha256": "none (random init)",
            "inception_resize": f"uint8 -> {size}x{size} bilinear, antialias off",
            "feature_dim": dim,
            "comparable_to_papers": False,
        }

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        x = (x - 128) / 128
        feats = self.convs(x).mean(dim=(2, 3))  # (N, dim)
        return feats, 4 * self.fc(feats)  # (N, dim), (N, classes): sharper p(y|x), so IS moves off 1


def build_extractor(kind: ExtractorKind = "inception", weights: Optional[str | Path] = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """The feature extractor of a run. ``"inception"`` needs the verified weights; ``"inception-random"`` (speed
    only) and ``"tiny"`` (tests) ignore ``weights`` and label every protocol as not comparable to papers."""
    if kind == "inception":
        ext: nn.Module = InceptionExtractor(resolve_inception_weights(weights))
    elif kind == "inception-random":
        ext = InceptionExtractor(None)
    elif kind == "tiny":
        ext = TinyExtractor()
    else:
        raise ValueError(f"unknown extractor kind {kind!r}; choose 'inception', 'inception-random' or 'tiny'")
    return ext.to(device).eval()


__all__ = ["InceptionWeightsError", "InceptionExtractor", "TinyExtractor", "build_extractor",
           "resolve_inception_weights", "verify_weights", "WEIGHTS_FILE", "WEIGHTS_SHA256", "WEIGHTS_SIZE",
           "WEIGHTS_ENV", "NOT_COMPARABLE"]
