"""launch/evaluate.py: ref-stats -> gfid (PNG folder and ADM-style .npz), rfid into an MLflow run, errors.

Runs in this process (``main(argv)``) with ``--workers 0`` to stay fast; the Ray pool is covered by
tests/trainer/test_eval_workers.py, and one test runs the script as a command. The extractor is the tiny random
one (no Inception weights here): every output is labelled NOT comparable to published numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitvq.launch.evaluate import main
from vitvq.evaluation.inception import WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_SHA256

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--extractor", "tiny", "--workers", "0", "--no-progress"]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def ref(cifar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cat-ref.npz"
    main(["ref-stats", "--images", cifar("cat"), "--limit", "64", "--out", str(out), *FAST])
    return out


@pytest.fixture(scope="module")
def samples(cifar, tmp_path_factory) -> tuple[Path, Path]:
    """The same 50 real photos as an ADM-style .npz (uint8 NHWC under arr_0) and as a folder of PNGs."""
    tmp = tmp_path_factory.mktemp("samples")
    files = sorted(Path(cifar("dog")).glob("*.jpg"))[:50]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.savez(tmp / "samples.npz", arr_0=arr)
    (tmp / "png").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp / "png" / f"{i:05d}.png")
    return tmp / "samples.npz", tmp / "png"


def test_ref_stats_store_protocol_and_read_back(cifar, ref: Path, tmp_path: Path):
    with np.load(ref) as z:
        protocol = json.loads(str(z["protocol"]))
        assert z["mu"].shape == (64,) and z["sigma"].shape == (64, 64) and int(z["count"]) == 64
    assert protocol["count"] == 64 and protocol["resolution"] == "as stored"
    assert "NOT comparable" in protocol["implementation"] and protocol["weights_sha256"]
    # The same images against their stored statistics: FID ~0 once written and read back.
    out = main(["gfid", "--samples", cifar("cat"), "--limit", "64", "--ref", str(ref), *FAST])
    assert abs(out["metrics"]["eval/fid"]) < 1e-8


def test_gfid_on_npz_and_png_folder_agree(ref: Path, samples: tuple[Path, Path], tmp_path: Path):
    npz, png = samples
    a = main(["gfid", "--samples", str(npz), "--ref", str(ref), "--json", str(tmp_path / "a.json"), *FAST])
    b = main(["gfid", "--samples", str(png), "--ref", str(ref), "--batch-size", "7", *FAST])
    assert a["metrics"]["eval/fid"] > 0 and a["metrics"]["eval/is"] > 1
    for k in ("eval/fid", "eval/is", "eval/is_std"):
        assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-6)
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["metrics"] == a["metrics"] and saved["protocol"]["count"] == 50
    assert saved["protocol"]["is_splits"] == 10 and saved["protocol"]["reference"] == str(ref)
    assert saved["protocol"]["comparable_to_papers"] is False and saved["warnings"] == []
    assert saved["protocol"]["resolution"] == "32x32 (as generated)"


def test_gfid_against_adm_style_reference(ref: Path, samples: tuple[Path, Path], tmp_path: Path):
    with np.load(ref) as z:  # ADM's VIRTUAL_*.npz: mu, sigma (and activations), nothing else
        np.savez(tmp_path / "adm.npz", mu=z["mu"], sigma=z["sigma"], arr_0=np.zeros((2, 64), np.float32))
    ours = main(["gfid", "--samples", str(samples[0]), "--ref", str(ref), *FAST])
    adm = main(["gfid", "--samples", str(samples[0]), "--ref", str(tmp_path / "adm.npz"), *FAST])
    assert adm["metrics"]["eval/fid"] == pytest.approx(ours["metrics"]["eval/fid"], rel=1e-12)
    assert "protocol not recorded" in adm["protocol"]["reference_protocol"]["source"]


def test_rfid_logs_into_the_training_run(cifar, tmp_path: Path):
    from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
    from vitvq.trainer.tracking import get_or_create_experiment, mlflow_client
    torch.manual_seed(0)
    export = Tokenizer(TokenizerConfig.PRESETS["debug"]).save_export(tmp_path / "tok.pt", {"step": 123})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    run_id = client.create_run(get_or_create_experiment(client, "eval-test")).info.run_id
    out = main(["rfid", "--tokenizer", str(export), "--images", cifar("ship"), "--limit", "24", "--lpips", "off",
                "--save-recons", str(tmp_path / "rec"), "--mlflow-run", run_id, "--tracking-uri", uri, *FAST])
    assert out["step"] == 123 and len(list((tmp_path / "rec").glob("*.png"))) == 24
    assert {"eval/rfid", "eval/psnr", "eval/ssim", "eval/codebook_usage", "eval/perplexity"} <= set(out["metrics"])
    assert "eval/lpips" not in out["metrics"] and out["protocol"]["lpips"].startswith("not measured")
    run = client.get_run(run_id)
    hist = client.get_metric_history(run_id, "eval/rfid")
    assert [(m.step, m.value) for m in hist] == [(123, pytest.approx(out["metrics"]["eval/rfid"]))]
    assert "NOT comparable" in run.data.tags["eval.protocol.implementation"]
    assert run.data.tags["eval.protocol.reference"].startswith("the evaluated originals")
    assert run.info.status == "RUNNING"  # evaluation leaves the training run's status alone


def test_protocol_mismatch_is_reported(cifar, ref: Path, samples: tuple[Path, Path], tmp_path: Path):
    from vitvq.models.tokenizer import Tokenizer, TokenizerConfig
    export = Tokenizer(TokenizerConfig.PRESETS["debug"]).save_export(tmp_path / "tok.pt", {"step": 1})
    # The reference was made "as stored"; rFID crops to the tokenizer's 32 px: not the same protocol.
    with pytest.warns(UserWarning, match="FID not comparable"):
        out = main(["rfid", "--tokenizer", str(export), "--images", cifar("ship"), "--limit", "8", "--lpips", "off",
                    "--ref", str(ref), *FAST])
    assert any(w.startswith("crop: reference 'as stored'") for w in out["warnings"])
    small = tmp_path / "ref16.npz"
    main(["ref-stats", "--images", cifar("cat"), "--limit", "16", "--resolution", "16", "--out", str(small), *FAST])
    with pytest.warns(UserWarning, match="FID not comparable"):
        out = main(["gfid", "--samples", str(samples[0]), "--ref", str(small), *FAST])
    assert out["warnings"] == ["resolution: reference 16x16 vs samples 32x32"]


def test_missing_inception_weights_exit_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     ref: Path, samples: tuple[Path, Path]):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["gfid", "--samples", str(samples[0]), "--ref", str(ref), "--workers", "0"])
    for needed in (WEIGHTS_FILE, WEIGHTS_SHA256, "--inception-weights", WEIGHTS_ENV):
        assert needed in str(e.value)


def test_runs_as_a_command(ref: Path, samples: tuple[Path, Path], tmp_path: Path):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "launch/evaluate.py", "gfid", "--samples", str(samples[0]), "--ref", str(ref),
           "--json", str(tmp_path / "out.json"), *FAST]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "eval/fid" in proc.stdout and "NOT comparable to published numbers" in proc.stdout
    assert json.loads((tmp_path / "out.json").read_text())["command"] == "gfid"
