"""Image bytes -> square uint8 tensor: crop box chosen first, JPEG draft decoding, one antialiased resize.

Where the time goes when feeding a tokenizer (``benchmarks/data_throughput.py``): the JPEG decode and the
resize. Three levers, each keeping the result a faithful resize of the chosen region:
- the crop box is chosen in the original image's coordinates *before* decoding, so
- ``Image.draft`` can let libjpeg decode at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients
  whenever the box is at least twice the output size (large photos, FFHQ-size inputs), and
- only the cropped region is resized, with torch's antialiased bicubic kernel on uint8 channels-last
  data (several times faster than PIL's bicubic on one core).
Pixels stay uint8 until the batch reaches the training process (4x less to send from workers); the float
conversion into the configured range happens there, on the whole batch (``to_float``).
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Box = tuple[int, int, int, int]  # (left, top, width, height) in original pixels


def square_box(w: int, h: int, rng: np.random.Generator | None) -> Box:
    """Largest square: at a random position (train "resize_crop"), or centered when ``rng`` is None."""
    s = min(w, h)
    if rng is None:
        return (w - s) // 2, (h - s) // 2, s, s
    return int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1)), s, s


def random_resized_box(w: int, h: int, rng: np.random.Generator, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Inception-style crop (torchvision RandomResizedCrop's sampling): area fraction in ``scale``, aspect
    ratio log-uniform in ``ratio``; ten tries, then the centered largest square."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    return square_box(w, h, None)


def load_crop(data: bytes, size: int, choose_box: Callable[[int, int], Box], flip: bool = False) -> torch.Tensor:
    """Decode ``data``, crop the box ``choose_box(width, height)`` and resize it to ``size``; (3, size, size) uint8."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    x0, y0, cw, ch = choose_box(w, h)
    k = min(cw, ch) / size  # downscale factor of the box
    scale = 1.0
    if k >= 2 and im.format == "JPEG":
        # Ask for an image no smaller than (w/k, h/k): libjpeg then picks a DCT scale of at most k, so the
        # box still has >= size pixels per side after draft decoding and the final resize only shrinks.
        got = im.draft("RGB", (math.ceil(w / k), math.ceil(h / k)))
        if got is not None:
            scale = w / got[1][2]
    dw, dh = im.size
    left, top = min(int(x0 / scale), dw - 1), min(int(y0 / scale), dh - 1)
    right = max(min(math.ceil((x0 + cw) / scale), dw), left + 1)
    bottom = max(min(math.ceil((y0 + ch) / scale), dh), top + 1)
    region = im.crop((left, top, right, bottom))
    if region.mode != "RGB":
        region = region.convert("RGB")  # grayscale / CMYK / palette shards written by other tools
    x = torch.from_numpy(np.array(region)).permute(2, 0, 1)  # (3, h, w), channels-last strides
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True)[0]
    if flip:
        x = x.flip(-1)
    return x.contiguous()  # (3, size, size) uint8


def to_float(images: torch.Tensor, pixel_range: str) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] ("minus_one_one") or [0, 1] ("zero_one")."""
    x = images.float()
    if pixel_range == "zero_one":
        return x.div_(255.0)
    return x.div_(127.5).sub_(1.0)


def image_bytes(sample: dict) -> bytes:
    """The image member of a webdataset sample (keys as the writer stores them, or common alternatives)."""
    for ext in ("jpg", "png", "jpeg", "webp", "ppm", "bmp", "tif", "tiff"):
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')} has no image member (keys {sorted(sample)})")


def label_of(sample: dict) -> int:
    """Class index from the ``cls`` member, -1 when absent (unconditional data such as FFHQ)."""
    raw = sample.get("cls")
    return int(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else -1


__all__ = ["square_box", "random_resized_box", "load_crop", "to_float", "image_bytes", "label_of", "Box"]
