"""Checking and repairing one input image before it goes into a shard (used by ``data/shards.py``).

Every image is fully decoded once, because a truncated JPEG only fails when its last rows are decoded.
What can be turned into a correct RGB image is converted (grayscale, CMYK, palette, alpha, 16-bit, a PNG
named ``.JPEG``, other formats); what cannot (zero bytes, not an image, truncated or corrupt data) raises
:class:`BadImage` with the reason, which the writer counts and lists in the index.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image, UnidentifiedImageError


class BadImage(Exception):
    """An input that cannot give a correct image; ``str(e)`` is the reason written to the index."""


@dataclass
class Cleaned:
    ext: str           # "jpg" or "png": the tar member suffix
    data: bytes        # what is stored
    size: tuple[int, int]  # original (width, height)
    fmt: str           # original format as PIL names it
    mode: str          # original PIL mode
    note: Optional[str]  # what was converted, None when the original bytes are kept


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB of any PIL mode; transparency composited on white (black would invent dark borders)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):  # 16/32-bit grayscale (some PNGs): scale to 8 bits before converting
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _encode(im: Image.Image, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def clean_image(data: bytes, *, resize: Optional[int] = None, quality: int = 95,
                lossless: bool = False) -> Cleaned:
    """Check ``data`` and return what to store; raise :class:`BadImage` when no correct image can be had.

    resize: re-encode with the shorter side at most this many pixels (never upscaled); None keeps the
        original bytes whenever they are already an RGB JPEG or PNG.
    lossless: store re-encoded images as PNG (FFHQ) instead of JPEG at ``quality``.
    """
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt, mode, size = im.format or "?", im.mode, im.size
            if resize is not None and fmt == "JPEG" and min(size) > resize:
                # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT when shrinking (much faster).
                im.draft("RGB", (max(1, size[0] * resize // min(size)), max(1, size[1] * resize // min(size))))
            im.load()  # full decode: a truncated file fails here, not at open()
    except UnidentifiedImageError:
        raise BadImage("not an image (PIL cannot identify the bytes)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(f"image too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"corrupt or truncated {fmt if 'fmt' in locals() else 'image'}: {e}") from None
    if min(size) < 1:
        raise BadImage(f"degenerate image size {size}")

    if mode == "RGB" and fmt in ("JPEG", "PNG") and (resize is None or min(size) <= resize):
        return Cleaned("jpg" if fmt == "JPEG" else "png", data, size, fmt, mode, None)  # original bytes
    notes = []
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
    rgb = _to_rgb(im)
    if resize is not None and min(rgb.size) > resize:
        w, h = rgb.size
        s = resize / min(w, h)
        rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        notes.append(f"resized to {rgb.size[0]}x{rgb.size[1]}")
    # Lossless sources stay lossless (PNG/BMP/TIFF...); JPEG sources stay JPEG unless lossless is asked.
    ext = "png" if lossless or (fmt != "JPEG" and resize is None) else "jpg"
    if fmt not in ("JPEG", "PNG"):
        notes.append(f"{fmt} stored as {ext}")
    return Cleaned(ext, _encode(rgb, ext, quality), size, fmt, mode, "; ".join(notes) or None)


__all__ = ["BadImage", "Cleaned", "clean_image"]
