"""Everything DeepSpeed: process group, engine construction from our typed config, checkpoint conversion.

This is the only module in the project that imports deepspeed. The rules it follows come from what was
verified about DeepSpeed GAN training (../shared/REFERENCE.md, "The distributed stack"):
- AdamW is passed as an optimizer object: an ``optimizer`` block would JIT-build ``fused_adam`` on the CPU.
- ``gradient_clipping`` is always written (0.19.3 changed its default to 1.0).
- bf16 keeps fp32 master weights and accumulates gradients in fp32 (``grad_accum_dtype``).
- A ZeRO checkpoint only loads at the world size that wrote it; other sizes go through the universal format.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_INFO

from vitvq.trainer.config import OptimConfig, TrainConfig
from vitvq.trainer.parallelize import compute_dtype


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now, chosen by the OS (the process group's MASTER_PORT, Ray dashboards,
    tests' job servers). Free only until someone else binds it: use it at once."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800) -> DistInfo:
    """Join the process group set up by ``deepspeed``, ``torchrun``, Ray Train, or none (plain ``python``);
    collectives fail after ``timeout_s`` seconds of waiting (``train.dist_timeout_s``)."""
    if "RANK" not in os.environ:  # plain `python launch/...`: a group of one, so every code path is the same
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False,
                                   timeout=timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over data-parallel ranks; injected into the quantizer for codebook statistics."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable value)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group together: a gloo rank torn down by the interpreter's exit while its peer still
    talks to it can abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank, so that every rank takes the same branch around collectives."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_sum(t)
    return bool(t.item() > 0)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to ``min_ratio`` (ViT-VQGAN section 3)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(optim: OptimConfig, train: TrainConfig, accum: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config, built in one place from our typed config and the Trainer's accumulation."""
    bf16 = compute_dtype(train) == torch.bfloat16
    cfg: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if bf16:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def build_engine(module: torch.nn.Module, optim: OptimConfig, train: TrainConfig, accum: int, schedule_steps: int,
                 load_universal: bool = False) -> Any:
    """One DeepSpeed engine with its own AdamW and a warm-up + cosine schedule over ``schedule_steps`` steps."""
    params = [p for p in module.parameters() if p.requires_grad]
    # Biases, norms and codebooks carry no weight decay (1-d or lookup tables would be shrunk towards zero).
    decays = [p.ndim >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
    decay = [p for p, d in zip(params, decays) if d]
    no_decay = [p for p, d in zip(params, decays) if not d]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas, eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, optim.warmup_steps, schedule_steps, optim.min_lr_ratio))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                      config=deepspeed_config(optim, train, accum, load_universal))
    return engine


def save_engine(engine: Any, ckpt_dir: Path, tag: str, client_state: dict) -> None:
    """Every rank calls this; the client state also marks the checkpoint as convertible to universal."""
    state = dict(client_state)
    state[UNIVERSAL_CHECKPOINT_INFO] = {}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)


def load_engine(engine: Any, ckpt_dir: Path, tag: str, buffers_from: Optional[str] = None) -> dict:
    """Load engine checkpoint ``tag``; ``buffers_from``: the original tag of a universal-format ``tag``.

    DeepSpeed's universal load (``checkpoint.load_universal``) restores parameters, optimizer and scheduler but
    never calls ``load_module_state_dict`` (deepspeed 0.19.8, ``engine._load_checkpoint``): every buffer would
    come back at its initial value -- a k-means "initialised" flag False (the next start re-runs k-means over the
    trained codes), EMA codebooks at random, codebook windows empty. The buffers are read back from the original
    checkpoint's module file instead, where every rank's copy is the one rank 0 saved (as on a same-size resume).
    """
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if buffers_from is not None:
        load_buffers(engine.module, ckpt_dir / buffers_from)
    return client_state or {}


def load_buffers(module: torch.nn.Module, folder: Path) -> list[str]:
    """Copy every persistent buffer of ``module`` from the DeepSpeed module file in ``folder``; returns the names.
    A buffer missing from the file, or of another shape, is an error naming it (a checkpoint of another model)."""
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed module file (mp_rank_*_model_states.pt) to read the "
                                f"buffers from: the checkpoint is damaged; point latest at an older complete one")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    params = {n for n, _ in module.named_parameters()}
    names = []
    with torch.no_grad():
        for name, buf in module.state_dict(keep_vars=True).items():
            if name in params or not isinstance(buf, torch.Tensor):
                continue
            if name not in saved or saved[name].shape != buf.shape:
                got = "missing" if name not in saved else f"of shape {tuple(saved[name].shape)}"
                raise RuntimeError(f"{files[0]}: buffer {name!r} is {got}, the model's is {tuple(buf.shape)}: the "
                                   f"checkpoint was written by another model")
            buf.copy_(saved[name])
            names.append(name)
    return names


