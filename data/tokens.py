"""Stage-2 token shards: their format and writer, the exactly resumable training stream, the eval loader, lineage.

A stage-1 tokenizer export turns image shards into token shards once (``launch/encode_tokens.py``, the job in
``data/encode.py``); the prior then trains on codes and never runs the tokenizer. Per sample, in webdataset tars:

- ``<key>.tokens.npy``: the codes of every augmented view, (views, grid, grid), uint16 when the vocabulary fits
  (<= 65536 codes) else int32;
- ``<key>.cls``: the class index as text (absent when unconditional);
- ``<key>.json``: ``{"src_key", "src_shard"}``, where the sample came from.

The index beside the shards (``<name>-<split>-index.json``) has the image index's format, so ``resolve_shards``
and ``index_checksum`` read it unchanged, plus ``kind: "tokens"`` and a ``tokens`` section recording the
tokenizer export (path, sha256, config, MLflow run, step), grid, vocabulary, dtype, augmentation and the source
shards. ``check_lineage`` compares that sha256 with the export a stage-2 config names, so a prior is never trained
on codes of another tokenizer (or sampled through one).

    stream = build_token_stream(cfg.tokens, batch_size=64, rank=rank, world_size=world, seed=seed, state=s)
    for batch in stream:   # batch["tokens"] (B, grid*grid) long, raster order; batch["label"] (B,), -1 unconditional
        ...

The stream is ``data/stream.py``'s ``TrainStream`` over ``data/cursor.py``'s cursor with a token decode: same
epoch/resampled modes, same state, same world-size-change handling. The view a sample shows at a position is drawn
by that position's RNG (``views: random``), so a resumed stream shows the same views.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch

from vitvq.configs import check
from vitvq.data.shards import _add, sha256_file
from vitvq.data.stream import EvalLoader, TrainStream, checked_cursor, start_stream, verified
from vitvq.data.transforms import label_of
from vitvq.data.urls import ShardError, expand, index_files, is_local, load_index, resolve_shards, shard_name
from vitvq.models.tokens import TokenFacts

KIND = "tokens"
VIEWS = {"center": 1, "flip": 2, "tencrop": 10}  # views per sample of each --augment


@dataclass
class TokenDataConfig:
    train_tokens: str = ""
    """Token shards to train on: the index .json that launch/encode_tokens.py wrote (or a path/brace pattern)."""
    val_tokens: Optional[str] = None
    """Validation token shards, same forms as train_tokens; null for none."""
    index: Optional[str] = None
    """Token index .json giving per-shard counts and sha256 of pipe:/remote shards; train and val tokens both read
    it: give both splits' indexes joined by "::"."""
    verify_shards: bool = True
    """Check each token shard against its index's sha256 the first time a process opens it (data/verify.py)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle_buffer: int = 1000
    """Samples shuffled together: each worker permutes consecutive blocks of this many (1 = no shuffle)."""
    mode: Literal["epoch", "resampled"] = "epoch"
    """"epoch": every sample once per epoch over all ranks; "resampled": endless, shards drawn with replacement."""
    views: Literal["random", "first"] = "random"
    """Which augmented view a sample shows: one drawn per position ("random"), or always view 0 ("first")."""

    def __post_init__(self) -> None:
        check(bool(self.train_tokens.strip()), "train_tokens", self.train_tokens,
              "give the token index .json written by launch/encode_tokens.py")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "use 0 or a positive worker count")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", self.shuffle_buffer, "use 1 (no shuffle) or more")
        check(self.mode in ("epoch", "resampled"), "mode", self.mode, "use epoch or resampled")
        check(self.views in ("random", "first"), "views", self.views, "use random or first")

    @property
    def streams(self) -> int:
        """Independent sample streams per rank: one per worker (one in-process stream when num_workers=0)."""
        return max(1, self.num_workers)


# -- the shard format ----------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    """The compact dtype that holds codes 0 .. vocab_size - 1."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


class TokenShardWriter:
    """One token shard, written to a temporary name; ``close()`` renames it into place (a shard name on disk is
    always a complete shard) and returns its index entry. Tar headers carry fixed times: rewrites are identical."""

    def __init__(self, path: str | Path, vocab_size: int):
        self.path, self.dtype, self.samples = Path(path), token_dtype(vocab_size), 0
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._raw = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._raw, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, key: str, tokens: np.ndarray, label: int, src_key: str, src_shard: str) -> None:
        """``tokens``: (views, grid, grid) codes of sample ``key`` (dot-free: webdataset splits at the first dot)."""
        if "." in key:
            raise ValueError(f"token sample key {key!r} contains a dot")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(tokens, dtype=self.dtype), allow_pickle=False)
        _add(self._tar, f"{key}.tokens.npy", buf.getvalue())
        if label >= 0:
            _add(self._tar, f"{key}.cls", str(label).encode())
        _add(self._tar, f"{key}.json", json.dumps({"src_key": src_key, "src_shard": src_shard}).encode())
        self.samples += 1

    def close(self) -> dict[str, Any]:
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        entry = {"name": self.path.name, "samples": self.samples, "bytes": os.path.getsize(self.tmp),
                 "sha256": sha256_file(self.tmp)}
        os.replace(self.tmp, self.path)
        return entry

    def abort(self) -> None:
        self._raw.close()
        self.tmp.unlink(missing_ok=True)


