"""The deterministic sample cursor behind the training stream: which samples each worker reads, in what order.

webdataset's own pipeline cannot resume mid-epoch (its shuffle buffer and worker split are not
reproducible from a small state), so the order is defined here as a pure function of
(seed, epoch, rank, stream, position), and the tars are read with webdataset's tar iterators:

- A rank runs ``streams`` independent sample streams (one per DataLoader worker). Stream ``s`` of rank
  ``r`` is slot ``g = r * streams + s`` of ``world_size * streams`` slots.
- Epoch mode: shards are put in a seeded per-epoch order and their samples concatenated; slot ``g`` reads
  the contiguous range ``[g*M, (g+1)*M)`` with ``M = K * batch_size``, ``K = total // (slots * batch_size)``
  batches per stream. Every stream (so every rank) yields exactly ``K`` batches per epoch, no sample is
  read twice, and fewer than ``slots * batch_size`` samples (the tail of that epoch's order, different
  each epoch) are left out. A range may start inside a shard: the reader skips members without reading
  their contents.
- Resampled mode: each stream concatenates shards drawn with replacement, in rounds of ``num_shards``
  seeded draws, endlessly.
- Shuffle: each stream's sequence is cut into blocks of ``shuffle_buffer`` samples and each block is
  permuted by a seeded RNG. Resuming at any position re-reads at most one block, never a whole epoch.
- Augmentation randomness of the sample at a position comes from its own RNG seeded by the position, so it
  does not depend on what was decoded before (resumed or not, with or without bad samples).
- A sample that cannot be decoded is counted at its position and replaced by the next good sample of its
  block (in block order), so batches keep their size and every rank its batch count.
- A shard is checked against its index's sha256 the first time a process opens it (``data/verify.py``); a
  mismatch stops the stream, unlike a missing or damaged shard, whose lost samples are counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from webdataset.gopen import Pipe
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from vitvq.data.verify import ShardMismatch, open_verified

log = logging.getLogger(__name__)

# Tags that keep the RNG streams of different purposes apart.
_ORDER, _DRAW, _PERM, _AUG = 11, 12, 13, 14
_EPOCH, _RESAMPLED = 0, 1


@dataclass(frozen=True)
class Piece:
    """``count`` consecutive samples of shard ``shard`` starting after its first ``skip`` samples."""
    url: str
    shard: int
    skip: int
    count: int


def range_pieces(urls: tuple[str, ...], counts: tuple[int, ...], order: Iterable[int], a: int, b: int) -> list[Piece]:
    """Pieces covering positions [a, b) of the concatenation of shards in ``order``."""
    out, cum = [], 0
    for i in order:
        lo, hi = max(a, cum), min(b, cum + counts[i])
        if lo < hi:
            out.append(Piece(urls[i], int(i), lo - cum, hi - lo))
        cum += counts[i]
        if cum >= b:
            break
    return out


def _warn_tar(exn: Exception) -> bool:
    # Tar-level trouble (truncated or unreadable shard): warn and go on; the samples it loses are
    # counted where they were expected (read_raw pads with None). Unlike wds.warn_and_continue, no sleep.
    log.warning("shard read error, continuing: %r", exn)
    return True


def read_raw(pieces: Iterable[Piece], sha256: Sequence[Optional[str]] = ()) -> Iterator[Optional[dict]]:
    """Raw webdataset samples of each piece in turn; exactly ``count`` items per piece (None where missing).
    ``sha256[p.shard]``: the digest shard ``p.shard`` must have (empty or None: read unverified)."""
    for p in pieces:
        seen = {"n": 0, "last": None}

        def select(fname: str) -> bool:  # skip the first p.skip samples without reading their members
            key, _ = base_plus_ext(fname)
            if key != seen["last"]:
                seen["n"], seen["last"] = seen["n"] + 1, key
            return seen["n"] > p.skip

        got = 0
        try:
            stream = open_verified(p.url, sha256[p.shard] if sha256 else None)
        except ShardMismatch:
            raise  # a changed shard must stop the run, not lose its samples quietly
        except Exception as exn:  # noqa: BLE001 - a missing/unreachable shard loses its samples, counted
            _warn_tar(exn)
            stream = None
        if stream is not None:
            try:
                files = tar_file_expander([{"url": p.url, "stream": stream}], handler=_warn_tar, select_files=select)
                for sample in islice(group_by_keys(files, handler=_warn_tar), p.count):
                    got += 1
                    yield sample
            finally:
                if isinstance(stream, Pipe):
                    stream.ignore_errors = True  # closing early makes `cat` exit on SIGPIPE: not an error
                stream.close()
        if got < p.count:
            log.warning("shard %s gave %d of the %d samples expected after position %d", p.url, got, p.count, p.skip)
            yield from [None] * (p.count - got)


@dataclass(frozen=True)
class Cursor:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    mode: str
    rank: int
    world_size: int
    streams: int
    batch_size: int
    seed: int
    shuffle_buffer: int
    sha256: tuple[Optional[str], ...] = ()  # per shard, checked on first open; empty: no verification

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def batches_per_stream(self) -> int:
        """K: batches each stream yields per epoch (also the nominal epoch length in resampled mode)."""
        return self.total // (self.world_size * self.streams * self.batch_size)

    def slot(self, s: int) -> int:
        return self.rank * self.streams + s

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _ORDER, epoch]).permutation(len(self.urls))

    def epoch_pieces(self, epoch: int, s: int, start: int) -> list[Piece]:
        m = self.batches_per_stream * self.batch_size
        a = self.slot(s) * m
        return range_pieces(self.urls, self.counts, self.epoch_order(epoch), a + start, a + m)

    def resampled_pieces(self, s: int, start: int) -> Iterator[Piece]:
        counts, n, pos, v = np.asarray(self.counts), len(self.urls), 0, 0
        while True:
            draws = np.random.default_rng([self.seed, _DRAW, self.rank, s, v]).integers(0, n, size=n)
            if pos + int(counts[draws].sum()) <= start:  # whole round before the start: skip it quickly
                pos, v = pos + int(counts[draws].sum()), v + 1
                continue
            for d in draws:
                c = int(counts[d])
                if pos + c > start and c > 0:
                    off = max(0, start - pos)
                    yield Piece(self.urls[d], int(d), off, c - off)
                pos += c
            v += 1

    def where(self, s: int, batches: int) -> dict[str, Any]:
        """Human-readable position of stream ``s`` after it has yielded ``batches`` batches."""
        k, b = self.batches_per_stream, self.batch_size
        if self.mode == "epoch":
            epoch, pos = batches // k, (batches % k) * b
            pieces = self.epoch_pieces(epoch, s, pos)
            order = [int(i) for i in self.epoch_order(epoch)]
            first = pieces[0] if pieces else None
            list_pos = order.index(first.shard) if first else len(order)
        else:
            epoch, pos = batches // max(k, 1), batches * b
            first, list_pos = next(self.resampled_pieces(s, pos)), None
        return {"stream": s, "epoch": epoch, "batches": batches, "sample": pos, "shard_order_position": list_pos,
                "shard": first.url if first else None, "sample_in_shard": first.skip if first else None}

    def samples(self, s: int, batches: int, decode: Callable[[Optional[dict], np.random.Generator], Any]
                ) -> Iterator[tuple[Any, int]]:
        """(decoded sample, 1 if its own sample was bad else 0) of stream ``s`` from batch ``batches`` on."""
        k, b, size = self.batches_per_stream, self.batch_size, self.shuffle_buffer
        if self.mode == "resampled":
            start = batches * b
            first = start // size
            raw = read_raw(self.resampled_pieces(s, first * size), self.sha256)
            yield from self._blocks(raw, first, start, None, (_RESAMPLED, self.rank, s), decode)
            return
        epoch, m = batches // k, k * b
        start = (batches % k) * b
        while True:
            first = start // size
            raw = read_raw(self.epoch_pieces(epoch, s, first * size), self.sha256)
            yield from self._blocks(raw, first, start, m, (_EPOCH, epoch, self.slot(s)), decode)
            epoch, start = epoch + 1, 0

    def _blocks(self, raw: Iterator[Optional[dict]], block: int, start: int, end: Optional[int],
                key: tuple[int, ...], decode: Callable) -> Iterator[tuple[Any, int]]:
        size = self.shuffle_buffer
        while end is None or block * size < end:
            n = size if end is None else min(size, end - block * size)
            items = list(islice(raw, n))
            perm = np.random.default_rng([self.seed, _PERM, *key, block]).permutation(n)
            bad: set[int] = set()  # known-bad indices of this block: decoding is deterministic
            for q in range(max(0, start - block * size), n):
                yield self._decode(items, perm, q, block * size + q, key, bad, decode)
            block += 1

    def _decode(self, items: list, perm: np.ndarray, q: int, pos: int, key: tuple[int, ...], bad: set[int],
                decode: Callable) -> tuple[Any, int]:
        n = len(items)
        for t in range(n):
            idx = int(perm[(q + t) % n])
            if idx in bad:
                continue
            rng = np.random.default_rng([self.seed, _AUG, *key, pos])  # fresh per try: same result on resume
            try:
                return decode(items[idx], rng), int(t > 0)  # t > 0: its own sample was bad
            except Exception as exn:  # noqa: BLE001 - any undecodable sample is skipped and counted
                bad.add(idx)
                if items[idx] is not None:  # missing samples were reported once per shard by read_raw
                    log.warning("skipping bad sample %s of %s: %r", items[idx].get("__key__"),
                                items[idx].get("__url__"), exn)
        raise RuntimeError(f"no readable sample in a whole shuffle block of {n} (position {pos}): the shards are "
                           "damaged beyond skipping; rewrite them with launch/prepare_data.py")


__all__ = ["Cursor", "Piece", "range_pieces", "read_raw"]
