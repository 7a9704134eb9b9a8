"""Data layer: shard writer, exactly resumable training stream, evaluation loader, built-in demo data.

Read first: ``data/stream.py`` (the training stream and its state), ``data/cursor.py`` (which sample goes
where), ``data/shards.py`` (the writer behind ``launch/prepare_data.py``); for stage 2, ``data/tokens.py``
(token shards, their stream and lineage) and ``data/encode.py`` (the job behind ``launch/encode_tokens.py``).
Names are imported lazily so that the shard writer starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "vitvq.data.config", "shard_spec": "vitvq.data.config",
    "TrainStream": "vitvq.data.stream", "EvalLoader": "vitvq.data.stream",
    "build_train_stream": "vitvq.data.stream", "build_eval_loader": "vitvq.data.stream",
    "ensure_demo_shards": "vitvq.data.builtin",
    "ShardError": "vitvq.data.urls", "ShardList": "vitvq.data.urls", "resolve_shards": "vitvq.data.urls", "index_checksum": "vitvq.data.urls",
    "TokenDataConfig": "vitvq.data.tokens", "build_token_stream": "vitvq.data.tokens",
    "build_token_eval_loader": "vitvq.data.tokens", "token_index": "vitvq.data.tokens", "token_grid": "vitvq.data.tokens",
    "token_vocab_size": "vitvq.data.tokens", "check_lineage": "vitvq.data.tokens", "TokenLineageError": "vitvq.data.tokens",
    "encode_tokens": "vitvq.data.encode", "ShardMismatch": "vitvq.data.verify",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