def convert_to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert ``ckpt_dir/tag`` (ZeRO at its old world size) to ``ckpt_dir/<tag>_universal``; returns the new tag."""
    out_tag = f"{tag}_universal"
    if not (ckpt_dir / out_tag).exists():
        tmp = ckpt_dir / f"{out_tag}.tmp"
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(ckpt_dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"converting {ckpt_dir / tag} to universal format failed:\n{res.stderr[-3000:]}")
        tmp.rename(ckpt_dir / out_tag)
    return out_tag


def engine_fp32_state(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """The complete state dict (every parameter and buffer) of engine ``tag`` in checkpoint ``ckpt_dir``, with
    parameters at their fp32 master values, merged on the CPU without a process group.

    Where the fp32 values are depends on the optimizer DeepSpeed chose, so each case reads its own files:
    - ZeRO 0 (fp32 only: ``train.precision`` refuses bf16 at stage 0): the module weights are the fp32 weights;
    - bf16 at ZeRO 1 (DeepSpeed's ``BF16_Optimizer``, files ``bf16_zero_pp_rank_*``): ``zero_to_fp32`` does not
      read them, so the checkpoint is converted to universal format, which holds every parameter's fp32 value;
    - otherwise ZeRO 1/2: ``zero_to_fp32`` merges the fp32 partitions. ZeRO 1 leaves out frozen parameters;
      those, and anything else it leaves out, are taken from the module file only if DeepSpeed lists them as
      frozen parameters or buffers (their value there is exact), else this refuses.
    """
    files = sorted((ckpt_dir / tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir / tag} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    model_states = torch.load(files[0], map_location="cpu", weights_only=False)
    module = model_states["module"]
    if zero_stage == 0:
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if any((ckpt_dir / tag).glob("bf16_zero_pp_rank_*_optim_states.pt")):
        zero = ckpt_dir / convert_to_universal(ckpt_dir, tag) / "zero"
        fp32 = {k: torch.load(zero / k / "fp32.pt", map_location="cpu", weights_only=False)["param"]
                for k in module if (zero / k / "fp32.pt").is_file()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        fp32 = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    exact_in_module = set(model_states.get("buffer_names") or []) | set(model_states.get("frozen_param_shapes") or {})
    unknown = sorted(set(fp32) - set(module))
    lacking = sorted(k for k in module if k not in fp32 and k not in exact_in_module)
    if unknown or lacking:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag}: DeepSpeed's fp32 state does not match the module "
                           f"(unknown keys {unknown}, trainable parameters without an fp32 value {lacking})")
    out = {k: fp32[k] if k in fp32 else module[k] for k in module}  # the module's key order
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def _link_optimizer_states(zero_optimizer: Any) -> None:
    """Make every parameter's optimizer-state fragments reachable (``safe_*_full_optimizer_state``).

    deepspeed 0.19.8 links them lazily after the first ``step()``, from inside the step of parameter group 0,
    while the torch optimizer's ``param_groups`` holds that one group only: groups >= 1 (our no-weight-decay
    group: biases, norms, codebooks) stay unlinked for good, and reading their moments raises "exp_avg not found
    in optimizer state fragment". Linking again outside the step reaches every group; it only creates views.
    """
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def row_writer(engine: Any) -> Callable[[torch.nn.Parameter, torch.Tensor, torch.Tensor], None]:
    """``write(param, rows, values)``: set rows of one of ``engine``'s parameters where DeepSpeed keeps them too.

    ZeRO 1/2 and the bf16 optimizer hold an fp32 master copy of every parameter and copy it back into the module
    after each ``engine.step()``: a write to the parameter alone is undone one step later. So the rows go into
    the master (``safe_set_full_fp32_param``) and the module, and their Adam moments are zeroed, so that a
    restarted code does not move with the momentum of the code it replaces. The full-tensor getters are
    collectives over the data-parallel group: every rank writes the same rows in the same order (the codebook's
    restart and k-means decisions are identical on every rank). At ZeRO 0 in fp32 the torch optimizer holds the
    parameter itself and its own state.
    """
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                                 safe_set_full_optimizer_state)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO / bf16 wrappers keep torch's here

    @torch.no_grad()
    def write(param: torch.nn.Parameter, rows: torch.Tensor, values: torch.Tensor) -> None:
        param.data[rows] = values.to(param.dtype)
        full = safe_get_full_fp32_param(param)
        if full is None:  # ZeRO 0, fp32: no master copy
            state = base.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0
            return
        full[rows] = values.to(full.dtype)
        safe_set_full_fp32_param(param, full)
        if engine.global_steps > 0:  # the moments exist from the first step on (the same count on every rank)
            _link_optimizer_states(engine.optimizer)
            for key in ("exp_avg", "exp_avg_sq"):
                moment = safe_get_full_optimizer_state(param, key)
                moment[rows] = 0
                safe_set_full_optimizer_state(param, moment, key)

    return write


def grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
