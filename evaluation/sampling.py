"""Sampling many images from a trained prior for gFID: a plan that fixes every sample's class and seed, and the
``ActorPool`` worker that draws them (the job around them, ``SampleConfig`` -> ``sample``, is in ``jobs.py``).

Sample ``i`` of a plan is a function of ``i`` alone: class-major order (``classes[i // per_class]``, exactly
``per_class`` of each class, classes in the order given) and its own ``torch.Generator`` seeded with
``sample_seed(seed, i)``, distinct for every sample. LlamaGen's ``sample_c2i_ddp.py`` instead draws random
classes (not exactly 50 per class) from one global RNG per rank, so its samples change with the number of GPUs.

The plan is cut into chunks of ``batch_size`` consecutive samples and worker ``r`` of ``W`` takes chunks
``r, r + W, ...``: each sample is drawn in the same batch, next to the same samples, whatever ``W``, so the result
is bitwise the same for any number of workers even where kernels are not batch-invariant (GPUs). Across batch
sizes it is the same where they are (our CPU tests check batch sizes 1 and 7); ``models/sampling.py`` gives every
row its own randomness, so a sample never depends on its batch otherwise.

    plan = SamplePlan(classes=tuple(range(1000)), per_class=50, seed=0)
    job = SampleJob(plan, SamplingSettings(cfg_scale=2.0, seed=0), batch_size=32)
    out = sample_images("prior.pt", "tokenizer.pt", job, workers=4, device="cuda", gpus_per_worker=1)
    out.images, out.labels   # uint8 (N, H, W, 3), int64 (N,) in sample order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from vitvq.configs import check
from vitvq.evaluation.metrics import to_uint8
from vitvq.evaluation.pictures import image_grid
from vitvq.data.pool import ActorPool
from vitvq.models import prior as prior_mod
from vitvq.models import tokenizer as tokenizer_mod
from vitvq.models.sampling import SamplingSettings, generate
from vitvq.models.tokens import check_prior_fits

_M64 = (1 << 64) - 1
MAX_SAMPLES = 1 << 31
MAX_SEED = 1 << 32


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample ``i`` under base ``seed``: splitmix64's finaliser of ``seed * 2**31 + i``.

    Packing (seed < 2**32, i < 2**31) into 64 bits is injective and every splitmix64 step (add a constant, xor with
    a right shift, multiply by an odd constant, all mod 2**64) is a bijection, so no two (seed, i) pairs share a
    seed, and neighbouring indices get unrelated ones (not consecutive integers, as ``seed + i`` gives)."""
    if not (0 <= seed < MAX_SEED and 0 <= i < MAX_SAMPLES):
        raise ValueError(f"sample_seed takes 0 <= seed < 2**32 and 0 <= i < 2**31, got seed={seed}, i={i}")
    x = (((seed << 31) | i) + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


SEED_RULE = "torch.Generator().manual_seed(splitmix64(seed * 2**31 + i)) on the CPU, one per sample i"
ORDER_RULE = "class-major: sample i has class classes[i // per_class]"


def check_classes(classes: Optional[list[int]], per_class: int) -> None:
    """The checks of a list of classes and a count per class (sampling, the pipeline's and the training grid's)."""
    check(classes is None or len(classes) > 0, "classes", classes, "give at least one class")
    check(classes is None or all(c >= 0 for c in classes), "classes", classes, "class indices must be >= 0")
    check(classes is None or len(set(classes)) == len(classes), "classes", classes, "name each class once")
    check(per_class >= 1, "per_class", per_class, "must be >= 1")


@dataclass
class SampleSet:
    """Which samples to draw: per_class of each class, class-major."""

    per_class: int = 50
    """Samples per class (50 x 1000 classes = ADM's 50k for ImageNet)."""
    classes: Optional[list[int]] = None
    """Class indices to sample (default: every class of the prior; an unconditional prior has one null class)."""

    def __post_init__(self) -> None:
        check_classes(self.classes, self.per_class)


@dataclass(frozen=True)
class SamplePlan:
    """Which samples to draw: ``per_class`` of each of ``classes``, in class-major order, seeded from ``seed``.
    An unconditional prior has the single class ``(null_class,)`` and ``conditional=False``."""

    classes: tuple[int, ...]
    per_class: int
    seed: int = 0
    conditional: bool = True

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("a sample plan needs at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes repeat: {sorted(c for c in set(self.classes) if self.classes.count(c) > 1)}")
        if self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.n > MAX_SAMPLES:
            raise ValueError(f"{self.n} samples: at most 2**31 (sample seeds pack i into 31 bits)")

    @classmethod
    def for_prior(cls, cfg: prior_mod.PriorConfig, per_class: int, seed: int = 0,
                  classes: Optional[list[int]] = None) -> "SamplePlan":
        """All of the prior's classes by default; ``(null_class,)`` for an unconditional prior."""
        if cfg.num_classes == 0:
            if classes is not None:
                raise ValueError("the prior is unconditional (num_classes = 0): it takes no classes")
            return cls((cfg.null_class,), per_class, seed, conditional=False)
        classes = list(range(cfg.num_classes)) if classes is None else list(classes)
        bad = [c for c in classes if not 0 <= c < cfg.num_classes]
        if bad:
            raise ValueError(f"classes {bad} outside [0, {cfg.num_classes}) of the prior")
        return cls(tuple(classes), per_class, seed)

    @property
    def n(self) -> int:
        return len(self.classes) * self.per_class

    def labels(self, idx: np.ndarray) -> np.ndarray:
        """Class of each sample index (int64)."""
        return np.asarray(self.classes, dtype=np.int64)[np.asarray(idx) // self.per_class]

    def generators(self, idx: np.ndarray) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(sample_seed(self.seed, int(i))) for i in idx]

    def grid_indices(self, rows: int = 8, cols: int = 8) -> list[list[int]]:
        """Sample indices of a picture: the first ``cols`` samples of each of the first ``rows`` classes; for one
        class (unconditional), its first ``rows * cols`` samples in rows of ``cols``."""
        if len(self.classes) == 1:
            first = list(range(min(self.n, rows * cols)))
            return [first[r:r + cols] for r in range(0, len(first), cols)]
        return [[c * self.per_class + j for j in range(min(cols, self.per_class))]
                for c in range(min(rows, len(self.classes)))]


@dataclass(frozen=True)
class SampleJob:
    """A plan and how to sample it: the settings ``models/sampling.generate`` reads, and the batch size."""

    plan: SamplePlan
    settings: SamplingSettings
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.settings.seed != self.plan.seed:  # the plan's generators are the samples: one seed, not two
            raise ValueError(f"the plan's seed {self.plan.seed} is not the settings' seed {self.settings.seed}")

    def chunks(self, rank: int, world_size: int) -> list[np.ndarray]:
        """Chunks ``rank, rank + world_size, ...`` of ``batch_size`` consecutive sample indices (see the module doc)."""
        starts = range(rank * self.batch_size, self.plan.n, world_size * self.batch_size)
        return [np.arange(s, min(s + self.batch_size, self.plan.n)) for s in starts]


# -- the files a job writes --------------------------------------------------------------------------------
def save_npz(path: Path, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    """ADM's layout, uncompressed, written to a temporary name and renamed (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    np.savez(tmp, **arrays)
    tmp.replace(path)


def save_grid(path: Path, images: np.ndarray, rows: list[list[int]], pad: int = 2) -> None:
    """Rows of samples (indices into images) as one PNG with ``pad`` black pixels between them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, rows, pad=pad)).save(path)


