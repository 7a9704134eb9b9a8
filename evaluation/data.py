"""What to evaluate: the ``Source`` of images (a folder, an ``.npz`` of uint8 NHWC samples, or webdataset shards)
and how an evaluation worker reads its slice of it.

Folders and ``.npz`` files are addressed by global sample index (``IndexedData``), so workers can stride over them
and the Inception Score splits stay the same for any number of workers; shards go through
``data.build_eval_loader`` (``shard_batches``). Resizing is the evaluation crop of the data pipeline: centered
largest square, one antialiased bicubic resize (``data.transforms.load_crop``). Used by ``vitvq.evaluation.workers``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from vitvq.evaluation.metrics import to_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Source:
    """Images to evaluate: exactly one of a folder, an ``.npz`` of uint8 NHWC images, or webdataset shards."""

    images: Optional[str] = None
    npz: Optional[str] = None
    shards: Optional[str] = None
    resolution: Optional[int] = None  # center crop + resize to this; None keeps the stored size (samples)
    npz_key: str = "arr_0"
    limit: Optional[int] = None  # the first N samples (folders and .npz only)
    index: Optional[str] = None  # shards: the dataset index(es), ``a.json::b.json`` (remote shards need one)
    verify: bool = True  # shards: check each one against the index's sha256 the first time it is opened

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.images, self.npz, self.shards)) != 1:
            raise ValueError("give exactly one of images=DIR, npz=FILE, shards=SPEC")
        if self.shards is not None and self.limit is not None:
            raise ValueError("limit applies to folders and .npz files; for shards, pass fewer shards")

    @property
    def indexed(self) -> bool:
        return self.shards is None

    def describe(self) -> dict[str, Any]:
        crop = ("as stored" if self.resolution is None else f"centered largest square, antialiased bicubic resize to "
                f"{self.resolution}x{self.resolution} (data.transforms.load_crop, as data.build_eval_loader)")
        where = str(Path(self.images or self.npz).resolve()) if self.indexed else str(self.shards)
        return {"source": where, "crop": crop,
                "resolution": self.resolution if self.resolution is not None else "as stored"}


def list_images(root: str | Path) -> list[Path]:
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return files


def load_image(path: Path, size: Optional[int]) -> np.ndarray:
    """(H, W, 3) uint8: as stored, or the evaluation crop of the data pipeline (centered largest square, one
    antialiased bicubic resize: ``data.transforms.load_crop``), so a folder and shards of the same photos give
    the same pixels."""
    if size is None:
        return np.asarray(Image.open(path).convert("RGB"))
    from vitvq.data.transforms import load_crop, square_box
    return load_crop(path.read_bytes(), size, lambda w, h: square_box(w, h, None)).permute(1, 2, 0).numpy()


def crop_array(arr: np.ndarray, size: int) -> np.ndarray:
    """The same evaluation crop for an already decoded (H, W, 3) uint8 image."""
    h, w = arr.shape[:2]
    s = min(h, w)
    x = torch.from_numpy(np.ascontiguousarray(arr[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]))
    x = x.permute(2, 0, 1)[None]  # (1, 3, s, s) uint8
    if s != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    return x[0].permute(1, 2, 0).numpy()


def open_npz_array(path: str | Path, key: str = "arr_0") -> np.ndarray:
    """The array ``key`` of an ``.npz``, memory-mapped when stored uncompressed (np.savez), so that each worker
    reads only its slice of a 50k-sample file instead of loading all of it."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path) as z:
            return z[key]
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header; name and extra-field lengths at bytes 26..30
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


class IndexedData:
    """A folder or an .npz, addressed by global sample index."""

    def __init__(self, src: Source):
        self.src = src
        if src.images is not None:
            self.files: Optional[list[Path]] = list_images(src.images)
            n = len(self.files)
        else:
            self.files = None
            self.arr = open_npz_array(src.npz, src.npz_key)
            if self.arr.ndim != 4 or self.arr.shape[-1] != 3 or self.arr.dtype != np.uint8:
                raise ValueError(f"{src.npz}[{src.npz_key}] must be uint8 (N, H, W, 3) images as the ADM evaluator "
                                 f"takes, got {self.arr.dtype} {self.arr.shape}")
            n = len(self.arr)
        self.n = min(n, src.limit) if src.limit is not None else n

    def load(self, idx: np.ndarray) -> torch.Tensor:
        if self.files is not None:
            arr = np.stack([load_image(self.files[i], self.src.resolution) for i in idx])
        else:
            arr = np.asarray(self.arr[idx])  # reads only these rows of a memory-mapped file
            if self.src.resolution:
                arr = np.stack([crop_array(a, self.src.resolution) for a in arr])
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8


def shard_batches(loader: Any) -> Iterator[tuple[torch.Tensor, list]]:
    """(images, keys) batches of a ``data.build_eval_loader`` loader."""
    for batch in loader:
        yield to_uint8(batch["image"]), list(batch["key"])  # (B, 3, H, W) uint8 from [-1, 1], exact round trip


__all__ = ["IMAGE_SUFFIXES", "Source", "IndexedData", "list_images", "load_image", "crop_array", "open_npz_array",
           "shard_batches"]