# -- reading -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenDecode:
    """Raw sample -> (int32 (grid*grid,) codes of one view in raster order, label, key)."""
    grid: int
    views: int
    vocab_size: int
    random_view: bool = True

    def __call__(self, sample: Optional[dict], rng: Optional[np.random.Generator]) -> tuple[np.ndarray, int, str]:
        if sample is None:
            raise ValueError("sample missing from a truncated or unreadable shard")
        codes = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        if codes.shape != (self.views, self.grid, self.grid):
            raise ValueError(f"tokens of shape {codes.shape}, the index says {(self.views, self.grid, self.grid)}")
        v = int(rng.integers(self.views)) if self.random_view and rng is not None else 0
        flat = codes[v].reshape(-1).astype(np.int32)  # (grid*grid,) raster order: row by row
        if flat.max() >= self.vocab_size:
            raise ValueError(f"code {int(flat.max())} outside the vocabulary of {self.vocab_size}")
        return flat, label_of(sample), sample["__key__"]


def _collate_tokens(chunk: list, extra: dict[str, Any]) -> dict[str, Any]:
    codes, labels, keys = zip(*chunk)
    return {"tokens": torch.from_numpy(np.stack(codes)), "label": torch.tensor(labels, dtype=torch.long),  # (B, N) int32
            "key": list(keys), **extra}


def _finish_tokens(raw: dict[str, Any]) -> dict[str, Any]:
    return {"tokens": raw["tokens"].long(), "label": raw["label"], "key": raw["key"]}  # int32 crossed the worker pipe


class TokenStream(TrainStream):
    """Endless batches {"tokens": long (B, grid*grid) raster order, "label": long (B,), "key": list[str]}, exactly
    resumable through ``state_dict()`` (``TrainStream``'s state)."""

    def __init__(self, cursor: Any, decode: TokenDecode, num_workers: int, num_classes: int):
        super().__init__(cursor, decode, num_workers, num_classes, finish=_finish_tokens, collate=_collate_tokens)

    @property
    def grid(self) -> int:
        return self.decode.grid

    @property
    def vocab_size(self) -> int:
        return self.decode.vocab_size


def _decode_for(info: dict, random_view: bool) -> TokenDecode:
    t = info["tokens"]
    return TokenDecode(int(t["grid"]), int(t["views"]), int(t["vocab_size"]), random_view)


def build_token_stream(cfg: TokenDataConfig, *, shards: Optional[str] = None, batch_size: int, rank: int,
                       world_size: int, seed: int, state: Optional[dict] = None, epoch: int = 0) -> TokenStream:
    """The token training stream of ``rank`` of ``world_size`` over ``shards`` (default ``cfg.train_tokens``)."""
    spec = shards if shards is not None else cfg.train_tokens
    info = token_index(spec, cfg.index)
    listed = resolve_shards(spec, cfg.index, what="tokens.train_tokens")
    cursor = checked_cursor(listed, cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                            field="tokens.train_tokens", more_shards="encode more, smaller shards (one token shard "
                            "per image shard: launch/prepare_data.py --shard-size, then launch/encode_tokens.py)")
    stream = TokenStream(cursor, _decode_for(info, cfg.views == "random"), cfg.num_workers, listed.num_classes)
    return start_stream(stream, state, epoch)


def build_token_eval_loader(shards: str, *, batch_size: int, rank: int, world_size: int, num_workers: int = 0,
                            index: Optional[str] = None, verify: bool = True) -> EvalLoader:
    """View 0 of every sample of ``shards`` exactly once over all ranks, in index order, as {"tokens", "label", "key"};
    ``index`` and ``verify`` as ``tokens.index`` and ``tokens.verify_shards``."""
    info = token_index(shards, index)
    listed = verified(resolve_shards(shards, index, what="tokens.val_tokens"), verify)
    if listed.total == 0:
        raise ShardError(f"tokens.val_tokens={shards!r} holds no samples")
    return EvalLoader(listed, _decode_for(info, False), batch_size, rank, world_size, num_workers,
                      finish=_finish_tokens, collate=_collate_tokens)


# -- the index and lineage -----------------------------------------------------------------------------------
class TokenLineageError(ValueError):
    """Token shards encoded by another tokenizer export than the one configured."""


def _index_file(spec: str, index: Optional[str]) -> Optional[Path]:
    """The index behind ``spec``: the spec itself, else the first of ``index`` (joined by ``::``) or of the complete
    ones beside local shards that lists them all, else the first of ``index``. The validation loader is given the
    training index too (remote shards need it), so the index that lists the shards wins over the one given."""
    spec = (spec or "").strip()
    if spec.endswith(".json") and is_local(spec):
        return Path(os.path.expanduser(spec))
    given = [Path(p) for p in index_files(index)]
    urls = expand(spec) if spec else []
    local = [u for u in urls if is_local(u)]
    beside = sorted(Path(os.path.dirname(os.path.abspath(local[0]))).glob("*-index.json")) if local else []
    names = {shard_name(u) for u in urls}
    for path in given + beside:
        try:
            if names and names <= {e["name"] for e in load_index(path)["shards"]}:
                return path
        except ShardError:
            continue
    return given[0] if given else None


