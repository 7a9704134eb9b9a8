"""Dataset to tokenizer, tokens, prior, samples and their gFID in one command, each step on Ray with its own resources.

    python launch/pipeline.py --config configs/pipeline/demo.yaml                  # a local Ray cluster
    python launch/pipeline.py --config configs/pipeline/demo.yaml --plan           # what would run, what is kept
    python launch/pipeline.py --config configs/pipeline/imagenet.yaml --address auto \\
        root=/shared/pipelines/vit_ss stage1.workers=8-16 stage1.gpus_per_worker=1
    python launch/pipeline.py --config configs/pipeline/demo.yaml --address http://HEAD:8265   # as a Ray job

Steps: stage1 (Ray Train) -> export (a Ray task) -> encode (Ray actors) -> stage2 (Ray Train) -> ref (reference
statistics of the validation images, unless gfid.ref names a file) -> sample -> gfid. A step whose output exists
with the same lineage hash (``launch/orchestration/pipeline.py``) is skipped, so the same command continues an interrupted
pipeline and a changed recipe re-runs only what depends on it. Dotted overrides address the pipeline config
(``stage1.overrides=[train.steps=100]``, ``sample.per_class=8``). ``--address http(s)://...`` submits this very
command as a Ray job (``launch/submit.py``: uploads this checkout, follows the logs, exits with the job's status);
any other address (``auto``, ``ray://...``) is joined directly; none starts a local cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from vitvq.configs import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    p.add_argument("--address", help="Ray cluster: http(s)://HEAD:8265 submits as a job; auto / ray://... joins")
    p.add_argument("--plan", action="store_true", help="print each step's lineage and whether it would run; run nothing")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="with an http address: job environment, as launch/submit.py --env (repeatable)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the pipeline config")
    return p


def job_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """``launch/submit.py``'s arguments that run this command, without --address/--env, as a Ray job on the cluster
    whose job server is ``args.address`` (the job's driver then joins that cluster through RAY_ADDRESS)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--address", "--env"):
            skip = True
        elif not a.startswith(("--address=", "--env=")):
            keep.append(a)
    env = [f"--env={e}" for e in args.env]
    return ["--address", args.address, *env, "--", "python", "launch/pipeline.py", *keep]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_intermixed_args(argv)
    if args.address and args.address.startswith(("http://", "https://")):
        from vitvq.launch import submit
        sys.exit(submit.main(job_argv(args, argv)))
    from vitvq.launch.orchestration.pipeline import Pipeline, load_pipeline_config
    stray = [o for o in args.overrides if "=" not in o]
    if stray:
        sys.exit(f"error: unexpected argument(s) {stray}; overrides are written key=value, e.g. sample.per_class=8")
    try:
        cfg = load_pipeline_config(args.config, args.overrides)
        pipe = Pipeline(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.plan:
        pipe.plan()
        return {}
    from vitvq.launch.orchestration.cluster import ClusterCheckError
    from vitvq.launch.orchestration.ray_train import ray_cluster
    with ray_cluster(args.address):
        try:
            results = pipe.run()
        except (KeyboardInterrupt, SystemExit):
            raise
        except ClusterCheckError as e:  # refused before any step ran
            sys.exit(f"error: {e}")
        except Exception as e:  # noqa: BLE001 - a step's failure, said in one place with what to do next
            detail = str(e).strip().splitlines()
            sys.exit(f"error: pipeline step {pipe.current} failed ({type(e).__name__}): "
                     f"{detail[-1] if detail else ''}\nthe steps before it are kept; rerun the same command to "
                     f"continue (a training resumes from its latest checkpoint in {pipe.root})")
    print(f"\npipeline {cfg.recipe}: {sum(r.status == 'ran' for r in results.values())} step(s) ran, "
          f"{sum(r.status == 'skipped' for r in results.values())} skipped; outputs in {pipe.root}")
    for r in results.values():
        out = ", ".join(f"{k}={Path(v).name}" for k, v in r.outputs.items())
        print(f"  {r.name:<7} {r.status:<8} {r.lineage[:12]}  {r.seconds:7.1f} s  run {r.run_id or '-'}  {out}")
    gfid = results.get("gfid")
    if gfid:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in gfid.metrics.items() if k.startswith("eval/"))
        print(f"  {shown}")
    if pipe.parent is not None and pipe.parent.run_id:
        print(f"  MLflow parent run {pipe.parent.run_id} (experiment {cfg.experiment})")
    return results


if __name__ == "__main__":
    main()
