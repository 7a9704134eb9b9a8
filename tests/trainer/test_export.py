"""The export holds exactly the fp32 master weights DeepSpeed trained, in every engine configuration.

Each configuration keeps its fp32 weights somewhere else (module weights at ZeRO 0, ZeRO partitions at 1/2,
``BF16_Optimizer`` partitions for bf16 at ZeRO 1, which ``zero_to_fp32`` cannot read). A bf16 run's module weights
are bf16: an export that took them would be off by up to a bf16 ulp, so equality to the masters is the check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitvq.models.tokenizer import Tokenizer
from vitvq.trainer.checkpoint import tag_of
from vitvq.trainer.export import export_checkpoint

pytestmark = pytest.mark.e2e  # 2-rank DeepSpeed runs
WORKER = Path(__file__).with_name("export_worker.py")
CONFIGS = ("0:fp32", "1:fp32", "1:bf16", "2:fp32", "2:bf16")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, run_on_two_ranks) -> Path:
    out = tmp_path_factory.mktemp("export")
    run_on_two_ranks(WORKER, out, *CONFIGS)
    return out


@pytest.mark.parametrize("spec", CONFIGS)
def test_export_equals_the_fp32_masters(runs: Path, tmp_path: Path, spec: str) -> None:
    zero, precision = spec.split(":")
    run = runs / f"zero{zero}_{precision}"
    want = torch.load(run / "masters.pt", weights_only=False)
    assert want["module_dtype"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")
    tok = Tokenizer.load_export(export_checkpoint(run, tmp_path / "tok.pt"))  # load_export is strict
    got = tok.state_dict()
    assert set(got) == set(want["params"]) | set(want["buffers"])
    for name, value in want["params"].items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], value), f"{name}: export differs from the fp32 master by " \
                                              f"{(got[name] - value).abs().max().item():.3g}"
    for name, value in want["buffers"].items():
        assert torch.equal(got[name].to(value.dtype), value), name
    assert tok.export_extra["step"] == 2 and tok.export_extra["stage"] == "stage1"


def test_export_reads_the_checkpoints_own_config_and_refuses_a_partial_one(runs: Path, tmp_path: Path) -> None:
    run = runs / "zero2_fp32"
    (run / "config.json").write_text(json.dumps({"model.encoder.width": 999}))  # a later run's config: ignored
    assert Tokenizer.load_export(export_checkpoint(run, tmp_path / "a.pt", tag_of(2))).cfg.encoder.width == 64
    partial = run / "checkpoints" / tag_of(9)
    partial.mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        export_checkpoint(run, tmp_path / "b.pt", tag_of(9))
