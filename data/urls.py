"""Resolving a shard specification into shard URLs and their sample counts, or refusing it up front.

A specification (``DataConfig.train_shards``) is one of: a path; a brace pattern
``/data/imagenet-train-{000000..001281}.tar``; a glob; several joined by ``::``; a ``pipe:`` command such
as ``pipe:aws s3 cp s3://bucket/imagenet-train-{000000..001281}.tar -``; or the index ``.json`` that
``launch/prepare_data.py`` writes beside the shards. The stream needs every shard's sample count (to
split an epoch evenly over ranks and workers and to seek on resume): counts come from an index (given,
or found beside local shards), else local shards are counted by reading their tar headers; remote shards
without an index are refused with a message saying to pass the index. Several indexes may be given joined by
``::`` (remote train and validation shards: one index per split). The index's sha256 of each shard travels with
the list, for ``data/verify.py`` to check on first open.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import braceexpand
from webdataset.tariterators import base_plus_ext

from vitvq.configs.redact import redact

INDEX_FORMAT = "vitvq-shards-v1"


class ShardError(ValueError):
    """A shard specification refused before training, with what to change. Its message names the shards, which may
    carry credentials (``pipe:curl -u user:pw ...``, signed URLs): it is redacted here, once for every such error."""

    def __init__(self, message: str):
        super().__init__(redact(message))


@dataclass(frozen=True)
class ShardList:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int  # 0 when unknown or unconditional
    spec: str
    sha256: tuple[Optional[str], ...] = ()  # per shard, from its index; None where no index lists it

    @property
    def total(self) -> int:
        return sum(self.counts)


def index_path(out: str | Path, name: str, split: str) -> Path:
    return Path(out) / f"{name}-{split}-index.json"


def load_index(path: str | Path) -> dict:
    try:
        index = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read shard index {path}: {e}") from None
    if index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{path} is not a shard index written by launch/prepare_data.py "
                         f"(format {index.get('format')!r}, expected {INDEX_FORMAT!r})")
    if not index.get("complete", False):
        raise ShardError(f"shard index {path} is incomplete (the writer was interrupted): re-run the same "
                         "launch/prepare_data.py command to finish the missing shards")
    return index


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def shard_name(url: str) -> str:
    """File name of a shard inside a path or a URL/command (``pipe:aws s3 cp s3://b/x-000001.tar -``)."""
    if is_local(url):
        return os.path.basename(url)
    found = re.findall(r"[^\s/'\"]+\.tar\b", url)
    return found[-1] if found else url


def expand(spec: str) -> list[str]:
    urls: list[str] = []
    for part in spec.split("::"):
        for url in braceexpand.braceexpand(part.strip()):
            url = os.path.expanduser(url[5:] if url.startswith("file:") else url)
            if is_local(url) and glob.has_magic(url):
                urls.extend(sorted(glob.glob(url)))
            elif url:
                urls.append(url)
    return urls


def count_tar(path: str) -> int:
    """Samples in a local tar (consecutive members sharing a key), reading headers only."""
    n, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:  # seekable mode: member data is skipped, not read
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if member.isreg() and key is not None and key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError) as e:
        warnings.warn(f"shard {path} is damaged after {n} samples ({e}); counting those")
    return n


def _beside(urls: list[str]) -> dict[str, dict]:
    """Shard entries of the complete indexes found next to local shards, by file name."""
    table: dict[str, dict] = {}
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls if is_local(u)}):
        for ipath in sorted(Path(folder).glob("*-index.json")):
            try:
                index = load_index(ipath)
            except ShardError:
                continue
            table.update({e["name"]: dict(e, num_classes=index.get("num_classes", 0)) for e in index["shards"]})
    return table


def index_files(index: Optional[str]) -> list[str]:
    """The index paths of a ``data.index`` value (several joined by ``::``)."""
    return [os.path.expanduser(p.strip()) for p in (index or "").split("::") if p.strip()]


