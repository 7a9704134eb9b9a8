"""Evaluate tokenizers and samples: reference statistics, rFID (+ PSNR/SSIM/LPIPS/codebook use), gFID + IS.

    python launch/evaluate.py ref-stats --shards VAL --resolution 256 --out ref.npz
    python launch/evaluate.py rfid --tokenizer tok.pt --shards VAL [--ref ref.npz] [--save-recons DIR]
    python launch/evaluate.py gfid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz

Images come from webdataset shards (``--shards``, as ``data.build_eval_loader`` reads them) or a folder
(``--images DIR``; ``--npz FILE`` too for ref-stats). ``--workers N`` spreads the Inception work over N Ray actors
(a local cluster, or ``--address`` for a running one; ``--workers 0`` runs in this process without Ray); the
result does not depend on N. Results print as a table with the protocol they were measured under, go to
``--json PATH``, and with ``--mlflow-run RUN_ID`` into that run as ``eval/*`` metrics at the checkpoint's step,
the protocol as ``eval.protocol.*`` tags. ``--extractor tiny`` (tests) is NOT comparable to published numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional


from vitvq.evaluation.inception import InceptionWeightsError
from vitvq.evaluation.workers import (EvalResult, Source, WorkerPool, compute_ref_stats, evaluate_gfid,
                                  evaluate_rfid)
from vitvq.evaluation.metrics import save_ref_stats
from vitvq.evaluation.pool import add_worker_arguments


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("workers and weights")
    add_worker_arguments(g, workers=1)
    g.add_argument("--device", default="cpu", help="torch device in the workers (cuda needs --gpus-per-worker)")
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass in a worker")
    g.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="InceptionV3 FID weights (else $VITVQ_INCEPTION_WEIGHTS, else the torch hub cache)")
    g.add_argument("--extractor", default="inception", choices=["inception", "tiny", "inception-random"],
                   help="'tiny'/'inception-random': random networks for tests and speed; NOT comparable to papers")
    g.add_argument("--limit", type=int, default=None, help="only the first N images (folders and .npz)")
    o = common.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    o.add_argument("--mlflow-run", default=None, metavar="RUN_ID", help="log eval/* metrics into this MLflow run")
    o.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI / MLflow's)")
    o.add_argument("--step", type=int, default=None, help="step to log at (default: the export's step, else 0)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = argparse.ArgumentParser(prog="launch/evaluate.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("ref-stats", parents=[common], help="Inception mean/covariance of a dataset, with protocol")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="webdataset shards (path, brace pattern, or index .json)")
    src.add_argument("--images", help="a folder of images (searched recursively, sorted)")
    src.add_argument("--npz", help="an .npz of uint8 (N, H, W, 3) images under arr_0")
    r.add_argument("--resolution", type=int, default=None,
                   help="center crop + resize to this side (required for shards; default for folders: as stored)")
    r.add_argument("--out", required=True, help="output .npz (mu, sigma, count, protocol)")

    f = sub.add_parser("rfid", parents=[common], help="reconstruction FID, PSNR, SSIM, LPIPS, codebook usage")
    f.add_argument("--tokenizer", required=True, help="tokenizer export (launch/export_tokenizer.py)")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="validation shards")
    src.add_argument("--images", help="a folder of validation images")
    f.add_argument("--ref", default=None, help="reference statistics .npz (default: the evaluated originals)")
    f.add_argument("--save-recons", default=None, metavar="DIR", help="write the reconstructions as PNGs")
    f.add_argument("--lpips", default="auto", choices=["auto", "vgg", "random", "off"],
                   help="auto: vgg when torchvision's vgg16-397923af.pth is found, else off")
    f.add_argument("--lpips-weights", default=None, metavar="PATH", help="vgg16-397923af.pth (else the hub cache)")

    s = sub.add_parser("gfid", parents=[common], help="FID and Inception Score of generated samples")
    s.add_argument("--samples", required=True, help="a folder of PNGs, or an .npz of uint8 NHWC under arr_0 (ADM)")
    s.add_argument("--ref", required=True, help="reference statistics .npz (ours or ADM's mu/sigma)")
    s.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    return p.parse_args(argv)


def build_source(args: argparse.Namespace) -> Source:
    if args.command == "gfid":
        is_npz = Path(args.samples).suffix == ".npz"
        return Source(npz=args.samples if is_npz else None, images=None if is_npz else args.samples, limit=args.limit)
    shards = getattr(args, "shards", None)
    if args.command == "ref-stats" and shards and args.resolution is None:
        raise SystemExit("ref-stats --shards needs --resolution (the evaluation side, e.g. 256)")
    return Source(images=args.images, npz=getattr(args, "npz", None), shards=shards,
                  resolution=getattr(args, "resolution", None), limit=args.limit if not shards else None)


def sampling_protocol(samples: Optional[str]) -> dict[str, Any]:
    """How the samples were drawn (``launch/sample.py`` writes ``<samples>.protocol.json`` beside the .npz): the
    sample count, classes, guidance and sampling settings, seeds and the model files, as ``sampling.*`` entries of
    the gFID protocol; a note when there is none."""
    if not samples or not samples.endswith(".npz"):
        return {}
    path = Path(samples).with_suffix(".protocol.json")
    if not path.is_file():
        return {"sampling": f"unknown: no {path.name} beside the samples (not written by launch/sample.py)"}
    keep = ("samples", "per_class", "classes", "cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p", "seed",
            "seed_rule", "prior", "prior_sha256", "prior_step", "tokenizer", "tokenizer_sha256")
    drawn = json.loads(path.read_text())
    return {f"sampling.{k}": drawn[k] for k in keep if k in drawn}


def print_table(title: str, values: dict[str, Any], protocol: dict[str, Any], notes: list[str]) -> None:
    width = max(len(k) for k in [*values, *protocol]) + 2
    print(f"\n{title}")
    for k, v in values.items():
        print(f"  {k:<{width}}{v:.6g}" if isinstance(v, float) else f"  {k:<{width}}{v}")
    print("protocol")
    for k, v in protocol.items():
        print(f"  {k:<{width}}{json.dumps(v) if isinstance(v, dict) else v}")
    if not protocol.get("comparable_to_papers", False):
        print("  !! NOT comparable to published numbers: not the verified InceptionV3 weights")
    for n in notes:
        print(f"  !! {n}")


def log_to_mlflow(run_id: str, result: EvalResult, tracking_uri: Optional[str]) -> None:
    """Metrics into the run that produced the checkpoint, at its step; the protocol as tags (MlflowClient: the
    run's status is left alone, unlike a resumed training run)."""
    from vitvq.trainer.tracking import clean_key, clip, mlflow_client, tag_limit
    client = mlflow_client(tracking_uri)
    for key, value in result.metrics.items():
        client.log_metric(run_id, clean_key(key), float(value), step=int(result.step or 0))
    for key, value in result.protocol.items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
        client.set_tag(run_id, clean_key(f"eval.protocol.{key}"), clip(text, tag_limit()))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    source = build_source(args)
    progress = not args.no_progress
    try:
        pool = WorkerPool(args.workers, args.extractor, args.inception_weights, args.device, args.address,
                          args.cpus_per_worker, args.gpus_per_worker)
    except InceptionWeightsError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        if args.command == "ref-stats":
            t0 = time.time()
            stats, protocol = compute_ref_stats(pool, source, args.batch_size, progress)
            save_ref_stats(args.out, stats, protocol)
            result = EvalResult({"count": stats.n}, protocol, seconds=time.time() - t0)
            title = f"reference statistics -> {args.out}"
        elif args.command == "rfid":
            result = evaluate_rfid(pool, args.tokenizer, source, args.ref, args.batch_size, args.lpips,
                                   args.lpips_weights, args.save_recons, args.step, progress)
            title = f"rFID of {args.tokenizer}"
        else:
            result = evaluate_gfid(pool, source, args.ref, args.batch_size, args.splits, progress)
            result.protocol.update(sampling_protocol(args.samples))
            title = f"gFID / IS of {args.samples}"
    finally:
        pool.close()
    if result.step is None:
        result.step = args.step if args.step is not None else 0
    result.protocol["workers"] = args.workers
    print_table(title, {**result.metrics, "seconds": round(result.seconds, 1)}, result.protocol, result.warnings)
    out = {"command": args.command, **result.to_json()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    if args.mlflow_run and args.command != "ref-stats":
        log_to_mlflow(args.mlflow_run, result, args.tracking_uri)
        print(f"logged to MLflow run {args.mlflow_run} at step {result.step}")
    return out


if __name__ == "__main__":
    main()
