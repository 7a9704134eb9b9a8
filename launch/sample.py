"""Sample images from a trained prior for gFID: an ADM-style ``.npz``, a picture, and the protocol.

    python launch/sample.py --prior prior.pt --tokenizer tokenizer.pt --per-class 50 --cfg 2.0 --seed 0 \\
        --out samples.npz [--workers 4 --device cuda --gpus-per-worker 1]
    python launch/sample.py --config sampling.yaml --out samples.npz top_k=100      # YAML, flags, then overrides
    python launch/evaluate.py gfid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz

Writes ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 class labels for a class-conditional prior,
as ADM's ``sample.py`` and evaluator use them; uncompressed, so evaluation workers memory-map it), a grid of the
first samples of the first classes (``samples.grid.png``) and the protocol (``samples.protocol.json``), and prints
the gfid command to run next. Sample i is a function of i, the seed and the sampling settings only: the same for
any ``--workers`` and ``--batch-size`` on a CPU (on GPUs for any ``--workers``; see ``evaluation/sampling.py``).
The flags are the fields of ``evaluation.jobs.SampleConfig`` (``--help``); the job is ``evaluation.jobs.sample``.
"""

from __future__ import annotations

from typing import Any, Optional

from vitvq.configs.cli import ConfigParser
from vitvq.evaluation.jobs import SampleConfig, print_samples, sample


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = ConfigParser(SampleConfig, prog="launch/sample.py", description=__doc__)
    cfg = parser.config(argv)
    with parser.refusals():  # what the prior cannot take (classes, guidance, top_k) names its flag too
        result = sample(cfg)
    print_samples(result)
    return result


if __name__ == "__main__":
    main()