def classes_text(plan: SamplePlan) -> str:
    """The classes of a plan in a few words (the protocol's ``classes``)."""
    c = plan.classes
    if not plan.conditional:
        return "unconditional (null class)"
    if list(c) == list(range(len(c))):
        return f"0..{len(c) - 1} ({len(c)} classes)"
    return ",".join(map(str, c)) if len(c) <= 16 else f"{len(c)} classes: {','.join(map(str, c[:8]))},..."


# -- checking the two exports against each other ----------------------------------------------------------
def peek_export(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """Format, config and extra of an export without reading its weights (memory-mapped), so that the driver can
    check a 1.7B-parameter prior before any worker loads it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} export {path} not found")
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path} is not a vitvq {what} export (expected format {fmt!r})")
    return {"config": payload["config"], "extra": payload.get("extra", {})}


def check_exports(prior_path: str | Path, tokenizer_path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Peek both exports and refuse a prior that does not fit the tokenizer (``check_prior_fits``, naming both
    files); their (config, extra) dicts."""
    from vitvq.configs import from_dict
    p = peek_export(prior_path, prior_mod.EXPORT_FORMAT, "prior")
    t = peek_export(tokenizer_path, tokenizer_mod.EXPORT_FORMAT, "tokenizer")
    check_prior_fits(from_dict(prior_mod.PriorConfig, p["config"]),
                     from_dict(tokenizer_mod.TokenizerConfig, t["config"]).token_facts(),
                     what=f"prior {prior_path} does not fit tokenizer {tokenizer_path}", fix=None,
                     advice="Sample with the tokenizer whose tokens the prior was trained on.")
    return p, t


# -- the worker ----------------------------------------------------------------------------------------------
@dataclass
class Samples:
    """A worker's samples as chunks of (indices (b,), images uint8 (b, H, W, 3), labels int64 (b,)); ``a + b``
    joins the chunk lists (no copy), :meth:`in_order` assembles them once at the end."""

    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def __add__(self, other: "Samples") -> "Samples":
        return Samples(self.chunks + other.chunks)

    def __len__(self) -> int:
        return sum(len(c[0]) for c in self.chunks)

    def in_order(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, H, W, 3), labels (n,)) in sample order; refuses unless indices 0..n-1 each came once."""
        idx = np.concatenate([c[0] for c in self.chunks]) if self.chunks else np.zeros(0, np.int64)
        if len(idx) != n or not np.array_equal(np.sort(idx), np.arange(n)):
            raise RuntimeError(f"expected samples 0..{n - 1} once each, got {len(idx)} samples "
                               f"({len(np.unique(idx))} distinct)")
        images = np.empty((n, *self.chunks[0][1].shape[1:]), np.uint8)
        labels = np.empty(n, np.int64)
        for i, im, lab in self.chunks:
            images[i], labels[i] = im, lab
        return images, labels


class SampleWorker:
    """Holds the prior and the tokenizer (loaded once on ``device``) and draws its chunks of a job; a Ray actor,
    or a plain object (``workers=0``)."""

    def __init__(self, prior: str, tokenizer: str, device: str = "cpu", threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        check_exports(prior, tokenizer)  # before loading any weights
        self.device = torch.device(device)
        self.prior = prior_mod.Prior.load_export(prior).to(self.device).eval()
        self.tok = tokenizer_mod.Tokenizer.load_export(tokenizer).to(self.device).eval()

    def ready(self) -> dict[str, Any]:
        """What this worker runs (the pool keeps the first answer)."""
        p, t = self.prior.cfg, self.tok.cfg
        return {"device": str(self.device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "prior": {"vocab_size": p.vocab_size, "grid": p.grid, "num_classes": p.num_classes,
                          "width": p.width, "depth": p.depth,
                          "parameters": sum(x.numel() for x in self.prior.parameters())},
                "tokenizer": {"arch": t.arch, "codebook_size": self.tok.vocab_size, "image_size": t.image_size}}

    def start(self, job: SampleJob, rank: int, world_size: int) -> int:
        """Take chunks ``rank, rank + world_size, ...`` of the job; their number of samples."""
        chunks = job.chunks(rank, world_size)
        self.job, self.out, self.todo = job, Samples(), iter(chunks)
        return sum(len(c) for c in chunks)

    @torch.no_grad()
    def step(self, max_batches: int = 1) -> tuple[int, bool]:
        """Draw up to ``max_batches`` chunks; (samples drawn, finished)."""
        count = 0
        for _ in range(max_batches):
            idx = next(self.todo, None)
            if idx is None:
                return count, True
            self.out.chunks.append(self._draw(idx))
            count += len(idx)
        return count, False

    def _draw(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        job, plan, g = self.job, self.job.plan, self.prior.cfg.grid
        labels = plan.labels(idx)
        tokens = generate(self.prior, torch.from_numpy(labels).to(self.device), job.settings,
                          generators=plan.generators(idx))  # (B, grid**2)
        x = self.tok.to_image(self.tok.decode_codes(tokens.view(-1, g, g)))  # (B, 3, H, W) in [-1, 1]
        images = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3), rounded as evaluation saves images
        return idx, images, labels if plan.conditional else np.full_like(labels, -1)

    def result(self) -> Samples:
        return self.out


@dataclass
class SampleOutput:
    images: np.ndarray  # (N, H, W, 3) uint8, sample order
    labels: np.ndarray  # (N,) int64; -1 for an unconditional prior
    worker: dict[str, Any]  # the first worker's ready() answer


def sample_images(prior: str | Path, tokenizer: str | Path, job: SampleJob, workers: int = 0, device: str = "cpu",
                  address: Optional[str] = None, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                  progress: bool = True) -> SampleOutput:
    """Draw every sample of ``job`` on ``workers`` Ray actors (0 = in this process); the same for any ``workers``."""
    check_exports(prior, tokenizer)  # in the driver: a mismatch fails before any actor starts
    threads = max(1, int(cpus_per_worker)) if workers else 0
    pool = ActorPool(SampleWorker, (str(prior), str(tokenizer), device, threads), workers=workers, address=address,
                     cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, what="sampling")
    try:
        samples = pool.run(job, desc="sample", progress=progress, unit="img", batches_per_call=1)
    finally:
        pool.close()
    images, labels = samples.in_order(job.plan.n)
    return SampleOutput(images, labels, pool.ready_value)


__all__ = ["SamplePlan", "SampleJob", "SampleSet", "Samples", "SampleWorker", "SampleOutput", "sample_seed",
           "sample_images", "check_classes", "check_exports", "peek_export", "save_npz", "save_grid", "classes_text",
           "SEED_RULE", "ORDER_RULE"]
