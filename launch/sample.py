"""Sample images from a trained prior for gFID: an ADM-style ``.npz``, a picture, and the protocol.

    python launch/sample.py --prior prior.pt --tokenizer tokenizer.pt --per-class 50 --cfg 2.0 --seed 0 \\
        --out samples.npz [--workers 4 --device cuda --gpus-per-worker 1]
    python launch/evaluate.py gfid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz

Writes ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 class labels for a class-conditional prior,
as ADM's ``sample.py`` and evaluator use them; uncompressed, so evaluation workers memory-map it), a grid of the
first samples of the first classes (``samples.grid.png``) and the protocol (``samples.protocol.json``), and prints
the gfid command to run next. Sample i is a function of i, the seed and the sampling settings only: the same for
any ``--workers`` and ``--batch-size`` on a CPU (on GPUs for any ``--workers``; see ``evaluation/sampling.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from vitvq.configs import from_dict
from vitvq.evaluation.pictures import image_grid
from vitvq.evaluation.pool import add_worker_arguments
from vitvq.evaluation.sampling import (MAX_SEED, ORDER_RULE, SEED_RULE, SampleJob, SamplePlan, check_exports,
                                       sample_images, sha256_file)
from vitvq.models.prior import PriorConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True, help="prior export (trainer export of stage 2)")
    p.add_argument("--tokenizer", required=True, help="tokenizer export whose codes the prior models")
    p.add_argument("--out", required=True, help="output .npz (ADM layout)")
    p.add_argument("--grid-png", default=None, metavar="PATH", help="picture of the first samples (default: "
                   "OUT with .grid.png)")
    w = p.add_argument_group("what to sample")
    w.add_argument("--per-class", type=int, default=50, help="samples per class (default 50: 50k for ImageNet)")
    cls = w.add_mutually_exclusive_group()
    cls.add_argument("--classes", default=None, help="comma-separated class indices, e.g. 0,1,2")
    cls.add_argument("--num-classes-from-prior", action="store_true",
                     help="every class of the prior (the default); an unconditional prior has one null class")
    w.add_argument("--cfg", type=float, required=True, help="classifier-free guidance scale (1 = none)")
    w.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"],
                   help="constant, or linear from 1 at the first token to --cfg at the last")
    w.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    w.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    w.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (1 = all)")
    w.add_argument("--seed", type=int, default=0, help="base seed: sample i gets splitmix64(seed * 2**31 + i)")
    r = p.add_argument_group("workers")
    r.add_argument("--batch-size", type=int, default=32, help="samples per generate() call in a worker")
    add_worker_arguments(r, workers=0, gpus=None)
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, SamplePlan, dict[str, Any]]:
    """Arguments, the sample plan and the prior export's extra (provenance); every refusal names its flag
    (argparse's exit status 2)."""
    p = build_parser()
    a = p.parse_args(argv)
    checks = [(a.per_class >= 1, "--per-class", "must be >= 1"),
              (a.batch_size >= 1, "--batch-size", "must be >= 1"),
              (math.isfinite(a.cfg) and a.cfg >= 0, "--cfg", "must be a finite number >= 0"),
              (math.isfinite(a.temperature) and a.temperature >= 0, "--temperature", "must be >= 0 (0 = greedy)"),
              (a.top_k >= 0, "--top-k", "must be >= 0 (0 = all tokens)"),
              (0 < a.top_p <= 1, "--top-p", "must be in (0, 1]"),
              (0 <= a.seed < MAX_SEED, "--seed", "must be in [0, 2**32)"),
              (a.workers >= 0, "--workers", "must be >= 0"),
              (a.cpus_per_worker > 0, "--cpus-per-worker", "must be > 0"),
              (a.gpus_per_worker is None or a.gpus_per_worker >= 0, "--gpus-per-worker", "must be >= 0"),
              (Path(a.out).suffix == ".npz", "--out", "must end in .npz (launch/evaluate.py gfid reads it by suffix)")]
    for ok, flag, msg in checks:
        if not ok:
            p.error(f"{flag}: {msg}, got {getattr(a, flag[2:].replace('-', '_'))}")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.gpus_per_worker is None:
        a.gpus_per_worker = 1.0 if a.device == "cuda" and a.workers > 0 else 0.0
    if a.device == "cuda" and a.workers > 0 and a.gpus_per_worker == 0:
        p.error("--gpus-per-worker: must be > 0 with --device cuda and --workers > 0 (Ray hides GPUs from actors "
                "that ask for none)")
    if a.device == "cuda" and a.workers == 0 and not torch.cuda.is_available():
        p.error("--device: cuda is not available in this process; use --device cpu")
    try:
        prior_export, _ = check_exports(a.prior, a.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--prior/--tokenizer: {e}")
    cfg = from_dict(PriorConfig, prior_export["config"])
    if cfg.num_classes == 0 and a.classes is not None:
        p.error(f"--classes: the prior {a.prior} is unconditional (num_classes 0); drop --classes")
    if cfg.num_classes == 0 and a.cfg != 1:
        p.error(f"--cfg: the prior {a.prior} is unconditional: guidance needs classes, use --cfg 1")
    if a.top_k > cfg.vocab_size:
        p.error(f"--top-k: {a.top_k} is more than the prior's vocabulary of {cfg.vocab_size} (0 = all tokens)")
    classes = None
    if a.classes is not None:
        try:
            classes = [int(c) for c in a.classes.split(",") if c.strip()]
        except ValueError:
            p.error(f"--classes: expected comma-separated integers, got {a.classes!r}")
        if not classes:
            p.error("--classes: give at least one class")
    try:
        plan = SamplePlan.for_prior(cfg, a.per_class, a.seed, classes)
    except ValueError as e:
        p.error(f"--classes/--per-class: {e}")
    return a, plan, prior_export["extra"]


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


def _classes_text(plan: SamplePlan) -> str:
    c = plan.classes
    if not plan.conditional:
        return "unconditional (null class)"
    if list(c) == list(range(len(c))):
        return f"0..{len(c) - 1} ({len(c)} classes)"
    return ",".join(map(str, c)) if len(c) <= 16 else f"{len(c)} classes: {','.join(map(str, c[:8]))},..."


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args, plan, extra = parse_args(argv)
    prior_sha, tok_sha = sha256_file(args.prior), sha256_file(args.tokenizer)  # the files as sampling reads them
    out = Path(args.out)
    grid_png = Path(args.grid_png) if args.grid_png else out.with_suffix(".grid.png")
    job = SampleJob(plan, batch_size=args.batch_size, cfg_scale=args.cfg, cfg_schedule=args.cfg_schedule,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t0 = time.time()
    res = sample_images(args.prior, args.tokenizer, job, workers=args.workers, device=args.device,
                        address=args.address, cpus_per_worker=args.cpus_per_worker,
                        gpus_per_worker=args.gpus_per_worker, progress=not args.no_progress)
    seconds = time.time() - t0
    save_npz(out, res.images, res.labels if plan.conditional else None)
    save_grid(grid_png, res.images, plan.grid_indices())

    notes = []
    if extra.get("tokenizer_sha256") not in (None, tok_sha):
        notes.append(f"the prior was trained on tokens of a tokenizer export with sha256 {extra['tokenizer_sha256']}, "
                     f"not {args.tokenizer} ({tok_sha})")
    if args.temperature == 0:
        notes.append("--temperature 0 is greedy: every sample of a class is the same image")
    n, h, w = res.images.shape[:3]
    protocol = {
        "samples": n, "per_class": plan.per_class, "classes": _classes_text(plan),
        "class_list": list(plan.classes) if plan.conditional else None, "order": ORDER_RULE,
        "cfg_scale": args.cfg, "cfg_schedule": args.cfg_schedule, "temperature": args.temperature,
        "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed, "seed_rule": SEED_RULE,
        "resolution": f"{h}x{w} (as decoded, uint8 round((x + 1) * 127.5))",
        "prior": str(Path(args.prior).resolve()), "prior_sha256": prior_sha,
        "prior_step": extra.get("step"), "tokenizer": str(Path(args.tokenizer).resolve()), "tokenizer_sha256": tok_sha,
        "batch_size": args.batch_size, "workers": args.workers, "device": args.device,
        "torch": res.worker["torch"], "seconds": round(seconds, 1), "npz": str(out.resolve()),
        "npz_layout": "arr_0 uint8 (N, H, W, 3)" + (", arr_1 int64 (N,) labels" if plan.conditional else ""),
        "grid_png": str(grid_png.resolve()), "notes": notes,
    }
    protocol_path = out.with_suffix(".protocol.json")
    tmp = protocol_path.with_name(protocol_path.name + ".tmp")
    tmp.write_text(json.dumps(protocol, indent=2))
    tmp.replace(protocol_path)

    width = max(map(len, protocol)) + 2
    print(f"\n{n} samples -> {out}")
    for k, v in protocol.items():
        if k not in ("class_list", "notes"):
            print(f"  {k:<{width}}{v}")
    for note in notes:
        print(f"  !! {note}")
    command = f"python launch/evaluate.py gfid --samples {out} --ref REF.npz"
    print(f"protocol -> {protocol_path}\nnext (REF.npz: ADM's VIRTUAL_imagenet256_labeled.npz for ImageNet 256, or "
          f"launch/evaluate.py ref-stats):\n  {command}")
    return {"protocol": protocol, "protocol_path": str(protocol_path), "command": command}


if __name__ == "__main__":
    main()