def _find_token_index(spec: str, index: Optional[str] = None) -> tuple[Path, dict]:
    path = _index_file(spec, index)
    if path is None:
        raise ShardError(f"no token index found for {spec!r}: give the index .json that launch/encode_tokens.py "
                         "wrote beside the token shards")
    info = load_index(path)
    if info.get("kind") != KIND or "tokens" not in info:
        raise ShardError(f"{spec!r}: index {path} describes {info.get('kind', 'image')!r} shards, not token shards; "
                         "encode images to tokens with launch/encode_tokens.py and train on its index")
    return path, info


def token_index(spec: str, index: Optional[str] = None) -> dict:
    """The token index of ``spec`` (or ``index``); :class:`ShardError` naming the spec when it has none."""
    return _find_token_index(spec, index)[1]


def index_token_facts(info: dict) -> TokenFacts:
    """What the token shards of index ``info`` (``token_index``'s dict) hold, for ``check_prior_fits``: the grid and
    vocabulary the encoding tokenizer stated, one code per position (``data/encode.py`` encodes no other), and the
    classes of the source images."""
    t = info["tokens"]
    return TokenFacts(vocab_size=int(t["vocab_size"]), codes_per_position=1, grid=int(t["grid"]),
                      image_size=int(t["tokenizer"]["config"]["image_size"]),
                      num_classes=int(info.get("num_classes") or 0))


def token_grid(spec: str, index: Optional[str] = None) -> int:
    """Side of the token grid of ``spec`` (a sample holds grid**2 codes): must equal the prior's ``grid``."""
    return index_token_facts(token_index(spec, index)).grid


def token_vocab_size(spec: str, index: Optional[str] = None) -> int:
    """Codebook size of the tokenizer that encoded ``spec``: must equal the prior's vocabulary."""
    return index_token_facts(token_index(spec, index)).vocab_size


def check_lineage(spec: str, tokenizer_path: str | Path, index: Optional[str] = None) -> dict:
    """The token index of ``spec``, after checking that the export at ``tokenizer_path`` is the one that encoded it
    (sha256 of the file); raises :class:`TokenLineageError` naming both files and the fix otherwise."""
    path, info = _find_token_index(spec, index)
    given = Path(os.path.expanduser(str(tokenizer_path)))
    if not given.is_file():
        raise FileNotFoundError(f"tokenizer export {given} not found (the tokens {path} were encoded by "
                                f"{info['tokens']['tokenizer']['path']})")
    rec = info["tokens"]["tokenizer"]
    got = sha256_file(given)
    if got != rec["sha256"]:
        src = info["tokens"]["source"]["spec"]
        raise TokenLineageError(
            f"token shards {path} were encoded by the tokenizer export {rec['path']} (sha256 {rec['sha256'][:12]}), "
            f"but the configured tokenizer is {given} (sha256 {got[:12]}): its codes mean something else. Re-encode "
            f"with `python launch/encode_tokens.py --tokenizer {given} --shards {src} --out DIR` and train on the new "
            f"index, or set tokenizer: {rec['path']}")
    return info


# -- writing the index (data/encode.py) --------------------------------------------------------------
@contextmanager
def index_lock(ipath: Path) -> Iterator[None]:
    """Exclusive lock on the index of one output (workers record shards concurrently)."""
    with open(f"{ipath}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_index(ipath: Path, head: dict[str, Any], entries: list[dict], complete: bool) -> dict[str, Any]:
    """Write the index of ``entries`` (sorted by shard name) atomically; its bytes depend on nothing else."""
    entries = sorted(entries, key=lambda e: e["name"])
    index = {**head, "complete": complete, "num_samples": sum(e["samples"] for e in entries),
             "num_skipped": sum(len(e["skipped"]) for e in entries),
             "skipped": [{"src_shard": e["src_shard"], **s} for e in entries for s in e["skipped"]],
             "shards": entries}
    tmp = ipath.with_name(f"{ipath.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, ipath)
    return index


def record_entry(ipath: Path, head: dict[str, Any], entry: dict) -> None:
    """Add a finished shard to the (incomplete) index, so that a rerun after a crash keeps it."""
    with index_lock(ipath):
        try:
            entries = {e["name"]: e for e in json.loads(ipath.read_text())["shards"]}
        except (OSError, json.JSONDecodeError, KeyError):
            entries = {}
        entries[entry["name"]] = entry
        write_index(ipath, head, list(entries.values()), complete=False)



__all__ = ["TokenDataConfig", "TokenStream", "TokenShardWriter", "TokenLineageError", "build_token_stream",
           "build_token_eval_loader", "index_lock", "write_index", "record_entry", "token_index", "token_grid",
           "token_vocab_size", "index_token_facts", "check_lineage", "token_dtype", "VIEWS", "KIND"]
