"""evaluation/sampling.py and launch/sample.py: samples that are functions of their index only (any batch size,
any number of Ray workers), exactly ``per_class`` of each class in class-major order with a seed of their own,
an npz that ``launch/evaluate.py gfid`` reads, and refusals that name the flag or both files.

The prior is the ``debug`` preset (vocab 64, grid 4, 10 classes) with random weights (its head is zero-initialised,
which would make every token uniform), the tokenizer the ``debug`` one (64 codes, 4x4 tokens at 32 px).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitvq.configs import from_dict
from vitvq.evaluation.sampling import (SampleJob, SamplePlan, SampleWorker, check_exports, sample_images,
                                       sample_seed)
from vitvq.launch.sample import main
from vitvq.models.prior import Prior, PriorConfig
from vitvq.models.sampling import SamplingSettings
from vitvq.models.tokenizer import Tokenizer, TokenizerConfig

FAST = ["--no-progress", "--device", "cpu"]


def make_prior(path: Path, seed: int = 0, blind: bool = False, **overrides) -> str:
    """A debug prior with random weights; ``blind``: zero class embeddings, so the class changes nothing."""
    torch.manual_seed(seed)
    prior = Prior(from_dict(PriorConfig, {"preset": "debug", **overrides}))
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if blind:
            prior.cond_embed.weight.zero_()
    return str(prior.save_export(path, {"step": 7}))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is ~10x faster than two on a busy 2-core machine (no OpenMP hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    tok = Tokenizer(from_dict(TokenizerConfig, "debug"))
    assert tok.vocab_size == 64 and tok.token_grid() == 4
    return {"tok": str(tok.save_export(tmp / "tok.pt")), "prior": make_prior(tmp / "prior.pt"),
            "blind": make_prior(tmp / "blind.pt", blind=True),
            "uncond": make_prior(tmp / "uncond.pt", num_classes=0)}


def job(per_class: int = 2, classes: tuple[int, ...] = tuple(range(10)), batch_size: int = 7, **kw) -> SampleJob:
    settings = SamplingSettings(**{"cfg_scale": 2.0, "top_k": 40, "top_p": 0.95, "seed": 3, **kw})
    return SampleJob(SamplePlan(classes, per_class, seed=3), settings, batch_size=batch_size)


@pytest.fixture(scope="module")
def cli_run(exports, tmp_path_factory) -> dict:
    """The CLI in this process (batch size 32: all 20 samples in one batch)."""
    out = tmp_path_factory.mktemp("cli") / "samples.npz"
    res = main(["--prior", exports["prior"], "--tokenizer", exports["tok"], "--per-class", "2", "--cfg", "2.0",
                "--top-k", "40", "--top-p", "0.95", "--seed", "3", "--out", str(out), *FAST])
    with np.load(out) as z:
        res["arrays"] = {k: z[k] for k in z.files}
    res["out"] = out
    return res


def test_samples_do_not_depend_on_batch_size(exports, cli_run):
    one = sample_images(exports["prior"], exports["tok"], job(batch_size=1), progress=False)
    seven = sample_images(exports["prior"], exports["tok"], job(batch_size=7), progress=False)
    np.testing.assert_array_equal(one.images, seven.images)
    np.testing.assert_array_equal(one.labels, seven.labels)
    np.testing.assert_array_equal(one.images, cli_run["arrays"]["arr_0"])  # batch 32
    assert len({im.tobytes() for im in one.images}) == 20  # 20 different images, not one repeated


@pytest.mark.e2e
def test_two_ray_workers_give_the_same_npz(exports, cli_run, tmp_path: Path, ray_cluster):
    pytest.importorskip("ray")
    out = tmp_path / "ray.npz"
    main(["--prior", exports["prior"], "--tokenizer", exports["tok"], "--per-class", "2", "--cfg", "2.0",
          "--top-k", "40", "--top-p", "0.95", "--seed", "3", "--batch-size", "3", "--workers", "2",
          "--out", str(out), *FAST])
    with np.load(out) as z:
        for k, v in cli_run["arrays"].items():
            np.testing.assert_array_equal(z[k], v)


def test_class_major_order_and_per_sample_seeds():
    plan = SamplePlan((3, 1, 7), per_class=4, seed=5)
    assert plan.n == 12 and plan.labels(np.arange(12)).tolist() == [3] * 4 + [1] * 4 + [7] * 4
    seeds = {sample_seed(s, i) for s in range(4) for i in range(1000)}
    assert len(seeds) == 4000  # distinct over samples and base seeds
    assert plan.grid_indices(rows=2, cols=3) == [[0, 1, 2], [4, 5, 6]]
    # Chunks of consecutive samples, dealt round-robin: every world size covers each sample once.
    j = SampleJob(plan, SamplingSettings(seed=5), batch_size=5)
    for world in (1, 2, 3, 5):
        got = np.concatenate([c for r in range(world) for c in j.chunks(r, world)])
        assert sorted(got.tolist()) == list(range(12))
    assert [c.tolist() for c in j.chunks(1, 2)] == [[5, 6, 7, 8, 9]]


def test_cli_writes_exactly_per_class_of_every_class(cli_run, exports):
    images, labels = cli_run["arrays"]["arr_0"], cli_run["arrays"]["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [c for c in range(10) for _ in range(2)]
    protocol = json.loads(Path(cli_run["protocol_path"]).read_text())
    assert protocol == cli_run["protocol"]
    assert protocol["samples"] == 20 and protocol["per_class"] == 2 and protocol["class_list"] == list(range(10))
    assert (protocol["cfg_scale"], protocol["top_k"], protocol["top_p"], protocol["seed"]) == (2.0, 40, 0.95, 3)
    assert protocol["prior_sha256"] == hashlib.sha256(Path(exports["prior"]).read_bytes()).hexdigest()
    assert protocol["tokenizer_sha256"] == hashlib.sha256(Path(exports["tok"]).read_bytes()).hexdigest()
    assert protocol["prior_step"] == 7
    assert cli_run["command"].startswith(f"python launch/evaluate.py gfid --samples {cli_run['out']} --ref ")
    grid = np.asarray(Image.open(protocol["grid_png"]))  # 8 classes x 2 samples of 32 px, 2 px apart
    assert grid.shape == (8 * 34 + 2, 2 * 34 + 2, 3)
    np.testing.assert_array_equal(grid[36:68, 36:68], images[3])  # row 1 (class 1), column 1 = sample 3


def test_classes_get_different_seeds(exports):
    """With a prior that ignores the class, the first samples of two classes differ only through their seeds."""
    out = sample_images(exports["blind"], exports["tok"], job(per_class=2, classes=(0, 1)), progress=False)
    assert out.labels.tolist() == [0, 0, 1, 1]
    assert not np.array_equal(out.images[0], out.images[2])
    # ... and the class really is ignored: sample 0 of class 0 equals sample 0 drawn as class 5 from the same seed.
    w = SampleWorker(exports["blind"], exports["tok"])
    settings = SamplingSettings(cfg_scale=2.0, top_k=40, top_p=0.95, seed=3)
    w.start(SampleJob(SamplePlan((5, 1), 2, seed=3), settings, batch_size=4), 0, 1)
    w.step(1)
    np.testing.assert_array_equal(w.result().in_order(4)[0][0], out.images[0])


def test_npz_is_what_evaluate_gfid_reads(cli_run, tmp_path: Path):
    from vitvq.launch.evaluate import main as evaluate
    fast = ["--extractor", "tiny", "--workers", "0", "--no-progress"]
    ref = tmp_path / "ref.npz"
    evaluate(["ref-stats", "--npz", str(cli_run["out"]), "--out", str(ref), *fast])
    res = evaluate(["gfid", "--samples", str(cli_run["out"]), "--ref", str(ref), "--splits", "2", *fast])
    assert abs(res["metrics"]["eval/fid"]) < 1e-6 and res["protocol"]["count"] == 20  # the same images: FID 0
    assert res["protocol"]["resolution"] == "32x32 (as generated)"
    drawn = cli_run["protocol"]  # how they were drawn travels with the gFID result (table, JSON, MLflow tags)
    for key in ("samples", "per_class", "cfg_scale", "top_k", "seed", "prior_sha256", "tokenizer_sha256"):
        assert res["protocol"][f"sampling.{key}"] == drawn[key], key


def test_unconditional_prior(exports, tmp_path: Path):
    out = tmp_path / "u.npz"
    res = main(["--prior", exports["uncond"], "--tokenizer", exports["tok"], "--per-class", "3", "--cfg", "1",
                "--out", str(out), *FAST])
    with np.load(out) as z:
        assert z.files == ["arr_0"] and z["arr_0"].shape == (3, 32, 32, 3)  # no labels, as ADM's unconditional
    assert res["protocol"]["classes"] == "unconditional (null class)"


@pytest.mark.parametrize("override,problem", [({"vocab_size": 32}, "prior.vocab_size=32 but the tokenizer has 64 codes"),
                                              ({"grid": 2}, "prior.grid=2 but the tokenizer makes 4x4 codes at 32 px")])
def test_mismatched_prior_is_refused_naming_both_files(exports, tmp_path: Path, capsys, override, problem):
    bad = make_prior(tmp_path / "bad.pt", **override)
    with pytest.raises(ValueError, match="does not fit") as e:
        check_exports(bad, exports["tok"])
    assert bad in str(e.value) and exports["tok"] in str(e.value) and problem in str(e.value)
    with pytest.raises(ValueError, match=problem):
        SampleWorker(bad, exports["tok"])
    with pytest.raises(SystemExit):
        main(["--prior", bad, "--tokenizer", exports["tok"], "--cfg", "1", "--out", str(tmp_path / "x.npz"), *FAST])
    err = capsys.readouterr().err
    assert bad in err and exports["tok"] in err and problem in err


@pytest.mark.parametrize("args,message", [
    (["--per-class", "0"], "--per-class (per_class) = 0: must be >= 1"),
    (["--top-p", "0"], "--top-p (top_p) = 0.0: must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k (top_k) = -1: must be >= 0"),
    (["--top-k", "65"], "--top-k (top_k) = 65: more than the prior's vocabulary"),
    (["--temperature", "-1"], "--temperature (temperature) = -1.0: must be >= 0"),
    (["--seed", "-1"], "--seed (seed) = -1: must be in [0, 2**32)"),
    (["--batch-size", "0"], "--batch-size (batch_size) = 0: must be >= 1"),
    (["--classes", "3,10"], "--classes (classes) = [3, 10]: classes [10] outside [0, 10)"),
    (["--classes", "3,3"], "--classes (classes) = [3, 3]: name each class once"),
    (["--classes", "a"], "--classes: expected comma-separated integers"),
    (["--out", "x.npy"], "--out (out) = 'x.npy': must end in .npz"),
    (["--workers", "2", "--device", "cuda", "--gpus-per-worker", "0"],
     "--device (device) = 'cuda': cuda in Ray actors needs --gpus-per-worker > 0"),
    (["--cfg-scale", "inf"], "--cfg-scale (cfg_scale) = inf: must be a finite number >= 0"),
])
def test_bad_arguments_are_refused_naming_the_flag(exports, tmp_path: Path, capsys, args, message):
    argv = ["--prior", exports["prior"], "--tokenizer", exports["tok"], "--cfg", "2", "--out", str(tmp_path / "s.npz")]
    with pytest.raises(SystemExit) as e:
        main(argv + FAST + args)  # later flags win
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()


def test_a_tokenizer_that_is_not_the_priors_is_refused_unless_asked_for(exports, tmp_path: Path, capsys):
    """Same codebook size and grid, another export: the shapes fit, the codes mean other images."""
    torch.manual_seed(1)
    other = str(Tokenizer(from_dict(TokenizerConfig, "debug")).save_export(tmp_path / "other.pt"))
    tok_sha = hashlib.sha256(Path(exports["tok"]).read_bytes()).hexdigest()
    other_sha = hashlib.sha256(Path(other).read_bytes()).hexdigest()
    torch.manual_seed(0)
    prior = Prior(from_dict(PriorConfig, {"preset": "debug"}))
    trained = str(prior.save_export(tmp_path / "prior.pt", {"step": 7, "tokenizer_sha256": tok_sha}))
    argv = ["--prior", trained, "--cfg", "1", "--per-class", "1", "--classes", "0", *FAST]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--tokenizer", other, "--out", str(tmp_path / "a.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--tokenizer (tokenizer)" in err and other_sha in err and tok_sha in err
    assert "--other-tokenizer" in err and not (tmp_path / "a.npz").exists()
    ok = main(argv + ["--tokenizer", exports["tok"], "--out", str(tmp_path / "b.npz")])  # its own: no note
    assert ok["protocol"]["notes"] == []
    forced = main(argv + ["--tokenizer", other, "--other-tokenizer", "--out", str(tmp_path / "c.npz")])
    assert any(tok_sha in n and "on purpose" in n for n in forced["protocol"]["notes"])


def test_unconditional_prior_refuses_guidance_and_classes(exports, tmp_path: Path, capsys):
    argv = ["--prior", exports["uncond"], "--tokenizer", exports["tok"], "--out", str(tmp_path / "s.npz"), *FAST]
    for extra, message in ((["--cfg", "2"], "--cfg (cfg_scale) = 2.0: the prior"),
                           (["--cfg", "1", "--classes", "0"], "--classes (classes) = [0]: the prior")):
        with pytest.raises(SystemExit):
            main(argv + extra)
        assert message in capsys.readouterr().err


def test_each_sampling_setting_is_declared_once(cli_run) -> None:
    """``models.sampling.SamplingSettings`` is the one declaration: generate() and the sampler take the object (no
    keyword of their own), the job, the pipeline step and the training grid inherit it, the protocol records all of
    it, and a job's plan cannot carry a second seed."""
    import dataclasses
    import inspect
    from vitvq.evaluation.jobs import SampleConfig
    from vitvq.models.sampling import generate, sample_logits
    from vitvq.launch.orchestration.pipeline_config import SampleStep
    from vitvq.trainer.stage2 import SampleGridConfig
    names = {f.name for f in dataclasses.fields(SamplingSettings)}
    for fn in (generate, sample_logits):
        assert not names & set(inspect.signature(fn).parameters), fn.__name__
    assert all(issubclass(c, SamplingSettings) for c in (SampleConfig, SampleStep, SampleGridConfig))
    assert names <= set(cli_run["protocol"])
    with pytest.raises(ValueError, match="the plan's seed 3 is not the settings' seed 0"):
        SampleJob(SamplePlan((0,), 1, seed=3), SamplingSettings())
