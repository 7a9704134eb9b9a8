"""The single-file export format shared by every model: fp32 weights, the structured config, provenance.

``Tokenizer`` and ``Prior`` write and read their exports through these two functions, each with its own format
tag, so that stage 2 and evaluation load a model without DeepSpeed and a file of one kind is never taken for
the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from vitvq.configs import to_dict


def write_export(path: str | Path, fmt: str, cfg: Any, module: nn.Module, extra: Optional[dict[str, Any]]) -> Path:
    """Floating tensors as fp32 on the CPU (others as they are), atomically: a crash never leaves a half-written
    export under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in module.state_dict().items()}
    payload = {"format": fmt, "config": to_dict(cfg), "state_dict": state, "extra": dict(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_export(path: str | Path, fmt: str, what: str, hint: str = "",
                map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of an export of format ``fmt``; refuses a missing file (with ``hint``) or another format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} export {path} not found{hint}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path} is not a vitvq {what} export (expected format {fmt!r})")
    return payload


__all__ = ["write_export", "read_export"]
