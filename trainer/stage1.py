"""Stage 1 as a task for the Trainer: the tokenizer GAN step on two DeepSpeed engines, its data, validation,
reconstruction grids, the tokenizer export and rFID while training goes on (``trainer/task.py`` has the protocol).

The rules below are the ones verified against a plain-PyTorch reference (../shared/REFERENCE.md):
- every forward goes through ``engine.module``: calling the engine itself hooks its outputs, and the
  ``autograd.grad`` of the adaptive weight and of R1 then crashes ZeRO-2's gradient reduction;
- one ``engine.backward`` per engine per micro-step (a second one would overwrite the first under ZeRO-2);
- the discriminator is frozen while the generator loss runs through it.
Both losses of a micro-batch are computed before either backward so that a non-finite value can drop the
whole micro-batch on every rank at once (no rank may skip a collective alone).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from vitvq.data import build_eval_loader, build_train_stream, index_checksum, shard_spec
from vitvq.models.discriminators import build_discriminator
from vitvq.models.losses import Stage1Loss, psnr
from vitvq.models.tokenizer import Tokenizer
from vitvq.trainer.config import OptimConfig, Stage1Config
from vitvq.models.codebook import UsageWindow, code_histogram, code_stats
from vitvq.trainer.engine import DistInfo, all_reduce_sum, any_rank, grad_norm, row_writer
from vitvq.trainer.parallelize import compute_dtype
from vitvq.trainer.task import Every, Evaluator, Stream


class Stage1Task:
    """Turns a batch into generator and discriminator updates; owns the frozen loss module (LPIPS)."""

    name = "stage1"
    engine_names = ("generator", "discriminator")
    export_engine = "generator"
    export_file = "tokenizer.pt"
    progress = {"loss": "train/total_loss", "img_s": "perf/images_per_s"}
    throughput = ("perf/images_per_s", 1.0)

    def __init__(self, cfg: Stage1Config, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.dtype = compute_dtype(cfg.train)
        self.loss = Stage1Loss(cfg.loss, cfg.model.output).to(dist.device)
        self.engines: dict[str, Any] = {}
        self._shards: dict[str, Optional[str]] = {}
        self._picture_batch: Optional[torch.Tensor] = None

    # -- construction -------------------------------------------------------------------------
    def build_modules(self) -> dict[str, nn.Module]:
        tok = Tokenizer(self.cfg.model)
        disc = build_discriminator(self.cfg.disc, self.cfg.model.image_size, self.cfg.model.in_channels)
        return {"generator": tok, "discriminator": disc}

    def optim_config(self, name: str) -> OptimConfig:
        return self.cfg.optim_g if name == "generator" else self.cfg.optim_d

    def schedule_steps(self, name: str) -> int:
        """The discriminator steps only from ``loss.disc_start`` on: its warm-up and cosine span those steps."""
        if name == "discriminator" and self.cfg.loss.adv_weight > 0:
            return max(1, self.cfg.train.steps - self.cfg.loss.disc_start)
        return self.cfg.train.steps

    def attach(self, engines: dict[str, Any]) -> None:
        self.engines = engines
        self.gen.set_all_reduce(all_reduce_sum, rank=self.dist.rank, world_size=self.dist.world_size)
        self.gen.quantizer.set_row_writer(row_writer(engines["generator"]))  # restarts reach DeepSpeed's masters
        self.loss.set_all_reduce(all_reduce_sum)
        model = self.cfg.model
        self.health = UsageWindow(model.vocab_size, model.quantizer.health_window, levels=model.codes_per_position)

    @property
    def gen(self) -> Tokenizer:
        return self.engines["generator"].module

    @property
    def disc(self) -> nn.Module:
        return self.engines["discriminator"].module

    def _disc_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        disc = self.disc
        return lambda img: disc(img.to(self.dtype)).float()

    # -- data -----------------------------------------------------------------------------------
    def shards(self, split: str) -> Optional[str]:
        """The shard spec of ``split``, resolved once per run (the built-in demo shards are written on first use)."""
        if split not in self._shards:
            self._shards[split] = shard_spec(self.cfg.data, split)
        return self._shards[split]

    def train_stream(self, state: Optional[dict[str, Any]]) -> Stream:
        return build_train_stream(self.cfg.data, shards=self.shards("train"), batch_size=self.cfg.train.micro_batch_size,
                                  rank=self.dist.rank, world_size=self.dist.world_size, seed=self.cfg.train.seed,
                                  state=state)

    def tags(self) -> dict[str, str]:
        return {"dataset_index_sha256": index_checksum(self.shards("train"), self.cfg.data.index) or "none"}

    def linked_runs(self, run_id: str) -> dict[str, dict[str, str]]:
        return {}

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "codebook_health": self.health.state_dict()}  # LeCam EMAs: loss

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state["loss"])
        self.health.load_state_dict(state["codebook_health"])

    def rank_state_dict(self) -> dict:
        """Each rank's dead-code restart pool: the vectors its next restart draws from."""
        return {"restart_pools": [cb.pool_state() for cb in self.gen.quantizer.codebooks()]}

    @staticmethod
    def resize_rank_states(old: list[Optional[dict]], rank: int, world: int) -> dict:
        """At another world size no vector is lost: each codebook's old pools, joined in old-rank order, are dealt
        out row by row (new rank r takes rows r, r + world, ...); a rank dealt nothing starts with an empty pool."""
        saved = [s["restart_pools"] for s in old if s and s.get("restart_pools") is not None]
        if not saved:
            return {"restart_pools": None}
        pools = []
        for pieces in zip(*saved, strict=True):
            kept = [p for p in pieces if p is not None]
            joined = torch.cat(kept)[rank::world] if kept else None
            pools.append(joined if joined is not None and len(joined) else None)
        return {"restart_pools": pools}

    def load_rank_state_dict(self, state: dict) -> None:
        pools = state.get("restart_pools")
        if pools is not None:
            for cb, pool in zip(self.gen.quantizer.codebooks(), pools, strict=True):
                cb.load_pool_state(pool)

    # -- once at the start, and after each optimizer step ---------------------------------------
    @torch.no_grad()
    def on_start(self) -> None:
        """k-means codebook initialisation on a fresh run (``quantizer.init: kmeans``; a resumed run has it saved).

        The lookup vectors come from a stream of their own (the training stream's position is untouched), about
        ``kmeans_points`` of them over all ranks; the quantizer gathers them so that every rank clusters the same
        points."""
        quantizer = self.gen.quantizer
        if not quantizer.needs_init:
            return
        qc, world = self.cfg.model.quantizer, self.dist.world_size
        stream = build_train_stream(replace(self.cfg.data, num_workers=0), shards=self.shards("train"),
                                    batch_size=self.cfg.train.micro_batch_size, rank=self.dist.rank,
                                    world_size=world, seed=self.cfg.train.seed + 1)
        per_rank, parts, have = -(-qc.kmeans_points // world), [], 0
        while have < per_rank:  # an epoch-mode stream ends: start it again
            for batch in stream:
                parts.append(self.gen.lookup_vectors(batch["image"].to(self.dist.device).to(self.dtype)))
                have += parts[-1].shape[0]
                if have >= per_rank:
                    break
        local = torch.cat(parts)[:per_rank]  # (n, C): the same n on every rank (equal micro-batches)
        quantizer.init_codebooks(local, seed=self.cfg.train.seed)  # on the vectors of all ranks
        if self.dist.is_main:
            print(f"codebook initialised by k-means on {per_rank * world} lookup vectors")

    def after_step(self, step: int) -> None:
        self.health.end_step(self.gen.quantizer.end_step(step))  # restarts when due (collective)

    # -- one micro-step -----------------------------------------------------------------------
    def micro_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor] | None:
        """Forward, both losses, then one backward + step per engine. None if the micro-batch was dropped."""
        g_engine, d_engine = self.engines["generator"], self.engines["discriminator"]
        x = batch["image"].to(self.dist.device, non_blocking=True)  # (B, 3, H, W) in [-1, 1], fp32
        self.gen.set_step(step)
        d_active = self.loss.disc_active(step)
        disc_fn = self._disc_fn() if d_active else None

        self.disc.requires_grad_(False)
        dec_out, q = self.gen(x.to(self.dtype))
        dec_out = dec_out.float()
        loss_g, metrics = self.loss.generator_loss(x, dec_out, q.loss.float(), disc_fn, step,
                                                   last_layer=self.gen.last_layer)
        self.disc.requires_grad_(True)
        loss_d = None
        if d_active:
            x_rec = self.gen.to_image(dec_out).detach()
            loss_d, d_metrics = self.loss.discriminator_loss(x, x_rec, disc_fn, step)
            metrics.update(d_metrics)

        bad = not torch.isfinite(loss_g).item() or (loss_d is not None and not torch.isfinite(loss_d).item())
        if any_rank(bad, self.dist.device):  # dropped on every rank: keep no statistic of this micro-batch
            self.gen.quantizer.discard()
            self.loss.discard()
            return None
        g_engine.backward(loss_g)
        g_engine.step()
        if loss_d is not None:
            d_engine.backward(loss_d)
            d_engine.step()
        self.gen.quantizer.commit()  # EMA codes and the restart window take this micro-batch now
        self.loss.commit()
        self.health.add(q.counts)
        metrics["codebook_usage"] = q.stats["usage"].float()
        metrics["perplexity"] = q.stats["perplexity"].float()
        return {k: v.detach().float().reshape(()) if v.numel() == 1 else v.detach().float().mean()
                for k, v in metrics.items()}

    def engine_metrics(self) -> dict[str, float]:
        g, d = self.engines["generator"], self.engines["discriminator"]
        out = {"train/lr": g.get_lr()[0], "train/grad_norm_g": grad_norm(g), "train/grad_norm_d": grad_norm(d)}
        out.update({f"codebook/{k}": v for k, v in self.health.stats().items()})  # over the health window
        return out

    # -- validation, pictures, evaluation, export -----------------------------------------------
    @property
    def has_validation(self) -> bool:
        return bool(self.shards("val"))

    def _val_loader(self, batch_size: int, rank: int, world_size: int) -> Any:
        d = self.cfg.data
        return build_eval_loader(self.shards("val"), image_size=d.image_size, batch_size=batch_size, rank=rank,
                                 world_size=world_size, num_workers=0, pixel_range=d.pixel_range, index=d.index,
                                 verify=d.verify_shards)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """L1 and PSNR on [0, 1] pixels, LPIPS, and codebook usage over the held-out set; sums all-reduced."""
        loader = self._val_loader(self.cfg.train.micro_batch_size, self.dist.rank, self.dist.world_size)
        max_batches = self.cfg.train.val_batches
        gen = self.gen
        was_training = gen.training
        gen.eval()
        # eval mode: the quantizer runs no collectives (ranks may hold different numbers of val batches)
        model = self.cfg.model
        sums = torch.zeros(4, dtype=torch.float64, device=self.dist.device)  # n, l1, psnr, lpips
        hist = torch.zeros(model.codes_per_position, model.vocab_size, dtype=torch.float64, device=self.dist.device)
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            x = batch["image"].to(self.dist.device)
            dec_out, q = gen(x.to(self.dtype))
            x_rec = gen.to_image(dec_out.float()).clamp(-1, 1)
            a, b = (x + 1) / 2, (x_rec + 1) / 2
            sums[0] += x.shape[0]
            sums[1] += (a - b).abs().flatten(1).mean(1).sum().double()
            sums[2] += psnr(a, b).sum().double()
            sums[3] += self.loss.lpips_distance(x, x_rec).sum().double()
            hist += code_histogram(q.indices, model.vocab_size).double()  # (levels, K): every residual level
        all_reduce_sum(sums)
        all_reduce_sum(hist)
        gen.train(was_training)
        n = max(sums[0].item(), 1.0)
        usage = code_stats(hist)
        return {"val/l1": sums[1].item() / n, "val/psnr": sums[2].item() / n, "val/lpips": sums[3].item() / n,
                "val/codebook_usage": float(usage["usage"]), "val/perplexity": float(usage["perplexity"]),
                "val/images": sums[0].item()}

    def picture_batch(self) -> torch.Tensor:
        """The same 8 images for every grid of a run: the first validation images, else the first training
        images of a stream of its own (never a batch taken from the training stream, which would shift it)."""
        if self._picture_batch is None:
            if self.has_validation:
                batch = next(iter(self._val_loader(8, 0, 1)))
            else:
                stream = build_train_stream(replace(self.cfg.data, num_workers=0), shards=self.shards("train"),
                                            batch_size=8, rank=0, world_size=1, seed=self.cfg.train.seed)
                batch = next(iter(stream))
            self._picture_batch = batch["image"]
        return self._picture_batch

    def pictures(self) -> dict[str, np.ndarray]:
        return {"reconstructions": self.reconstruction_grid(self.picture_batch()),
                "codebook_usage": usage_plot(self.health.counts().numpy(), self.health.stats())}

    @torch.no_grad()
    def reconstruction_grid(self, x: torch.Tensor, n: int = 8) -> np.ndarray:
        """Originals (top row) above reconstructions (bottom row), uint8 (H, W, 3)."""
        from vitvq.evaluation.pictures import image_grid
        gen = self.gen
        was_training = gen.training
        gen.eval()  # no collectives in eval mode: only rank 0 may be here
        x = x[:n].to(self.dist.device)
        x_rec = gen.to_image(gen(x.to(self.dtype))[0].float()).clamp(-1, 1)
        gen.train(was_training)
        return image_grid(torch.cat([x.float(), x_rec]).cpu(), x.shape[0], min_width=256)  # tiny images enlarged

    def evaluator(self, export: Callable[[Optional[str], Path], Path]) -> Optional[Evaluator]:
        return RFIDEvaluator(self.cfg, self.shards("val"), export) if self.cfg.eval.every else None

    @classmethod
    def write_export(cls, cfg: Stage1Config, state: dict[str, torch.Tensor], dest: Path, extra: dict[str, Any]) -> Path:
        tok = Tokenizer(cfg.model)
        tok.load_state_dict(state, strict=True)
        return tok.save_export(dest, extra)

    def summary(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        keys = ("train/total_loss", "val/psnr", "val/lpips", "val/codebook_usage", "val/perplexity",
                "codebook/usage", "codebook/perplexity", "codebook/dead_codes", "codebook/restarts")
        out = Path(self.cfg.train.out_dir)
        return [(k, f"{metrics[k]:.4f}") for k in keys if k in metrics] + [
            ("reconstructions", str(out / "reconstructions.png")), ("code usage", str(out / "codebook_usage.png")),
            ("tokenizer export", str(out / self.export_file))]


class RFIDEvaluator:
    """rFID of checkpoints on the validation shards, by Ray workers while training goes on (``eval.every``).

    Each due checkpoint is exported (``out_dir/exports/tokenizer_stepNNNNNNNN.pt``) and handed to
    ``vitvq.evaluation.async_eval.AsyncEvaluator``; results come back through ``poll``."""

    def __init__(self, cfg: Stage1Config, val_shards: Optional[str], export: Callable[[Optional[str], Path], Path]):
        from vitvq.evaluation.async_eval import AsyncEvaluator, Source
        e = cfg.eval
        self.due, self.export = Every(e.every, cfg.train.steps), export
        self.folder = Path(cfg.train.out_dir) / "exports"
        source = Source(shards=val_shards, resolution=cfg.data.image_size, index=cfg.data.index,
                        verify=cfg.data.verify_shards)  # remote val shards need the index, as validation does
        self.inner = AsyncEvaluator(source, ref=e.ref,
                                    workers=e.workers, extractor=e.extractor, inception_weights=e.inception_weights,
                                    batch_size=e.batch_size, lpips=e.lpips)

    def submit(self, step: int, tag: str) -> None:
        self.inner.submit(self.export(tag, self.folder / f"tokenizer_step{step:08d}.pt"), step)

    def poll(self) -> list[Any]:
        return self.inner.poll()

    def close(self) -> list[Any]:
        return self.inner.close()


def usage_plot(counts: np.ndarray, stats: dict[str, float]) -> np.ndarray:
    """Sorted code-usage histogram over the health window as a uint8 (H, W, 3) picture: a healthy codebook is a
    long flat curve, a collapsed one a few tall bars and a floor of unused codes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = np.sort(counts.reshape(-1))[::-1]  # residual: every (level, code) pair
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    colors = np.where(order > 0, "tab:blue", "lightgray")  # unused codes: a gray floor at 0.5
    ax.bar(np.arange(len(order)), np.maximum(order, 0.5), width=1.0, color=colors)
    ax.set_yscale("log")
    ax.set_xlim(0, len(order))
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("uses in window")
    ax.set_title(f"{stats['usage']:.1%} of {len(order)} codes used over {int(stats['window_steps'])} steps, "
                 f"perplexity {stats['perplexity']:.1f}", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img
