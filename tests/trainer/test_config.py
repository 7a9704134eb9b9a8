"""Typed configs: every recipe loads, bad values are refused at load with the field's dotted name, the
resolved config survives the flat (MLflow params) form, and every field carries a one-line docstring."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vitvq.configs import ConfigError, field_docs, flatten
from vitvq.trainer.config import Stage1Config, config_hash, load_stage1_config, stage1_from_flat

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs" / "stage1").glob("*.yaml"))
DEBUG = ROOT / "configs" / "stage1" / "debug.yaml"


def test_the_recipes_the_issue_asks_for_exist() -> None:
    names = {p.stem for p in RECIPES}
    assert {"debug", "demo", "vit_ss_imagenet", "vit_bb_imagenet", "vit_sl_imagenet", "vit_ffhq",
            "vqgan_f16_imagenet", "vqvae_cifar10"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_round_trips_through_its_flat_form(recipe: Path) -> None:
    cfg = load_stage1_config(recipe)
    assert cfg.recipe == recipe.stem
    flat = flatten(cfg)
    assert all("." in k or k == "recipe" for k in flat)
    assert all(not isinstance(v, dict) for v in flat.values())
    back = stage1_from_flat(flat)
    assert back == cfg and config_hash(back) == config_hash(cfg)


def test_paper_values_of_the_vit_ss_recipe() -> None:
    cfg = load_stage1_config(ROOT / "configs/stage1/vit_ss_imagenet.yaml")
    enc, q = cfg.model.encoder, cfg.model.quantizer
    assert (enc.width, enc.depth, enc.heads, enc.mlp_dim, enc.patch_size) == (512, 8, 8, 2048, 8)
    assert (q.codebook_size, q.code_dim, q.l2_norm, q.beta) == (8192, 32, True, 0.25)
    assert (cfg.loss.logit_laplace_weight, cfg.loss.perceptual_weight, cfg.loss.adv_weight, cfg.loss.l2_weight) == \
        (0.1, 0.1, 0.1, 1.0)
    assert cfg.optim_g.betas == (0.9, 0.99) and cfg.optim_g.lr == 1e-4 and cfg.optim_g.weight_decay == 1e-4
    assert cfg.train.global_batch_size == 256 and cfg.train.steps == 500_000 and cfg.disc.kind == "stylegan2"


def test_overrides_use_dotted_paths_and_refine_presets() -> None:
    cfg = load_stage1_config(DEBUG, ["train.steps=3", "model.encoder.depth=1", "optim_g.betas=[0.5, 0.9]",
                                     "data.val_shards=null"])
    assert cfg.train.steps == 3 and cfg.model.encoder.depth == 1 and cfg.model.decoder.depth == 2
    assert cfg.optim_g.betas == (0.5, 0.9) and cfg.data.val_shards is None
    assert load_stage1_config(DEBUG, ["model.encoder=small"]).model.encoder.width == 512


@pytest.mark.parametrize("override, field, value", [
    ("train.steps=-1", "train.steps", -1),
    ("model.encoder.width=66", "model.encoder.width", 66),              # not divisible by its 4 heads
    ("model.encoder.heads=3", "model.encoder.width", 64),               # 64 not divisible by 3 heads
    ("model.image_size=36", "model.image_size", 36),                    # 36 not divisible by the 8-px patch
    ("loss.gan_loss=wasserstein", "loss.gan_loss", "wasserstein"),      # unknown loss name
    ("model.quantizer.codebook_size=0", "model.quantizer.codebook_size", 0),
    ("train.precision=fp16", "train.precision", "fp16"),
    ("train.zero_stage=3", "train.zero_stage", 3),
    ("optim_d.lr=0", "optim_d.lr", 0),
    ("train.global_batch_size=5", "train.global_batch_size", 5),        # not a multiple of micro batch 2
    ("data.image_size=64", "data.image_size", 64),                      # disagrees with model.image_size 32
    ("train.stpes=3", "train.stpes", 3),                                # unknown key (typo)
    ("model.output=pixels", "loss.logit_laplace_weight", 0.1),          # NLL needs the logit-Laplace head
])
def test_bad_values_are_refused_at_load_naming_the_field(override: str, field: str, value) -> None:
    with pytest.raises(ConfigError) as err:
        load_stage1_config(DEBUG, [override])
    assert err.value.field == field, str(err.value)
    assert err.value.value == value
    assert field in str(err.value) and err.value.hint


def test_bf16_at_zero_stage_0_is_refused_at_load() -> None:
    # DeepSpeed 0.19.8 raises "unsupported mix of model_dtype and grad_accum_dtype" only when the engine is built.
    with pytest.raises(ConfigError) as err:
        load_stage1_config(DEBUG, ["train.precision=bf16", "train.zero_stage=0"])
    assert err.value.field == "train.precision" and "zero_stage" in err.value.hint
    assert load_stage1_config(DEBUG, ["train.precision=bf16", "train.zero_stage=1"]).train.zero_stage == 1


def test_a_bad_value_in_a_yaml_file_names_the_field(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(DEBUG.read_text() + "\neval:\n  workers: 0\n")
    with pytest.raises(ConfigError, match=r"eval\.workers"):
        load_stage1_config(recipe)


def test_the_launcher_exits_with_the_field_name_not_a_traceback(capsys) -> None:
    from vitvq.trainer.cli import parse_config
    with pytest.raises(SystemExit) as exc:
        parse_config(Stage1Config, str(DEBUG), ["train.micro_batch_size=0"])
    assert "train.micro_batch_size" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        parse_config(Stage1Config, str(DEBUG), ["steps"])
    assert "key=value" in str(exc.value.code)


def _dataclasses(cls: type, seen: set) -> None:
    if cls in seen:
        return
    seen.add(cls)
    import typing
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            _dataclasses(t, seen)


def test_every_field_has_a_docstring() -> None:
    seen: set = set()
    _dataclasses(Stage1Config, seen)
    assert len(seen) >= 10
    for cls in seen:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@dataclasses.dataclass
class _Inner:
    a: int = 1
    """First."""
    b: int = 2
    """Second."""


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(a=5))
    """A section whose default differs from the class defaults (as a stage's own train section does)."""


def test_a_partial_section_refines_the_fields_default_not_the_class_defaults() -> None:
    from vitvq.configs import load
    assert load(_Outer, None, ["inner.b=3"]).inner == _Inner(a=5, b=3)
    assert load(_Outer, None, []).inner == _Inner(a=5, b=2)


STAGE2_RECIPES = sorted((ROOT / "configs" / "stage2").glob("*.yaml"))


def test_the_stage2_recipes_the_issue_asks_for_exist_and_load() -> None:
    from vitvq.trainer.config import load_job_config
    from vitvq.trainer.stage2 import Stage2Config
    assert {"debug", "demo", "vim_base_imagenet", "vim_large_imagenet", "llamagen_b_imagenet", "ffhq"} <= {
        p.stem for p in STAGE2_RECIPES}
    for recipe in STAGE2_RECIPES:
        cfg = load_job_config(Stage2Config, recipe)
        assert cfg.recipe == recipe.stem and cfg.train.experiment == "vitvq-stage2", recipe.stem
    vim = load_job_config(Stage2Config, ROOT / "configs/stage2/vim_base_imagenet.yaml")
    assert (vim.prior.depth, vim.prior.width, vim.optim.lr, vim.optim.betas, vim.train.global_batch_size) == (
        24, 1536, 4.5e-4, (0.9, 0.96), 1024)  # the paper's VIM-Base settings
    assert load_job_config(Stage2Config, ROOT / "configs/stage2/ffhq.yaml").prior.num_classes == 0


def test_every_stage2_field_has_a_docstring_and_bad_values_name_the_field() -> None:
    from vitvq.trainer.config import load_job_config
    from vitvq.trainer.stage2 import Stage2Config
    seen: set = set()
    _dataclasses(Stage2Config, seen)
    for cls in seen:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    for override, field in (("samples.top_p=0", "samples.top_p"), ("samples.classes=[1,1]", "samples.classes"),
                            ("tokens.shuffle_buffer=0", "tokens.shuffle_buffer"), ("prior.heads=5", "prior.width")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_job_config(Stage2Config, ROOT / "configs/stage2/debug.yaml", [override])


def test_the_discriminator_schedule_spans_the_steps_it_is_active() -> None:
    """D steps only from loss.disc_start on, so its warm-up + cosine must span train.steps - disc_start steps
    (sized by train.steps its cosine never finished)."""
    import torch

    from vitvq.trainer.engine import DistInfo
    from vitvq.trainer.stage1 import Stage1Task
    cfg = load_stage1_config(DEBUG, ["loss.disc_start=5", "train.steps=8"])
    task = Stage1Task(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    assert task.schedule_steps("discriminator") == 3 and task.schedule_steps("generator") == 8
