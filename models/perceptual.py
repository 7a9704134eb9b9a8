"""LPIPS perceptual distance (Zhang et al., 1801.03924) built offline from local weight files.

The ``lpips`` package (0.1.4) ships the calibrated linear heads (``lpips/weights/v0.1/<net>.pth``) but
builds its backbone through torchvision, which downloads the ImageNet weights on first use. Our machines
have no internet, so :class:`PerceptualLoss` builds ``lpips.LPIPS`` with a random trunk (``pnet_rand=True``,
no download), loads the heads from the package with a key check, and loads the torchvision backbone file
itself from, in order: an explicit path (``loss.lpips_backbone_path``), or the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``), downloading it there from
torchvision's URL if absent. A file that is neither there nor downloadable is an error naming the file,
its sha256 and size, and where to put it; a file with other bytes is refused.
Only ``pretrained_backbone=False`` (tests, debug recipes) keeps the random trunk, with a warning: the score
is then not LPIPS.

    lp = PerceptualLoss("vgg")  # needs vgg16-397923af.pth in the hub cache
    d = lp(x, y)                # (B,) distances, x and y (B, 3, H, W) in [-1, 1]
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import lpips
import torch
import torch.nn as nn


@dataclass(frozen=True)
class WeightsFile:
    """A weights file identified by name, byte size and sha256 (torchvision's name embeds the hash prefix)."""
    filename: str
    sha256: str
    size: int
    url: str


# torchvision ImageNet weights of the LPIPS trunks (hashes of the files torchvision downloads).
BACKBONE_FILES: dict[str, WeightsFile] = {
    "vgg": WeightsFile("vgg16-397923af.pth", "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
                       553_433_881, "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": WeightsFile("alexnet-owt-7be5be79.pth", "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
                        244_408_911, "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": WeightsFile("squeezenet1_1-b8a52dc0.pth",
                           "b8a52dc049b60e4b6ab68ad0df457362afab8b6304b2febdc1650a5dab4d7e7b",
                           4_958_839, "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}
# The linear heads shipped in lpips 0.1.4 (weights/v0.1/<net>.pth).
HEAD_SHA256 = {
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "squeeze": "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76",
}


class MissingWeightsError(FileNotFoundError):
    """A weights file is not on disk and could not be downloaded; the message says which file and where to put it."""


class WeightsChecksumError(ValueError):
    """A weights file exists but is not the expected one (size or sha256 differ)."""


def head_path(net: str) -> Path:
    """The linear-head file shipped inside the installed ``lpips`` package."""
    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth"


def hub_checkpoint_dir() -> Path:
    """torch hub's download folder, where torchvision would have put the backbone ($TORCH_HOME respected)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime as well, so a replaced file is hashed again; hashing VGG takes ~1-2 s.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, hashed once per process while its size and mtime stay the same."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def verify_file(path: Path, spec: WeightsFile) -> None:
    """Refuse ``path`` unless its size and sha256 are the ones of ``spec`` (the hash is cached per process)."""
    st = path.stat()
    if st.st_size != spec.size:
        raise WeightsChecksumError(
            f"{path} is {st.st_size:,} bytes, expected {spec.size:,} for {spec.filename} (sha256 {spec.sha256}); "
            f"a partial or different file? Get it from {spec.url}")
    got = file_sha256(path)
    if got != spec.sha256:
        raise WeightsChecksumError(
            f"{path} has sha256 {got}, expected {spec.sha256} for {spec.filename}; get it from {spec.url}")


def find_backbone_file(net: str, path: Optional[str] = None) -> Path:
    """The backbone weights of ``net``: the explicit ``path`` (a file, or a folder holding the file), else
    the torch hub cache. Raises :class:`MissingWeightsError` naming file, checksum, size and destinations."""
    spec = BACKBONE_FILES[net]
    hub = hub_checkpoint_dir() / spec.filename
    candidates = []
    if path is not None:
        p = Path(path).expanduser()
        candidates.append(p / spec.filename if p.is_dir() else p)
    else:
        candidates.append(hub)
    for c in candidates:
        if c.is_file():
            return c
    failure = ""
    if path is None:  # torchvision's own path: download into the hub cache, checked against the sha256 prefix
        try:
            hub.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(hub), hash_prefix=spec.sha256[:8], progress=True)
            return hub
        except Exception as exc:  # offline, proxy, disk full: report it with the manual fix below
            failure = f"  download failed: {type(exc).__name__}: {exc}\n"
    raise MissingWeightsError(
        f"LPIPS (net={net!r}) needs torchvision's ImageNet backbone weights: not on disk, no download.\n" + failure +
        f"  file:   {spec.filename} ({spec.size:,} bytes, sha256 {spec.sha256})\n"
        f"  source: {spec.url}\n"
        f"  looked: {', '.join(str(c) for c in candidates)}\n"
        f"Put the file at {hub} (the torch hub cache; $TORCH_HOME moves it), or set "
        f"loss.lpips_backbone_path=/path/to/{spec.filename}. Tests and debug runs only: "
        f"loss.lpips_pretrained_backbone=false keeps a random backbone (the score is then not LPIPS).")


def load_backbone_state(model: lpips.LPIPS, state: dict[str, torch.Tensor]) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' ``net.slice<k>.<i>.*`` (same module index i).

    lpips cuts ``torchvision.models.<net>().features`` into slices keeping each layer's original index as
    its name, so the mapping is by index; ``classifier.*`` is not part of LPIPS. Every backbone parameter
    must be filled: a partial load would silently leave random layers.
    """
    where = {idx: f"net.{name}.{idx}" for name, sl in model.net.named_children() for idx, _ in sl.named_children()}
    mapped, unused = {}, []
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m is None or m.group(1) not in where:
            unused.append(key)
            continue
        mapped[f"{where[m.group(1)]}.{m.group(2)}"] = value
    expected = {k for k in model.state_dict() if k.startswith("net.")}
    missing, extra = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or extra or any(k.startswith("features.") for k in unused):
        raise RuntimeError(f"backbone weights do not fit lpips' {model.pnet_type} trunk: missing {missing}, "
                           f"unexpected {extra}, unmapped {[k for k in unused if k.startswith('features.')]}")
    model.load_state_dict(mapped, strict=False)


def _load_heads(model: lpips.LPIPS, net: str) -> None:
    """Load the calibrated linear heads shipped in the package, refusing a partial or foreign file.

    (lpips itself loads them with ``strict=False``, which silently keeps random heads on a key mismatch.)"""
    path = head_path(net)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != HEAD_SHA256[net]:
        raise WeightsChecksumError(f"{path} has sha256 {digest}, expected {HEAD_SHA256[net]} (lpips 0.1.4's heads)")
    heads = torch.load(path, map_location="cpu", weights_only=True)
    expected = {k for k in model.state_dict() if re.match(r"lin\d+\.", k)}
    if set(heads) != expected:
        raise RuntimeError(f"{path} holds {sorted(heads)}, lpips' {net} model expects {sorted(expected)}")
    model.load_state_dict(heads, strict=False)


class PerceptualLoss(nn.Module):
    """Frozen LPIPS: ``forward(x, y)`` -> (B,) distances for images in [-1, 1]; always fp32, always eval."""

    def __init__(self, net: Literal["vgg", "alex", "squeeze"] = "vgg", pretrained_backbone: bool = True,
                 backbone_path: Optional[str] = None):
        super().__init__()
        source = find_backbone_file(net, backbone_path) if pretrained_backbone else None  # fail before building
        if source is not None:
            verify_file(source, BACKBONE_FILES[net])
        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated ``pretrained=`` argument; nothing to act on here.
            warnings.filterwarnings("ignore", message=r"The parameter 'pretrained' is deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"Arguments other than a weight enum", category=UserWarning)
            self.model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        _load_heads(self.model, net)
        if source is not None:
            load_backbone_state(self.model, torch.load(source, map_location="cpu", weights_only=True))
        else:
            warnings.warn(f"LPIPS (net={net!r}) with a RANDOM backbone (lpips_pretrained_backbone=false): the "
                          "perceptual term and val/lpips are not LPIPS; use only for tests and debugging.",
                          UserWarning, stacklevel=2)
        self.net, self.pretrained_backbone = net, pretrained_backbone
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # a metric: dropout in the heads must never switch on

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.float(), y.float()).flatten()  # (B,)


__all__ = ["PerceptualLoss", "WeightsFile", "BACKBONE_FILES", "HEAD_SHA256", "MissingWeightsError",
           "WeightsChecksumError", "find_backbone_file", "verify_file", "load_backbone_state", "hub_checkpoint_dir",
           "head_path"]
