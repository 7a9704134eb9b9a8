"""Evaluation: FID, IS and rFID from merged statistics, on a pool of Ray workers, during training or offline.

Read first: ``evaluation/workers.py`` (the three evaluations and the worker that runs them),
``evaluation/metrics.py`` (the statistics and their protocol), ``evaluation/pool.py`` (the actor pool, also used
by other bulk jobs). ``launch/evaluate.py`` is the command line; ``evaluation/async_eval.py`` runs evaluations
beside a training run. Nothing here imports DeepSpeed or MLflow.
"""
