"""Evaluate tokenizers and samples: reference statistics, rFID (+ PSNR/SSIM/LPIPS/codebook use), gFID + IS.

    python launch/evaluate.py ref-stats --shards VAL --resolution 256 --out ref.npz
    python launch/evaluate.py rfid --tokenizer tok.pt --shards VAL [--ref ref.npz] [--save-recons DIR]
    python launch/evaluate.py gfid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz

Images come from webdataset shards (``--shards``, as ``data.build_eval_loader`` reads them) or a folder
(``--images DIR``; ``--npz FILE`` too for ref-stats). ``--workers N`` spreads the Inception work over N Ray actors
(a local cluster, or ``--address`` for a running one; ``--workers 0`` runs in this process without Ray); the
result does not depend on N. Results print as a table with the protocol they were measured under, go to
``--json PATH``, and with ``--mlflow-run RUN_ID`` (rfid, gfid) into that run as ``eval/*`` metrics at the
checkpoint's step, the protocol as ``eval.protocol.*`` tags. ``--extractor tiny`` (tests) is NOT comparable to
published numbers. Each subcommand's flags are the fields of its config (``evaluation/jobs.py``, plus
``trainer.tracking.MlflowTarget``); ``--config FILE`` and dotted ``key=value`` overrides work too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from vitvq.configs.cli import ConfigParser
from vitvq.evaluation import jobs
from vitvq.evaluation.inception import InceptionWeightsError
from vitvq.trainer.tracking import MlflowTarget, log_evaluation


@dataclass
class RfidCommand(jobs.RfidConfig, MlflowTarget):
    """Reconstruction FID, PSNR, SSIM, LPIPS and codebook usage of a tokenizer, logged to its run on request."""


@dataclass
class GfidCommand(jobs.GfidConfig, MlflowTarget):
    """FID and Inception Score of generated samples, logged to the prior's run on request."""


COMMANDS = {c.command: c for c in (jobs.RefStatsConfig, RfidCommand, GfidCommand)}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = ConfigParser(commands=COMMANDS, prog="launch/evaluate.py", description=__doc__)
    _, cfg = parser.command(argv)
    try:
        with parser.refusals(cfg):
            result = jobs.evaluate(cfg)
    except InceptionWeightsError as e:
        raise SystemExit(f"error: {e}") from None
    jobs.print_result(cfg, result)
    if getattr(cfg, "mlflow_run", None):
        log_evaluation(cfg.mlflow_run, result["metrics"], result["protocol"], result["step"], cfg.tracking_uri)
        print(f"logged to MLflow run {cfg.mlflow_run} at step {result['step']}")
    return result


if __name__ == "__main__":
    main()
