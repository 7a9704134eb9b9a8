"""Feature-extraction throughput of the evaluation workers, and our FID against torch-fidelity's.

    python benchmarks/eval_throughput.py                       # real photos from ../shared/data/cifar10-test
    python benchmarks/eval_throughput.py --inception-weights /path/weights-inception-2015-12-05-6726825d.pth

For each extractor, images/s with the workers in this process (no Ray) and with 1 and 2 Ray actors of one CPU
core each (on a GPU when one is present: actors share it). Without the InceptionV3 weights the real network
runs with random weights ("inception-random": the real cost, meaningless values) next to the tiny test
extractor; both are labelled. With the weights, FID of two folders of photos is computed by us and by
torch-fidelity's ``calculate_metrics`` on the same files (they should agree to 1e-3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vitvq.evaluation.inception import InceptionWeightsError, resolve_inception_weights
from vitvq.evaluation.data import list_images
from vitvq.evaluation.workers import Source, WorkerPool, compute_ref_stats, evaluate_gfid
from vitvq.evaluation.metrics import RefStats

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def throughput(extractor: str, weights: str | None, workers: int, source: Source, batch: int, device: str) -> dict:
    gpus = (1 / max(workers, 1)) if device == "cuda" else 0
    t0 = time.time()
    pool = WorkerPool(workers, extractor, weights, device=device, cpus_per_worker=1, gpus_per_worker=gpus)
    startup = time.time() - t0
    try:
        compute_ref_stats(pool, Source(images=source.images, limit=min(batch * max(workers, 1), source.limit)),
                          batch, progress=False)  # warm-up: first-call allocations, lazy imports
        t0 = time.time()
        stats, _ = compute_ref_stats(pool, source, batch, progress=False)
        seconds = time.time() - t0
    finally:
        pool.close()
    return {"extractor": extractor, "workers": workers if workers else "in-process", "device": device,
            "images": stats.n, "seconds": round(seconds, 2), "images_per_s": round(stats.n / seconds, 1),
            "startup_s": round(startup, 1)}


def fid_vs_torch_fidelity(weights: str, a: str, b: str, limit: int) -> dict:
    """Our FID and torch-fidelity's on the same two folders (the first ``limit`` images of each)."""
    import torch_fidelity
    with tempfile.TemporaryDirectory() as tmp:
        dirs = []
        for name, folder in (("a", a), ("b", b)):  # torch-fidelity reads whole folders: link the subset
            d = Path(tmp) / name
            d.mkdir()
            for f in list_images(folder)[:limit]:
                (d / f.name).symlink_to(f.resolve())
            dirs.append(str(d))
        pool = WorkerPool(0, "inception", weights)
        stats, prot = compute_ref_stats(pool, Source(images=dirs[0]), 50, progress=False)
        ours = evaluate_gfid(pool, Source(images=dirs[1]), RefStats(*stats.mean_cov(), prot), 50, progress=False)
        theirs = torch_fidelity.calculate_metrics(input1=dirs[1], input2=dirs[0], fid=True, verbose=False,
                                                  feature_extractor_weights_path=weights, cuda=False)
    fid_ours, fid_tf = ours.metrics["eval/fid"], theirs["frechet_inception_distance"]
    return {"images_per_folder": limit, "fid_ours": fid_ours, "fid_torch_fidelity": fid_tf,
            "abs_diff": abs(fid_ours - fid_tf), "agree_1e-3": abs(fid_ours - fid_tf) < 1e-3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=str(SHARED / "cifar10-test"), help="folder of real photos")
    p.add_argument("--n-inception", type=int, default=64, help="images per InceptionV3 measurement")
    p.add_argument("--n-tiny", type=int, default=2000, help="images per tiny-extractor measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--fid-limit", type=int, default=500, help="images per folder for the torch-fidelity check")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not Path(args.images).is_dir():
        raise SystemExit(f"no images at {args.images} (../shared/data beside the checkout); pass --images DIR")

    try:
        weights: str | None = str(resolve_inception_weights(args.inception_weights))
    except InceptionWeightsError as e:
        weights = None
        print(f"InceptionV3 weights absent: timing the real network with RANDOM weights instead.\n  ({e})\n")
    import ray
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 chars
    ray.init(num_cpus=os.cpu_count(), num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False, _temp_dir=ray_tmp)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    try:
        for extractor, n in ((("inception" if weights else "inception-random"), args.n_inception),
                             ("tiny", args.n_tiny)):
            for device in devices:
                for workers in (0, 1, 2):
                    rows.append(throughput(extractor, weights, workers, Source(images=args.images, limit=n),
                                           args.batch_size, device))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print(f"{'extractor':<18}{'device':<8}{'workers':<12}{'images':>7}{'img/s':>9}{'start-up s':>12}")
    for r in rows:
        print(f"{r['extractor']:<18}{r['device']:<8}{str(r['workers']):<12}{r['images']:>7}{r['images_per_s']:>9}"
              f"{r['startup_s']:>12}")
    print("inception-random = torch-fidelity's InceptionV3 with random weights (speed only); tiny = test stand-in;"
          " neither is comparable to published numbers." if not weights else "")
    out = {"throughput": rows}
    if weights:
        a, b = Path(args.images) / "cat", Path(args.images) / "dog"
        out["fid_vs_torch_fidelity"] = fid_vs_torch_fidelity(weights, str(a), str(b), args.fid_limit)
        print("FID ours vs torch-fidelity:", json.dumps(out["fid_vs_torch_fidelity"]))
    else:
        print("FID vs torch-fidelity: skipped (needs the real InceptionV3 weights; see the message above)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
