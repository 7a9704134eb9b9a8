"""Shard verification: a shard's bytes are checked against the sha256 its index records before any sample of it
is used, the first time a process opens it (issue 20.5: a swapped or changed shard used to train silently).

Hashed before first use rather than while the tar is read, because the reader stops where its piece ends (a
worker's range of an epoch usually ends inside a shard, so a running hash would be incomplete) and hands samples
on as it goes (a running hash could only fail after the shard's samples were trained on). Hashing first means that
nothing of an unverified shard is ever decoded:

- a local shard is read once through the hash (sha256 runs at about 1-2 GB/s per core, far above what decoding
  consumes); the read that follows comes from the page cache. ``benchmarks/data_throughput.py`` prints the cost;
- a remote shard (``pipe:`` command or URL) is downloaded once, through the hash, into an unnamed temporary file
  (in ``$TMPDIR``, deleted when closed; one shard per reader at a time) that the reader then reads: as many
  downloads as without verification, but its first sample waits for the whole shard.

Verified (url, sha256) pairs are remembered per process (DataLoader workers forked later inherit them), so later
epochs read verified shards directly. Shards without a recorded sha256 (counted from their tar headers because no
index lists them) are read unverified. ``data.verify_shards: false`` skips all of this, for trusted stores.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import IO, Any, Optional

from webdataset.gopen import gopen

from vitvq.data.shards import sha256_file
from vitvq.data.urls import ShardError, is_local, shard_name

_CHUNK = 1 << 20
_verified: set[tuple[str, str]] = set()  # (url, sha256) pairs this process has checked


class ShardMismatch(ShardError):
    """A shard whose bytes differ from what its index records."""


def mismatch(url: str, expected: str, actual: str) -> ShardMismatch:
    return ShardMismatch(
        f"shard {shard_name(url)} ({url}) does not match its index: sha256 {actual}, the index records {expected}. "
        "The shard was changed or swapped after it was written: restore the original shard, or re-run the same "
        "launch/prepare_data.py command (launch/encode_tokens.py for token shards), which rewrites the shards that "
        "do not match, or, for a trusted store rewritten on purpose, set data.verify_shards=false "
        "(tokens.verify_shards for token shards)")


def _copy_hashed(src: IO[bytes], dst: IO[bytes]) -> str:
    """Copy ``src`` to ``dst``; the sha256 of what was copied."""
    h = hashlib.sha256()
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        h.update(chunk)
        dst.write(chunk)
    return h.hexdigest()


def open_verified(url: str, sha256: Optional[str]) -> Any:
    """``gopen(url)``, after checking the shard against ``sha256`` if this process has not yet done so;
    raises :class:`ShardMismatch` naming the shard, both digests and the fix. ``sha256=None``: no check."""
    if sha256 is None or (url, sha256) in _verified:
        return gopen(url)
    if is_local(url):
        actual = sha256_file(url)
        if actual != sha256:
            raise mismatch(url, sha256, actual)
        _verified.add((url, sha256))
        return gopen(url)
    spool = tempfile.TemporaryFile()
    try:
        src = gopen(url)
        try:
            actual = _copy_hashed(src, spool)
        finally:
            src.close()  # a failed download (non-zero exit) raises here: unreachable, not mismatched
        if actual != sha256:
            raise mismatch(url, sha256, actual)
    except BaseException:
        spool.close()
        raise
    _verified.add((url, sha256))
    spool.seek(0)
    return spool


def forget_verified() -> None:
    """Check every shard again on its next open (tests; a process that knows its store changed)."""
    _verified.clear()


__all__ = ["ShardMismatch", "open_verified", "forget_verified", "mismatch"]
