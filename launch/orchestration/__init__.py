"""Jobs placed on Ray: the Ray Train wrapper, the multi-node checks, the pipeline and its lineage.

The layer above the single-job Trainer (``vitvq.trainer``) and below the command-line scripts of ``launch/``; nothing
under ``trainer/``, ``evaluation/``, ``data/`` or ``models/`` imports it (``tests/test_layers.py``).
"""
