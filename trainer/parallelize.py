"""Parallelism applied to a task's modules from outside, in one place: activation checkpointing and the dtype.

The Trainer calls :func:`parallelize` on every module a task builds, before DeepSpeed wraps it, as torchtitan's
``parallelize_fn`` does; no task wraps its own blocks or picks its own dtype. ZeRO sharding and the bf16
master weights are DeepSpeed's (``trainer/engine.py``), configured from the same :func:`compute_dtype`.

The convention that makes this work for any model: a model keeps its repeated blocks in ``nn.ModuleList``
attributes named ``blocks`` (the ViT encoder and decoder, the CNN levels, the prior's transformer layers) and
reads the list on every call, so a wrapped block is the one that runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vitvq.trainer.config import TrainConfig


def compute_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype activations and parameters run in: DeepSpeed casts the modules to it, the tasks cast inputs."""
    return torch.bfloat16 if train.precision == "bf16" else torch.float32


def checkpointable_blocks(module: nn.Module) -> list[nn.Module]:
    """Every block of every ``blocks`` ModuleList inside ``module``, in registration order; a list nested inside
    another list's block is left to its outer block's recomputation."""
    lists = {name: child for name, child in module.named_modules()
             if name.rsplit(".", 1)[-1] == "blocks" and isinstance(child, nn.ModuleList)}
    outer = [n for n in lists if not any(n.startswith(o + ".") for o in lists if o != n)]
    return [block for n in outer for block in lists[n]]


def apply_ac(blocks: list[nn.Module]) -> None:
    """Recompute each block in backward (non-reentrant ``torch.utils.checkpoint``).

    The block's ``forward`` is wrapped in place rather than the block swapped for a wrapper module (torchtitan's
    ``checkpoint_wrapper``): that keeps the state-dict keys, so DeepSpeed checkpoints and exports load whether
    checkpointing was on or off. Non-reentrant, because the reentrant form breaks ``autograd.grad`` (the
    adaptive GAN weight and R1 differentiate through these blocks).
    """
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(modules: dict[str, nn.Module], train: TrainConfig) -> dict[str, nn.Module]:
    """Apply what ``train`` asks for to every module of a task; returns the same modules."""
    if train.activation_checkpointing:
        for module in modules.values():
            apply_ac(checkpointable_blocks(module))
    return modules


__all__ = ["compute_dtype", "checkpointable_blocks", "apply_ac", "parallelize"]
