"""Built-in demo data: real photographs that need no download, made into shards on first use.

scikit-image ships a few photographs inside its wheel (``skimage/data/*.png|jpg``: the astronaut, the
cat Chelsea, coffee, a rocket, motorcycles, a retina, the Hubble deep field...). Others in
``skimage.data`` are fetched over the network by pooch; only files present in the installed package are
used, read straight from the folder (no skimage call that could reach for the network).

Each photo becomes many deterministic square crops of random position and scale, resized to
``image_size`` (64 px by default, for the CPU demo of stage 1): 4096 training crops from the left 80% of
every photo and 512 validation crops from the held-out right 20%, so validation pixels are never trained
on. Labels are the photo's index (a 15-class conditional toy set). Generation takes a few seconds; the
shards and their index (same format as ``launch/prepare_data.py``) are reused afterwards.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from vitvq.data.shards import _add, sha256_file
from vitvq.data.urls import INDEX_FORMAT, index_path

# Photographs (not drawings or synthetic patterns); grayscale ones are stored as RGB.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "retina.jpg", "hubble_deep_field.jpg", "ihc.png",
          "camera.png", "moon.png", "coins.png", "grass.png", "gravel.png", "brick.png")
SPLITS = {"train": (4096, 256, (0.0, 0.8)), "val": (512, 128, (0.8, 1.0))}  # crops, per shard, x-range
VERSION = 1


def skimage_photos() -> list[Path]:
    """The photographs of PHOTOS present in the installed scikit-image package."""
    import skimage  # only to locate its data folder
    folder = Path(skimage.__file__).parent / "data"
    found = [folder / name for name in PHOTOS if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no sample photographs in {folder}: reinstall scikit-image (pip install scikit-image)")
    return found


def _crops(photos: list[Image.Image], names: list[str], n: int, size: int, xrange: tuple[float, float], seed: int):
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % len(photos)
        im = photos[label]
        w, h = im.size
        x_lo, x_hi = int(xrange[0] * w), int(xrange[1] * w)
        side_max = min(x_hi - x_lo, h)
        side_min = min(side_max, max(size // 2, side_max // 6))  # at most 2x upscaling, mostly downscaling
        side = int(rng.integers(side_min, side_max + 1))
        x = int(rng.integers(x_lo, x_hi - side + 1))
        y = int(rng.integers(0, h - side + 1))
        crop = im.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=95, subsampling=0)
        yield f"{i:06d}_{label:02d}", buf.getvalue(), label, {"src": names[label], "box": [x, y, side, side]}


def _write_split(out: Path, split: str, photos: list[Image.Image], names: list[str], size: int) -> Path:
    n, per_shard, xrange = SPLITS[split]
    shards, cur, tar, count = [], None, None, 0

    def close() -> None:
        tar.close()
        cur.close()
        final = out / shards[-1]["name"]
        os.replace(f"{final}.tmp", final)
        shards[-1].update(bytes=final.stat().st_size, sha256=sha256_file(final))

    for j, (key, data, label, meta) in enumerate(_crops(photos, names, n, size, xrange, seed=1 + (split == "val"))):
        if j % per_shard == 0:
            if tar is not None:
                close()
            shards.append({"name": f"demo-{split}-{len(shards):06d}.tar", "samples": 0})
            cur = open(out / f"{shards[-1]['name']}.tmp", "wb")
            tar = tarfile.open(fileobj=cur, mode="w")
        _add(tar, f"{key}.jpg", data)
        _add(tar, f"{key}.cls", str(label).encode())
        _add(tar, f"{key}.json", json.dumps(meta).encode())
        shards[-1]["samples"] += 1
        count += 1
    close()
    index = {"format": INDEX_FORMAT, "name": "demo", "split": split, "kind": "demo", "complete": True,
             "num_samples": count, "num_classes": len(photos), "classes": names,
             "args": {"version": VERSION, "image_size": size, "photos": names},
             "source": "scikit-image sample photographs", "shards": shards,
             "num_skipped": 0, "skipped": [], "converted": []}
    path = index_path(out, "demo", split)
    path.write_text(json.dumps(index, indent=1))
    return path


def _valid(path: Path, size: int, names: list[str]) -> bool:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if index.get("args") != {"version": VERSION, "image_size": size, "photos": names}:
        return False
    return all((path.parent / s["name"]).is_file() and (path.parent / s["name"]).stat().st_size == s["bytes"]
               for s in index["shards"])


def ensure_demo_shards(root: str | Path, image_size: int = 64, split: str = "train") -> Path:
    """Index path of the demo ``split`` ("train" or "val") at ``image_size``, writing both splits if needed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, not {split!r}")
    out = Path(os.path.expanduser(str(root))) / f"demo{image_size}"
    out.mkdir(parents=True, exist_ok=True)
    files = skimage_photos()
    names = [f.name for f in files]
    with open(out / ".lock", "w") as lock:  # several ranks on one machine: one writes, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(_valid(index_path(out, "demo", s), image_size, names) for s in SPLITS):
            photos = [Image.open(f).convert("RGB") for f in files]
            for s in SPLITS:
                _write_split(out, s, photos, names, image_size)
    return index_path(out, "demo", split)


__all__ = ["ensure_demo_shards", "skimage_photos", "PHOTOS"]
