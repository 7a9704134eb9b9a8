"""Evaluation: FID, IS and rFID from merged statistics, on a pool of Ray workers, during training or offline.

Read first: ``evaluation/workers.py`` (the three evaluations and the worker that runs them),
``evaluation/metrics.py`` (the statistics and their protocol), ``data/pool.py`` (the actor pool, also used
by other bulk jobs), ``evaluation/jobs.py`` (the jobs: a typed config and one function each for sampling,
reference statistics, rFID and gFID; ``launch/sample.py`` and ``launch/evaluate.py`` are their command lines);
``evaluation/async_eval.py`` runs evaluations beside a training run. Nothing here imports DeepSpeed or MLflow.
"""
