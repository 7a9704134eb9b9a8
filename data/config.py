"""DataConfig: where the training images come from and how they are turned into tensors.

The ``data:`` section of a recipe. Shards are written once by ``launch/prepare_data.py`` (see
``data/shards.py``); the trainer then calls ``build_train_stream(cfg.data, batch_size=..., rank=...,
world_size=..., seed=...)`` and ``build_eval_loader(cfg.data.val_shards, ...)``. Batch size, rank, world
size and seed belong to the trainer and are passed as arguments, never read from the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from vitvq.configs import check

Transform = Literal["resize_crop", "random_resized_crop"]
PixelRange = Literal["minus_one_one", "zero_one"]
Mode = Literal["epoch", "resampled"]


@dataclass
class DataConfig:
    source: Literal["shards", "demo"] = "shards"
    """"shards": read train_shards/val_shards; "demo": scikit-image's photographs, made into shards on first use."""
    train_shards: str = ""
    """Training shards: a path, a brace pattern (x-{000000..000127}.tar), a pipe: command, or the index .json."""
    val_shards: Optional[str] = None
    """Validation shards, same forms as train_shards; null for none."""
    index: Optional[str] = None
    """Index .json giving per-shard counts and sha256 of pipe:/remote shards, matched by file name; train and val
    shards both read it: give both splits' indexes joined by "::" (a-train-index.json::a-val-index.json)."""
    verify_shards: bool = True
    """Check each shard against its index's sha256 the first time a process opens it (data/verify.py); false only
    for a trusted store (saves one read of each shard per process, one download of remote ones is spooled)."""
    demo_root: str = "~/.cache/vitvq/demo"
    """Folder where source="demo" writes its shards (once; later runs reuse them)."""
    image_size: int = 256
    """Side of the square images fed to the model, in pixels."""
    transform: Transform = "resize_crop"
    """Train crop: "resize_crop" (shorter side to image_size, random square crop) or "random_resized_crop"."""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """random_resized_crop: range of the crop's area as a fraction of the image (torchvision uses 0.08-1)."""
    flip: bool = True
    """Random horizontal flip of training images."""
    pixel_range: PixelRange = "minus_one_one"
    """Float pixels in [-1, 1] ("minus_one_one", the model boundary convention) or [0, 1] ("zero_one")."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    shuffle_buffer: int = 1000
    """Samples shuffled together: each worker permutes consecutive blocks of this many (1 = no shuffle)."""
    mode: Mode = "epoch"
    """"epoch": every sample once per epoch over all ranks; "resampled": endless, shards drawn with replacement."""

    def __post_init__(self) -> None:
        check(self.source == "demo" or bool(self.train_shards.strip()), "train_shards", self.train_shards,
              "give the shards to train on (path, brace pattern, pipe: URL or index .json), or set source: demo")
        check(self.image_size >= 8, "image_size", self.image_size, "use a side of at least 8 pixels")
        lo, hi = self.crop_scale
        check(0.0 < lo <= hi <= 1.0, "crop_scale", self.crop_scale, "give (min, max) with 0 < min <= max <= 1")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "use 0 or a positive worker count")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "use 1 (no shuffle) or more")

    @property
    def streams(self) -> int:
        """Independent sample streams per rank: one per worker (one in-process stream when num_workers=0)."""
        return max(1, self.num_workers)


def shard_spec(cfg: DataConfig, split: str) -> Optional[str]:
    """The shard spec of ``split`` ("train" or "val"): as configured, or the built-in demo shards' index (written on
    first use, which takes a file lock and checks every shard: callers resolve it once per run)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if cfg.source == "demo":
        from vitvq.data.builtin import ensure_demo_shards
        return str(ensure_demo_shards(cfg.demo_root, cfg.image_size, split))
    return cfg.train_shards if split == "train" else cfg.val_shards


__all__ = ["shard_spec", "DataConfig", "Transform", "PixelRange", "Mode"]
