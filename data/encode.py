"""The encoder job behind ``launch/encode_tokens.py``: image shards -> stage-2 token shards, once per tokenizer.
``encode(EncodeConfig(...))`` is the job (the launcher's flags are its fields; the pipeline calls it per split),
``encode_tokens`` the function it runs for one split.

Each source image shard becomes one token shard of the same number (``<name>-<split>-NNNNNN.tar``, format in
``data/tokens.py``). Images are decoded as the evaluation loader decodes them (``data/transforms.py``: the
centered largest square, one antialiased resize to the tokenizer's ``image_size``), then augmented into views:

- ``center``: 1 view, that square;
- ``flip``: 2 views, the square and its horizontal mirror;
- ``tencrop``: 10 views, LlamaGen's ``extract_codes_c2i.py --ten-crop``: the centered square resized to
  ``int(1.1 * image_size)``, then torchvision's TenCrop at ``image_size`` (4 corners + center, and their mirrors).
  Ours are ordered center, top-left, top-right, bottom-left, bottom-right of the square, then the same five of its
  mirror image (as torchvision, whose mirrored center sits one pixel over when the margin is odd), so that view 0
  is always the central view; torchvision orders them top-left, top-right, bottom-left, bottom-right, center.

Work is spread with ``data.pool.ActorPool``: ``workers=0`` encodes in this process (no Ray; the right
choice for one GPU), ``workers=N`` runs N Ray actors (a local cluster, or ``address``); worker ``w`` takes the
to-do shards ``w::N``. The output is the same for any N. Several machines: ``--address`` of a Ray cluster whose
nodes share the output folder. torchrun is not supported (``WORLD_SIZE > 1`` is refused by the launcher): one
process drives the actors, so there is one writer of the final index.

Resumable: a shard is planned from its source (name, sha256 or size, samples taken), the tokenizer's sha256 and
the augmentation; an existing output shard whose index entry has that plan and whose sha256 matches is kept.
Shards go to a temporary name and are renamed atomically; each worker records a finished shard in the index (under
a file lock) at once, so an interrupted run loses only the shards in progress. Unreadable source samples are
skipped and listed in the index, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Optional

import torch

from vitvq.configs import check, to_dict
from vitvq.configs.pool import PoolJobConfig
from vitvq.data.cursor import Piece, read_raw
from vitvq.data.shards import sha256_file
from vitvq.data.tokens import KIND, VIEWS, TokenShardWriter, index_lock, record_entry, token_dtype, write_index
from vitvq.data.transforms import image_bytes, label_of, load_crop, square_box, to_float
from vitvq.data.urls import INDEX_FORMAT, _beside, index_checksum, index_path, load_index, resolve_shards, shard_name
from vitvq.models.tokens import TokenFacts, check_prior_fits

FORMAT_VERSION = 1  # bump when the bytes written for the same plan change: old shards are then re-encoded
TENCROP_SCALE = 1.1  # LlamaGen's --crop-range default
VIEW_NAMES = {"center": ["center"], "flip": ["center", "mirror"],
              "tencrop": [f"{m}{p}" for m in ("", "mirror_")
                          for p in ("center", "top_left", "top_right", "bottom_left", "bottom_right")]}


def crop_views(data: bytes, size: int, augment: str) -> torch.Tensor:
    """The ``augment`` views of an encoded image: (views, 3, size, size) uint8."""
    if augment == "tencrop":
        big = int(size * TENCROP_SCALE)
        square = load_crop(data, big, partial(square_box, rng=None))  # (3, big, big): shorter side to 1.1x, centered
        m = big - size
        c = int(round(m / 2))  # torchvision's center_crop offset
        offsets = ((c, c), (0, 0), (0, m), (m, 0), (m, m))  # (top, left): center, then the four corners
        return torch.stack([im[:, t:t + size, left:left + size] for im in (square, square.flip(-1))
                            for t, left in offsets])
    center = load_crop(data, size, partial(square_box, rng=None))  # (3, size, size), as build_eval_loader crops
    return torch.stack([center, center.flip(-1)] if augment == "flip" else [center])


@dataclass(frozen=True)
class ShardTask:
    src: str
    """Source shard URL."""
    count: int
    """Samples to read from it (the index count, or fewer under ``limit``)."""
    out: str
    """Output shard path."""
    plan: str
    """Fingerprint of everything the output bytes depend on."""
    sha256: Optional[str] = None
    """The digest the source shard must have (its index's), checked before its first sample is read; None: unchecked."""


@dataclass
class EncodeJob:
    tasks: list[ShardTask]
    augment: str
    batch_size: int  # images (views) per forward pass
    index: str  # the output index, where finished shards are recorded
    head: dict[str, Any]


@dataclass
class EncodeResult:
    """Index entries of the shards a worker wrote; ``a + b`` merges two workers."""
    entries: list[dict] = field(default_factory=list)

    def __add__(self, other: "EncodeResult") -> "EncodeResult":
        return EncodeResult(self.entries + other.entries)


class EncodeWorker:
    """Holds the tokenizer (loaded once) and encodes its slice of the shards; a Ray actor or a plain object."""

    def __init__(self, tokenizer: str, device: str = "cpu", threads: int = 0):
        from vitvq.models.tokenizer import Tokenizer
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.tok = Tokenizer.load_export(tokenizer, map_location="cpu").to(self.device).eval()

    def info(self) -> dict[str, Any]:
        """Answered once the tokenizer is loaded (the pool's ``ready`` call)."""
        return {"image_size": self.tok.cfg.image_size, "device": str(self.device)}

    def start(self, job: EncodeJob, rank: int, world_size: int) -> int:
        self.job, self.mine, self.acc = job, job.tasks[rank::world_size], EncodeResult()
        self.work = self._run()
        return sum(t.count for t in self.mine)

    def step(self, max_batches: int = 1) -> tuple[int, bool]:
        """Encode up to ``max_batches`` batches; (source samples consumed, finished)."""
        n = 0
        for _ in range(max_batches):
            got = next(self.work, None)
            if got is None:
                return n, True
            n += got
        return n, False

    def result(self) -> EncodeResult:
        return self.acc

    def _run(self) -> Iterator[int]:
        for task in self.mine:
            yield from self._shard(task)

    def _shard(self, task: ShardTask) -> Iterator[int]:
        """Encode one shard; yields the source samples consumed since the last yield (for the progress bar)."""
        job, size = self.job, self.tok.cfg.image_size
        per_batch = max(1, job.batch_size // VIEWS[job.augment])  # samples per forward pass
        writer = TokenShardWriter(task.out, job.head["tokens"]["vocab_size"])
        src_name, skipped, pending, since = shard_name(task.src), [], [], 0
        try:
            # exactly task.count items, None if missing; a shard whose bytes differ from its index stops the job
            for sample in read_raw([Piece(task.src, 0, 0, task.count)], sha256=(task.sha256,)):
                since += 1
                if sample is None:
                    skipped.append({"src_key": None, "reason": "missing: the source shard is truncated or unreadable"})
                    continue
                try:
                    views = crop_views(image_bytes(sample), size, job.augment)
                    pending.append((sample["__key__"], label_of(sample), views))
                except Exception as exn:  # noqa: BLE001 - any undecodable image is skipped and listed
                    skipped.append({"src_key": sample.get("__key__"), "reason": repr(exn)})
                if len(pending) == per_batch:
                    self._write(writer, pending, src_name)
                    pending = []
                    yield since
                    since = 0
            self._write(writer, pending, src_name)
            entry = {**writer.close(), "plan": task.plan, "src_shard": src_name, "skipped": skipped}
        except BaseException:  # includes GeneratorExit: an abandoned shard leaves no temporary file
            writer.abort()
            raise
        record_entry(Path(job.index), job.head, entry)
        self.acc.entries.append(entry)
        yield since

    @torch.inference_mode()
    def _write(self, writer: TokenShardWriter, pending: list, src_name: str) -> None:
        if not pending:
            return
        views = torch.stack([v for _, _, v in pending])  # (n, V, 3, S, S) uint8
        n, V = views.shape[:2]
        x = to_float(views.flatten(0, 1).to(self.device), "minus_one_one")  # (n*V, 3, S, S) in [-1, 1]
        codes = self.tok.encode(x).indices  # (n*V, h, w)
        codes = codes.reshape(n, V, *codes.shape[1:]).cpu().numpy()  # (n, V, h, w)
        for (key, label, _), c in zip(pending, codes):
            writer.add(key.replace(".", "_"), c, label, key, src_name)


# -- the plan and the driver ---------------------------------------------------------------------------------
def _numbers(urls: tuple[str, ...]) -> list[int]:
    """Output shard numbers: the source shards' own numbers (``x-train-000042.tar`` -> 42), else their positions."""
    found = [re.search(r"(\d+)\.tar$", shard_name(u)) for u in urls]
    nums = [int(m.group(1)) for m in found if m]
    return nums if len(nums) == len(urls) and len(set(nums)) == len(nums) else list(range(len(urls)))


def _tokenizer_record(path: str) -> tuple[dict[str, Any], TokenFacts]:
    """The index's record of the export at ``path`` and its token facts; refuses tokens no prior can model."""
    from vitvq.models.tokenizer import Tokenizer
    tok = Tokenizer.load_export(path)
    facts = tok.token_facts()
    check_prior_fits(None, facts, what=f"tokenizer {path} cannot encode tokens for the stage-2 prior", source="it")
    extra = getattr(tok, "export_extra", {}) or {}
    record = {"path": path, "sha256": sha256_file(path), "config": to_dict(tok.cfg),
              "mlflow_run_id": extra.get("mlflow_run_id"), "step": extra.get("step")}
    return record, facts


def encode_tokens(tokenizer: str | Path, shards: str, out: str | Path, *, name: Optional[str] = None,
                  split: str = "train", augment: str = "center", workers: int = 0, batch_size: int = 64,
                  device: str = "cpu", address: Optional[str] = None, cpus_per_worker: float = 1,
                  gpus_per_worker: float = 0, limit: Optional[int] = None, index: Optional[str] = None,
                  progress: bool = True, verify: bool = True) -> dict[str, Any]:
    """Encode the image shards ``shards`` (spec or index .json; ``index`` for remote ones) with the export
    ``tokenizer`` into ``out``; returns the token index (also written), plus ``index_path``, ``written``, ``kept``.
    ``verify``: each source shard is checked against its index's sha256 before it is read."""
    from vitvq.data.pool import ActorPool
    if augment not in VIEWS:
        raise ValueError(f"augment must be one of {sorted(VIEWS)}, not {augment!r}")
    if batch_size < 1 or workers < 0 or (limit is not None and limit < 1):
        raise ValueError(f"need batch_size >= 1, workers >= 0, limit >= 1 (got {batch_size}, {workers}, {limit})")
    tok_path = os.path.abspath(os.path.expanduser(str(tokenizer)))
    record, facts = _tokenizer_record(tok_path)
    listed = resolve_shards(shards, index, what="--shards")
    src_index = index or (shards if shards.strip().endswith(".json") else None)
    src_doc = load_index(os.path.expanduser(src_index)) if src_index else None
    table = {e["name"]: e for e in src_doc["shards"]} if src_doc else _beside(list(listed.urls))
    if name is None:
        m = re.match(r"(.+)-[^-]+-\d+\.tar$", shard_name(listed.urls[0]))
        name = (src_doc or {}).get("name") or (m.group(1) if m else "tokens")
    out = Path(os.path.expanduser(str(out)))
    out.mkdir(parents=True, exist_ok=True)
    ipath, prefix = index_path(out, name, split), f"{name}-{split}"
    vocab = facts.vocab_size
    head = {"format": INDEX_FORMAT, "kind": KIND, "name": name, "split": split, "num_classes": listed.num_classes,
            "classes": (src_doc or {}).get("classes") or [],
            "tokens": {"tokenizer": record, "grid": facts.grid, "vocab_size": vocab, "dtype": token_dtype(vocab).name,
                       "augment": augment, "views": VIEWS[augment], "view_names": VIEW_NAMES[augment],
                       "limit": limit, "source": {"spec": shards, "index_sha256": index_checksum(shards, index)}}}

    # The plan: one task per source shard with samples to take.
    tasks, left = [], limit if limit is not None else listed.total
    digests = listed.sha256 if verify and listed.sha256 else (None,) * len(listed.urls)
    for url, count, num, digest in zip(listed.urls, listed.counts, _numbers(listed.urls), digests):
        take, left = min(count, left), left - min(count, left)
        if take == 0:
            continue
        src = table.get(shard_name(url), {})
        version = src.get("sha256") or f"bytes:{os.path.getsize(url) if os.path.isfile(url) else '?'}"
        plan = json.dumps([FORMAT_VERSION, shard_name(url), version, take, record["sha256"], augment])
        tasks.append(ShardTask(url, take, str(out / f"{prefix}-{num:06d}.tar"), hashlib.sha1(plan.encode()).hexdigest(),
                               digest))
    sources = {os.path.abspath(u) for u in listed.urls} | ({os.path.abspath(src_index)} if src_index else set())
    if sources & ({os.path.abspath(t.out) for t in tasks} | {os.path.abspath(ipath)}):
        raise ValueError(f"--out {out} with --name {name} --split {split} would overwrite the source shards or their "
                         "index: choose another --out or --name")

    for stale in out.glob(f"{prefix}-*.tmp-*"):  # left by an interrupted run; never a complete shard
        stale.unlink()
    try:
        old = {e["name"]: e for e in json.loads(ipath.read_text())["shards"]} if ipath.exists() else {}
    except (json.JSONDecodeError, KeyError, TypeError):
        old = {}  # unreadable index: every shard is rewritten
    kept, todo = [], []
    for t in tasks:
        prev, path = old.get(Path(t.out).name), Path(t.out)
        if prev and prev.get("plan") == t.plan and path.is_file() and path.stat().st_size == prev["bytes"] \
                and sha256_file(path) == prev["sha256"]:
            kept.append(prev)
        else:
            todo.append(t)
    planned = {Path(t.out).name for t in tasks}
    extra = sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in planned)
    if extra:
        print(f"warning: {len(extra)} shard files in {out} are not part of this plan (e.g. {extra[0]}); they are left "
              "in place and not listed in the index")

    with index_lock(ipath):
        write_index(ipath, head, kept, complete=not todo)
    done = EncodeResult()
    if todo:
        threads = max(1, int(cpus_per_worker)) if workers else 0
        pool = ActorPool(EncodeWorker, (tok_path, device, threads), workers=workers, address=address,
                         cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, ready="info",
                         what="encoder")
        try:
            done = pool.run(EncodeJob(todo, augment, batch_size, str(ipath), head), desc=prefix, progress=progress,
                            unit="img")
        finally:
            pool.close()
    with index_lock(ipath):
        result = write_index(ipath, head, kept + done.entries, complete=len(kept) + len(done.entries) == len(tasks))
    Path(f"{ipath}.lock").unlink(missing_ok=True)
    return {**result, "index_path": str(ipath), "written": len(done.entries), "kept": len(kept)}


# -- the job ---------------------------------------------------------------------------------------------------
@dataclass
class EncodeOptions:
    """What the tokens of an image are: its views, and how many images are taken."""

    augment: Literal["center", "flip", "tencrop"] = "center"
    """Views per image: centered square (1), + its mirror (2), LlamaGen's ten-crop (10)."""
    limit: Optional[int] = None
    """Encode only the first N samples (of each split; quick runs)."""

    def __post_init__(self) -> None:
        check(self.limit is None or self.limit >= 1, "limit", self.limit, "must be >= 1 (or none: every sample)")


@dataclass
class EncodeConfig(PoolJobConfig, EncodeOptions):
    """Encode image shards into stage-2 token shards with a tokenizer export."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("tokenizer", "shards", "out")  # a command line names them
    DEMO: ClassVar[str] = "demo"

    tokenizer: str = ""
    """Tokenizer export (launch/export_tokenizer.py)."""
    shards: str = ""
    """Image shards: index .json, path, brace pattern or pipe: URL; 'demo' = both splits of the built-in photographs."""
    index: Optional[str] = None
    """Index .json of the shards when they are pipe:/remote URLs."""
    out: str = ""
    """Output folder of the token shards and their index."""
    name: Optional[str] = None
    """Dataset name in the shard names (default: the source's)."""
    split: str = "train"
    """Split name in the shard names (train, val, ...)."""
    workers: int = 0
    batch_size: int = 64
    verify_shards: bool = True
    """Check each source shard against its index's sha256 before reading it (off: a trusted store)."""

    def __post_init__(self) -> None:
        PoolJobConfig.__post_init__(self)
        EncodeOptions.__post_init__(self)
        for name in ("tokenizer", "shards", "out", "split"):
            check(bool(getattr(self, name)), name, getattr(self, name), f"name the {name}")


def encode(cfg: EncodeConfig) -> dict[str, dict[str, Any]]:
    """Encode ``cfg.shards`` (``demo``: both splits of the built-in photographs, at the tokenizer's image size) into
    ``cfg.out``; the token index of each split encoded, with ``index_path``, ``written``, ``kept`` and ``seconds``."""
    device, gpus = cfg.placement(torch.cuda.is_available())
    if cfg.shards == cfg.DEMO:
        from vitvq.data.builtin import ensure_demo_shards
        from vitvq.data.config import DataConfig
        from vitvq.models.export import read_export
        from vitvq.models.tokenizer import EXPORT_FORMAT
        size = int(read_export(cfg.tokenizer, EXPORT_FORMAT, "tokenizer")["config"]["image_size"])
        root = DataConfig.__dataclass_fields__["demo_root"].default
        todo = {split: str(ensure_demo_shards(root, size, split)) for split in ("train", "val")}
    else:
        todo = {cfg.split: cfg.shards}
    out = {}
    for split, shards in todo.items():
        t0 = time.perf_counter()
        index = encode_tokens(cfg.tokenizer, shards, cfg.out, name=cfg.name, split=split, augment=cfg.augment,
                              workers=cfg.workers, batch_size=cfg.batch_size, device=device, address=cfg.address,
                              cpus_per_worker=cfg.cpus_per_worker, gpus_per_worker=gpus, limit=cfg.limit,
                              index=cfg.index, progress=cfg.progress, verify=cfg.verify_shards)
        out[split] = {**index, "seconds": time.perf_counter() - t0}
    return out


def print_encoded(index: dict[str, Any], say: Callable[[str], None] = print) -> None:
    """One split's counts, its skipped samples, its index and the stage-2 overrides that point at it."""
    t, split = index["tokens"], index["split"]
    say(f"{split}: {index['num_samples']} samples in {len(index['shards'])} shards ({index['written']} written, "
        f"{index['kept']} kept) in {index['seconds']:.1f} s: {t['views']} views ({t['augment']}) of "
        f"{t['grid']}x{t['grid']} codes from {t['vocab_size']}; {index['num_skipped']} skipped")
    for s in index["skipped"][:10]:
        say(f"  skipped {s['src_shard']}:{s['src_key']}: {s['reason']}")
    say(f"index: {index['index_path']}")
    field = "train_tokens" if split == "train" else "val_tokens"
    say(f"stage-2 overrides: tokenizer={t['tokenizer']['path']} tokens.{field}={index['index_path']}")


__all__ = ["encode_tokens", "encode", "print_encoded", "EncodeOptions", "EncodeConfig", "crop_views", "EncodeWorker",
           "EncodeJob", "EncodeResult", "ShardTask", "write_index", "record_entry", "TENCROP_SCALE", "VIEW_NAMES"]
