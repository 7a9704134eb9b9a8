"""Shard writer: a listed dataset (``data/sources.py``) written as webdataset tar shards plus an index.

Run through ``launch/prepare_data.py``. Output in ``--out``:
- ``<name>-<split>-NNNNNN.tar``: per sample ``<key>.jpg`` or ``<key>.png``, ``<key>.cls`` (class index as
  text, absent when unconditional) and ``<key>.json`` (source path, original size, format, mode, note);
- ``<name>-<split>-index.json``: shard names, samples per shard, sha256 per shard, totals, class names, the
  arguments used, and every skipped file with its reason (read by ``data/urls.py`` for sample counts).

Samples are shuffled once (seeded) before sharding: ImageNet listed in synset order would otherwise put one
or two classes in each shard, and the stream's block shuffle could not mix classes within a batch.
Re-running completes what is missing: a shard is planned from its file list (names, sizes, options), and an
existing shard is kept when its plan and its sha256 match the index. Shards are written to a temporary
name and renamed atomically, and the index is rewritten every few seconds, so an interrupted run loses
only the shards of the last seconds. Tar headers carry fixed times and owners, so a rewrite gives identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import tarfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from vitvq.data.clean import BadImage, clean_image
from vitvq.data.sources import Item, Listing
from vitvq.data.urls import INDEX_FORMAT, index_path


@dataclass(frozen=True)
class WriteOptions:
    name: str
    split: str = "train"
    resize: Optional[int] = None
    quality: int = 95
    lossless: bool = False
    shard_size: int = 1000
    shard_bytes: int = 1 << 30
    workers: int = 1
    seed: Optional[int] = 0  # None keeps the listing order


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(gidx: int, path: str) -> str:
    # webdataset splits member names at the first dot, so keys must be dot-free; the running index
    # keeps them unique (CIFAR-style trees repeat file names across class folders).
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)[:60]
    return f"{gidx:08d}_{stem}"


def _plan(items: list[Item], opts: WriteOptions) -> list[list[tuple[int, Item]]]:
    """Consecutive groups of at most shard_size files and shard_bytes source bytes (sizes are the source
    files', known before writing, so that a re-run plans exactly the same shards)."""
    order = list(enumerate(items))
    if opts.seed is not None:
        random.Random(opts.seed).shuffle(order)
    order = [(g, it) for g, (_, it) in enumerate(order)]
    shards: list[list[tuple[int, Item]]] = []
    cur: list[tuple[int, Item]] = []
    nbytes = 0
    for g, it in order:
        if cur and (len(cur) >= opts.shard_size or nbytes + it.size > opts.shard_bytes):
            shards.append(cur)
            cur, nbytes = [], 0
        cur.append((g, it))
        nbytes += it.size
    if cur:
        shards.append(cur)
    return shards


def _fingerprint(group: list[tuple[int, Item]], opts: WriteOptions) -> str:
    conv = {k: getattr(opts, k) for k in ("resize", "quality", "lossless")}
    blob = json.dumps([conv, [(g, it.path, it.label, it.size) for g, it in group]]).encode()
    return hashlib.sha1(blob).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: rewrites are byte-identical
    tar.addfile(info, io.BytesIO(data))


def _write_shard(task: tuple[str, list[tuple[int, Item]], str, Optional[str], WriteOptions, str]) -> dict:
    """Worker: write one shard to a temporary name, checksum it, rename it into place."""
    final, group, root, zip_path, opts, plan = task
    tmp = f"{final}.tmp-{os.getpid()}"
    skipped, converted, count = [], [], 0
    zf = zipfile.ZipFile(zip_path) if zip_path else None
    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for g, it in group:
                try:
                    data = zf.read(it.path) if zf else (Path(root) / it.path).read_bytes()
                    c = clean_image(data, resize=opts.resize, quality=opts.quality, lossless=opts.lossless)
                except BadImage as e:
                    skipped.append({"path": it.path, "reason": str(e)})
                    continue
                except OSError as e:
                    skipped.append({"path": it.path, "reason": f"cannot read: {e}"})
                    continue
                note = c.note
                named = Path(it.path).suffix.lower().lstrip(".")
                if named in ("jpg", "jpeg") and c.fmt != "JPEG" or named == "png" and c.fmt != "PNG":
                    note = "; ".join(x for x in (f"{c.fmt} named .{named}, stored as {c.ext}", note) if x)
                if note:
                    converted.append({"path": it.path, "what": note})
                key = _key(g, it.path)
                meta = {"src": it.path, "size": list(c.size), "format": c.fmt, "mode": c.mode}
                if note:
                    meta["note"] = note
                _add(tar, f"{key}.{c.ext}", c.data)
                if it.label >= 0:
                    _add(tar, f"{key}.cls", str(it.label).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                count += 1
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        entry = {"name": Path(final).name, "samples": count, "bytes": os.path.getsize(tmp),
                 "sha256": sha256_file(tmp), "plan": plan, "files": len(group),
                 "skipped": skipped, "converted": converted}
        os.replace(tmp, final)  # atomic: a shard name on disk is always a complete shard
        return entry
    finally:
        if zf:
            zf.close()
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_index(path: Path, head: dict, entries: list[Optional[dict]], complete: bool) -> dict:
    done = [e for e in entries if e is not None]
    index = dict(head)
    index.update(
        complete=complete and len(done) == len(entries),
        num_samples=sum(e["samples"] for e in done),
        num_skipped=len(head["skipped_listing"]) + sum(len(e["skipped"]) for e in done),
        skipped=head["skipped_listing"] + [s for e in done for s in e["skipped"]],
        converted=[c for e in done for c in e["converted"]],
        shards=done,
    )
    del index["skipped_listing"]
    tmp = path.with_suffix(f".json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return index


def write_shards(listing: Listing, out: str | Path, opts: WriteOptions, *, kind: str = "folder",
                 args: Optional[dict[str, Any]] = None, progress: bool = True) -> dict:
    """Write (or complete) the shards of ``listing`` in ``out``; returns the index (also written beside)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{opts.name}-{opts.split}"
    for stale in out.glob(f"{prefix}-*.tmp-*"):  # left by an interrupted run; never a complete shard
        stale.unlink()
    ipath = index_path(out, opts.name, opts.split)
    old = {}
    if ipath.exists():
        try:
            old = {e["name"]: e for e in json.loads(ipath.read_text()).get("shards", [])}
        except (json.JSONDecodeError, KeyError, TypeError):
            old = {}  # unreadable index: every shard is rewritten
    groups = _plan(listing.items, opts)
    head = {"format": INDEX_FORMAT, "name": opts.name, "split": opts.split, "kind": kind,
            "num_classes": len(listing.classes) if listing.classes else 0, "classes": listing.classes,
            "args": {**asdict(opts), **(args or {})}, "source": listing.root,
            "skipped_listing": listing.skipped}
    entries: list[Optional[dict]] = [None] * len(groups)
    todo = []
    for i, group in enumerate(groups):
        name = f"{prefix}-{i:06d}.tar"
        plan, prev, path = _fingerprint(group, opts), old.get(name), out / name
        if prev and prev.get("plan") == plan and path.exists() and path.stat().st_size == prev["bytes"] \
                and sha256_file(path) == prev["sha256"]:
            entries[i] = prev  # complete and verified: left untouched
        else:
            todo.append((i, (str(path), group, listing.root, listing.zip_path, opts, plan)))
    planned = {f"{prefix}-{i:06d}.tar" for i in range(len(groups))}
    extra = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in planned)
    if extra:
        print(f"warning: {len(extra)} shard files in {out} are not part of this plan (e.g. {extra[0]}); "
              "they are left in place and not listed in the index")
    bar = tqdm(total=len(listing.items), unit="img", desc=prefix, disable=not progress, smoothing=0.1,
               initial=sum(len(groups[i]) for i, e in enumerate(entries) if e is not None))
    index = _write_index(ipath, head, entries, complete=not todo)
    if todo:
        pool = mp.get_context("fork").Pool(opts.workers) if opts.workers > 1 else None
        results = pool.imap_unordered(_run_indexed, todo) if pool else map(_run_indexed, todo)
        try:
            last, nskip = time.monotonic(), index["num_skipped"]
            for i, entry in results:
                entries[i] = entry
                if time.monotonic() - last > 2.0:  # bounded rewrite cost on datasets of 1000s of shards
                    index, last = _write_index(ipath, head, entries, complete=False), time.monotonic()
                nskip += len(entry["skipped"])
                bar.update(entry["files"])
                bar.set_postfix(skipped=nskip, refresh=False)
        finally:
            if pool:
                pool.close()
                pool.join()
        index = _write_index(ipath, head, entries, complete=True)
    bar.close()
    index["written"] = len(todo)  # reported to the caller only, not stored
    index["written_files"] = sum(len(t[1][1]) for t in todo)
    return index


def _run_indexed(task: tuple[int, tuple]) -> tuple[int, dict]:
    i, t = task
    return i, _write_shard(t)


__all__ = ["WriteOptions", "write_shards", "sha256_file"]