def _given(index: str) -> dict[str, dict]:
    """Shard entries of the indexes in ``index``, by file name; a name listed twice with other bytes is refused."""
    table: dict[str, dict] = {}
    for path in index_files(index):
        idx = load_index(path)
        for e in idx["shards"]:
            prev = table.get(e["name"])
            if prev is not None and prev.get("sha256") != e.get("sha256"):
                raise ShardError(f"data.index: shard {e['name']} is listed by {prev['index']} and {path} with "
                                 "different contents; give only the index of the shards you mean")
            table[e["name"]] = dict(e, num_classes=idx.get("num_classes", 0), index=path)
    return table


def resolve_shards(spec: str, index: Optional[str] = None, *, what: str = "train_shards") -> ShardList:
    """URLs, per-shard sample counts and sha256 of ``spec``; raises :class:`ShardError` saying what to change.
    ``index``: index .json files (joined by ``::``) for remote shards; local shards also find the index beside them."""
    spec = spec.strip()
    if is_local(spec) and spec.endswith(".json"):
        path = Path(os.path.expanduser(spec))
        idx = load_index(path)
        urls = [str(path.parent / e["name"]) for e in idx["shards"]]
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise ShardError(f"{what}: index {path} lists {len(missing)} shards that are not there "
                             f"(e.g. {missing[0]}); re-run launch/prepare_data.py to rewrite them")
        return ShardList(tuple(urls), tuple(e["samples"] for e in idx["shards"]), idx.get("num_classes", 0), spec,
                         tuple(e.get("sha256") for e in idx["shards"]))
    urls = expand(spec)
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing and len(missing) == len(urls):
        urls = []
    if not urls:
        raise ShardError(f"{what}={spec!r} matches no shard file: check the path or pattern, or write the "
                         "shards first with launch/prepare_data.py")
    if missing:
        raise ShardError(f"{what}={spec!r}: {len(missing)} of {len(urls)} shards do not exist "
                         f"(e.g. {missing[0]}); fix the pattern's range or the path")
    table = {**_beside(urls), **_given(index)}  # the given index wins; local shards keep the one beside them
    counts, classes, sha = [], 0, []
    for url in urls:
        entry = table.get(shard_name(url))
        sha.append(entry.get("sha256") if entry else None)  # a local shard of another size fails verification
        if entry is not None and (not is_local(url) or os.path.getsize(url) == entry["bytes"]):
            counts.append(entry["samples"])
            classes = max(classes, entry["num_classes"] or 0)
        elif is_local(url):
            counts.append(count_tar(url))
        else:
            raise ShardError(f"{what}: no sample count for remote shard {shard_name(url)!r}; set data.index "
                             "to the index .json that launch/prepare_data.py wrote beside the shards (several "
                             "joined by '::', e.g. the train and the val index)")
    return ShardList(tuple(urls), tuple(counts), classes, spec, tuple(sha))


def index_checksum(spec: str, index: Optional[str] = None) -> Optional[str]:
    """sha256 of the index behind ``spec`` (the spec itself, ``index``, or the one beside local shards),
    for recording which dataset version a run trained on; None when there is no index."""
    import hashlib
    spec = (spec or "").strip()
    given = index_files(index)
    path = given[0] if given else (spec if spec.endswith(".json") and is_local(spec) else None)
    if len(given) > 1:  # the one listing the spec's shards (train and val indexes given together)
        names = {shard_name(u) for u in expand(spec)} if spec and not spec.endswith(".json") else set()
        for ipath in given:
            try:
                if names and names <= {e["name"] for e in load_index(ipath)["shards"]}:
                    path = ipath
                    break
            except ShardError:
                continue
    if path is None and spec:
        urls = [u for u in expand(spec) if is_local(u)]
        folder = os.path.dirname(os.path.abspath(urls[0])) if urls else None
        names = {os.path.basename(u) for u in urls}
        for ipath in sorted(Path(folder).glob("*-index.json")) if folder else []:
            try:
                if names <= {e["name"] for e in load_index(ipath)["shards"]}:
                    path = str(ipath)
                    break
            except ShardError:
                continue
    if path is None or not os.path.isfile(os.path.expanduser(path)):
        return None
    return hashlib.sha256(Path(os.path.expanduser(path)).read_bytes()).hexdigest()


__all__ = ["INDEX_FORMAT", "index_checksum", "ShardError", "ShardList", "index_path", "load_index", "resolve_shards",
           "expand", "index_files", "shard_name", "count_tar", "is_local"]
