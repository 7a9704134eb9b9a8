"""Training stream (exactly resumable) and evaluation loader over webdataset shards.

    stream = build_train_stream(cfg.data, batch_size=32, rank=rank, world_size=world, seed=seed,
                                state=client_state.get("data"))
    for batch in stream:          # endless; batch["image"] (B, 3, H, W) float, batch["label"] (B,) long
        ...
        client_state["data"] = stream.state_dict()   # saved with the checkpoint

Sample order, sharding over ranks and workers, shuffling and augmentation are defined by
``data/cursor.py`` as a function of the seed and of one number: the batches this rank has consumed.
DataLoader worker ``w`` produces the rank's global batches ``c = start + w, start + w + W, ...``
(batch ``c`` is batch ``c // W`` of stream ``c % W``), exactly the order in which the DataLoader hands them
out round-robin. Every batch carries its index and its count of skipped samples; the wrapper here
advances the state only when the consumer receives a batch, so batches prefetched by workers but never
consumed are produced again after a restore, and ``stream.skipped`` counts what the workers met.
Every rank consumes the same number of batches, so the state of any rank restores every rank, and a state of
another layout (world size, batch, workers) puts every rank at the same place: the start of the next epoch.

Nothing here is specific to images but ``Decode`` and the two small functions that turn decoded samples into a
batch (``collate``, in the worker) and that batch into what the caller sees (``finish``, in the training process):
``data/tokens.py`` passes its own three to read stage-2 token shards through the same cursor and state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitvq.data.config import DataConfig, shard_spec
from vitvq.data.cursor import Cursor, range_pieces, read_raw
from vitvq.data.transforms import image_bytes, label_of, load_crop, random_resized_box, square_box, to_float
from vitvq.data.urls import ShardError, ShardList, resolve_shards

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass(frozen=True)
class Decode:
    """Raw sample -> (uint8 (3, size, size), label, key). ``train=False``: centered square, no flip."""
    size: int
    train: bool = True
    transform: str = "resize_crop"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True

    def __call__(self, sample: Optional[dict], rng: Optional[np.random.Generator]) -> tuple[torch.Tensor, int, str]:
        if sample is None:
            raise ValueError("sample missing from a truncated or unreadable shard")
        data, label, key = image_bytes(sample), label_of(sample), sample["__key__"]
        if not self.train or rng is None:
            return load_crop(data, self.size, partial(square_box, rng=None)), label, key
        flip = self.flip and bool(rng.random() < 0.5)  # drawn first: the box draws follow
        if self.transform == "resize_crop":
            box = partial(square_box, rng=rng)
        else:
            box = partial(random_resized_box, rng=rng, scale=self.crop_scale)
        return load_crop(data, self.size, box, flip), label, key


Collate = Callable[[list, dict[str, Any]], dict[str, Any]]  # decoded samples + extra fields -> raw batch (worker)
Finish = Callable[[dict[str, Any]], dict[str, Any]]  # raw batch -> the batch the caller sees (training process)


def _collate(chunk: list, extra: dict[str, Any]) -> dict[str, Any]:
    images, labels, keys = zip(*chunk)
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),  # (B, 3, S, S) uint8
            "key": list(keys), **extra}


def _finish_images(raw: dict[str, Any], pixel_range: str) -> dict[str, Any]:
    return {"image": to_float(raw["image"], pixel_range), "label": raw["label"], "key": raw["key"]}


class _TrainData(IterableDataset):
    def __init__(self, cursor: Cursor, decode: Callable, start: int, collate: Collate = _collate):
        self.cursor, self.decode, self.start, self.collate = cursor, decode, start, collate

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        W, B = self.cursor.streams, self.cursor.batch_size
        c = self.start + (info.id if info else 0)  # this worker's first global batch index
        samples = self.cursor.samples(c % W, c // W, self.decode)
        while True:
            chunk = list(islice(samples, B))
            yield self.collate([d for d, _ in chunk], {"index": c, "skipped": sum(b for _, b in chunk)})
            c += W


class TrainStream:
    """Endless iterable of training batches: ``finish(collate(decoded samples))``; for images (``build_train_stream``)
    {"image": float (B,3,H,W), "label": long (B,), "key": list[str]}."""

    def __init__(self, cursor: Cursor, decode: Callable, num_workers: int, num_classes: int, *, finish: Finish,
                 collate: Collate = _collate):
        self.cursor, self.decode, self.num_workers, self.num_classes = cursor, decode, num_workers, num_classes
        self.finish, self.collate = finish, collate
        self.batches = 0  # consumed by the caller, since the start of training
        self.skipped = 0  # bad samples met in the consumed batches (workers included)

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch on every rank (nominal in resampled mode)."""
        return self.cursor.batches_per_stream * self.cursor.streams

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of each epoch left out so that every rank and worker gets whole, equal batches."""
        c = self.cursor
        return c.total - self.batches_per_epoch * c.batch_size * c.world_size

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        data = _TrainData(self.cursor, self.decode, self.batches, self.collate)
        it = iter(DataLoader(data, batch_size=None, num_workers=self.num_workers)) if self.num_workers else iter(data)
        for raw in it:
            if raw["index"] != self.batches:  # the round-robin order this design relies on was broken
                raise RuntimeError(f"data loader delivered batch {raw['index']}, expected {self.batches}")
            self.batches += 1
            self.skipped += raw["skipped"]
            yield self.finish(raw)

    def _fingerprint(self) -> dict[str, Any]:
        c = self.cursor
        return {"mode": c.mode, "seed": c.seed, "world_size": c.world_size, "streams": c.streams,
                "batch_size": c.batch_size, "shuffle_buffer": c.shuffle_buffer, "num_samples": c.total,
                "num_shards": len(c.urls)}

    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-able: restoring it gives exactly the batches an uninterrupted stream yields next."""
        W = self.cursor.streams
        per_stream = [self.batches // W + (1 if s < self.batches % W else 0) for s in range(W)]
        return {"version": STATE_VERSION, "batches": self.batches, "epoch": self.epoch,
                "batch_in_epoch": self.batches % self.batches_per_epoch,
                "samples_consumed": self.batches * self.cursor.batch_size, "skipped": self.skipped,
                "rank": self.cursor.rank, "config": self._fingerprint(),
                "workers": [self.cursor.where(s, n) for s, n in enumerate(per_stream)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` (any rank's) left off; from another data layout, as :meth:`_handover`
        says (rank 0 logs what it did)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        old, new = state["config"], self._fingerprint()
        self.skipped = state["skipped"] if state.get("rank") == self.cursor.rank else 0  # per-rank count
        if old == new:
            self.batches = state["batches"]
            return
        self.batches, note = self._handover(state)
        if self.cursor.rank == 0:
            changed = ", ".join(f"{k.replace('_', ' ')} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
            log.warning("%s %s", changed, note)

    def _handover(self, state: dict[str, Any]) -> tuple[int, str]:
        """Position of this stream after ``state`` of another layout (world size, batch, workers, dataset), and what
        that means, in words. The old order cannot continue on the new slots, so (README, "Changing the world size"):

        - epoch mode: the start of the next epoch, in this layout. The unread samples of the interrupted epoch are
          passed over (none if it stopped on a boundary), so no sample is read twice in an epoch, and every rank
          starts at the same epoch since the state of any old rank gives the same answer;
        - resampled mode: this layout's streams at the same nominal position (samples consumed by all ranks).
        """
        old = state["config"]
        slot_batch = old["world_size"] * old["batch_size"]  # samples all old ranks read per rank batch
        per_epoch = (old["num_samples"] // (slot_batch * old["streams"])) * old["streams"]  # old batches per epoch
        epoch, done = int(state["epoch"]), int(state["batch_in_epoch"])
        read = f"epoch {epoch}, {100 * done // max(per_epoch, 1)}% read"
        if self.cursor.mode == "resampled":
            seen = int(state["batches"]) * slot_batch
            batches = seen // (self.cursor.world_size * self.cursor.batch_size)
            return batches, (f"(nominal {read}): continuing this layout's streams at the same nominal position, "
                             f"{seen} samples into the run (epoch {batches // self.batches_per_epoch})")
        if done == 0:
            return epoch * self.batches_per_epoch, (f"(at the end of epoch {epoch - 1}): continuing at the start of "
                                                    f"epoch {epoch}; no sample passed over")
        unread = (per_epoch - done) * slot_batch
        return (epoch + 1) * self.batches_per_epoch, (f"({read}): continuing at the start of epoch {epoch + 1}; "
                                                      f"{unread} samples of epoch {epoch} not read")


def verified(shards: ShardList, verify: bool) -> ShardList:
    """``shards`` with their index sha256 kept for checking on first open (``data/verify.py``), or dropped."""
    return shards if verify else replace(shards, sha256=())


def checked_cursor(shards: ShardList, cfg: Any, *, batch_size: int, rank: int, world_size: int, seed: int,
                   field: str = "data.train_shards", more_shards: str = "write more, smaller shards "
                   "(launch/prepare_data.py --shard-size)") -> Cursor:
    """The sample cursor of ``rank``, refusing shard lists that cannot feed every rank and worker before training.
    ``cfg`` has ``mode``, ``streams``, ``shuffle_buffer`` and ``verify_shards``; ``field`` (``section.name``) is
    named in the errors."""
    if not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1 (got {rank}, {world_size}, {batch_size})")
    section = field.split(".")[0]
    slots = world_size * cfg.streams
    if shards.total == 0:
        raise ShardError(f"{field}={shards.spec!r} holds no samples")
    if cfg.mode == "epoch" and len(shards.urls) < slots:
        raise ShardError(
            f"{field} has {len(shards.urls)} shards but epoch mode needs at least world_size x "
            f"num_workers = {world_size} x {cfg.streams} = {slots}: {more_shards}, lower {section}.num_workers, "
            f"or set {section}.mode=resampled")
    if shards.total < slots * batch_size:
        raise ShardError(f"{shards.total} samples cannot give one batch of {batch_size} to each of {slots} "
                         f"streams (world_size x num_workers): lower the batch size or {section}.num_workers")
    return Cursor(shards.urls, shards.counts, cfg.mode, rank, world_size, cfg.streams, batch_size, seed,
                  cfg.shuffle_buffer, verified(shards, cfg.verify_shards).sha256)


def start_stream(stream: TrainStream, state: Optional[dict], epoch: int = 0) -> TrainStream:
    """Position a new stream: restored from ``state``, else at the start of ``epoch``."""
    if state is not None:
        stream.load_state_dict(state)
    else:
        stream.batches = epoch * stream.batches_per_epoch
    return stream


def build_train_stream(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                       state: Optional[dict] = None, epoch: int = 0, shards: Optional[str] = None) -> TrainStream:
    """The training stream of ``rank`` of ``world_size``; refuses unusable shard lists before training.
    ``shards`` is the resolved spec (``shard_spec(cfg, "train")``, the default) for callers that hold it already."""
    spec = shards if shards is not None else shard_spec(cfg, "train")
    listed = resolve_shards(spec, cfg.index, what="data.train_shards")
    cursor = checked_cursor(listed, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    decode = Decode(cfg.image_size, True, cfg.transform, tuple(cfg.crop_scale), cfg.flip)
    stream = TrainStream(cursor, decode, cfg.num_workers, listed.num_classes,
                         finish=partial(_finish_images, pixel_range=cfg.pixel_range))
    return start_stream(stream, state, epoch)


class _EvalData(IterableDataset):
    def __init__(self, shards: ShardList, ranges: list[tuple[int, int]], decode: Callable, batch_size: int,
                 collate: Collate = _collate):
        self.shards, self.ranges, self.decode, self.batch_size, self.collate = shards, ranges, decode, batch_size, collate

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        a, b = self.ranges[info.id if info else 0]
        order = range(len(self.shards.urls))  # evaluation reads in index order, no shuffle
        chunk, bad = [], 0
        for sample in read_raw(range_pieces(self.shards.urls, self.shards.counts, order, a, b), self.shards.sha256):
            try:
                chunk.append(self.decode(sample, None))
            except Exception as exn:  # noqa: BLE001 - skipped and counted, never duplicated
                bad += 1
                log.warning("skipping bad eval sample %s: %r", (sample or {}).get("__key__"), exn)
            if len(chunk) == self.batch_size:
                yield self.collate(chunk, {"skipped": bad})
                chunk, bad = [], 0
        if chunk or bad:
            yield self.collate(chunk, {"skipped": bad}) if chunk else {"skipped": bad}  # no "key": nothing to yield


class EvalLoader:
    """Batches ``finish(collate(decoded samples))`` of this rank's share (images: {"image", "label", "key"}): every
    sample exactly once over all ranks."""

    def __init__(self, shards: ShardList, decode: Callable, batch_size: int, rank: int, world_size: int,
                 num_workers: int, *, finish: Finish, collate: Collate = _collate):
        total = shards.total
        a, b = rank * total // world_size, (rank + 1) * total // world_size  # shares differ by <= 1 sample
        self.num_samples = b - a
        streams = max(1, min(num_workers, self.num_samples))
        self.ranges = [(a + w * (b - a) // streams, a + (w + 1) * (b - a) // streams) for w in range(streams)]
        self.data = _EvalData(shards, self.ranges, decode, batch_size, collate)
        self.num_workers, self.finish, self.batch_size = (streams if num_workers else 0), finish, batch_size
        self.skipped = 0

    def __len__(self) -> int:
        return sum(math.ceil((hi - lo) / self.batch_size) for lo, hi in self.ranges)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = 0
        it = DataLoader(self.data, batch_size=None, num_workers=self.num_workers) if self.num_workers else self.data
        for raw in it:
            self.skipped += raw["skipped"]
            if "key" in raw:
                yield self.finish(raw)


def build_eval_loader(shards: str, *, image_size: int, batch_size: int, rank: int, world_size: int,
                      num_workers: int = 0, pixel_range: str = "minus_one_one", index: Optional[str] = None,
                      verify: bool = True) -> EvalLoader:
    """Center-cropped evaluation batches of ``rank``'s contiguous share of ``shards`` (no padding, no
    duplicates; the last batch of each worker may be smaller, and ranks may differ by one batch). ``index``: as
    ``data.index`` (remote shards need it); ``verify``: check shards against the index's sha256 on first open."""
    listed = verified(resolve_shards(shards, index, what="data.val_shards"), verify)
    if listed.total == 0:
        raise ShardError(f"data.val_shards={shards!r} holds no samples")
    return EvalLoader(listed, Decode(image_size, train=False), batch_size, rank, world_size, num_workers,
                      finish=partial(_finish_images, pixel_range=pixel_range))


__all__ = ["TrainStream", "EvalLoader", "build_train_stream", "build_eval_loader", "Decode", "checked_cursor",
           "start_stream", "verified"]
