"""No secret reaches anything a training run writes or prints (issue 20, item 2), and a run's MLflow bookkeeping
across failures, resumes and copies of its folder (items 6, 7 and 9): real ``launch/train_stage1.py`` runs of the
debug recipe on one rank, a real SQLite MLflow store read back with ``MlflowClient``.

The secrets ride where real ones do: the training shards are a ``pipe:curl`` command (reading the built-in demo
shards through ``file://``, which ignores credentials, proxies and query strings) carrying every form of credential
``configs/redact.py`` knows, and ``HF_TOKEN`` / ``MLFLOW_TRACKING_PASSWORD`` are in the launcher's environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "launch" / "train_stage1.py")
RUN = ["train.steps=2", "train.val_batches=1"]

# Distinctive values, one per form, so that a leak names the form that leaked.
SECRETS = {
    "userinfo": "s3cr3t-VALUE-01", "token_query": "s3cr3t-VALUE-02", "amz_signature": "s3cr3t-VALUE-03",
    "curl_u": "s3cr3t-VALUE-04", "curl_user": "s3cr3t-VALUE-05", "bearer": "s3cr3t-VALUE-06",
    "account_key": "s3cr3t-VALUE-07", "sas": "s3cr3t-VALUE-08", "yaml_password": "s3cr3t-VALUE-09",
    "hf_token": "s3cr3t-VALUE-10", "mlflow_password": "s3cr3t-VALUE-11", "json_token": "s3cr3t-VALUE-12",
}


def demo_shards() -> Path:
    from vitvq.data.builtin import ensure_demo_shards
    ensure_demo_shards("~/.cache/vitvq/demo", 32, "val")
    return Path(ensure_demo_shards("~/.cache/vitvq/demo", 32, "train")).parent


def secret_recipe(folder: Path) -> Path:
    """configs/stage1/debug.yaml reading its shards through a credential-laden ``pipe:curl``."""
    s, demo = SECRETS, demo_shards()
    cmd = (f"pipe:AZURE_STORAGE_CONNECTION_STRING='DefaultEndpointsProtocol=https;AccountName=acct;"
           f"AccountKey={s['account_key']};EndpointSuffix=core.windows.net' "
           f"AZURE_SAS='BlobEndpoint=https://acct.blob;SharedAccessSignature={s['sas']}' "
           f"curl -s -x http://proxy:{s['userinfo']}@127.0.0.1:9 -u user:{s['curl_u']} --user u2:{s['curl_user']} "
           f"-H 'Authorization: Bearer {s['bearer']}' "
           f"'file://{demo}/demo-train-{{000000..000003}}.tar?token={s['token_query']}&X-Amz-Signature="
           f"{s['amz_signature']}'")
    recipe = yaml.safe_load((ROOT / "configs" / "stage1" / "debug.yaml").read_text())
    recipe["data"].update(source="shards", train_shards=cmd, index=str(demo / "demo-train-index.json"),
                          val_shards=str(demo / "demo-val-index.json"))
    recipe["train"].update(experiment=f"secret-exp password: {s['yaml_password']}",
                           run_name=f"""demo {{"token": "{s['json_token']}"}}""")
    path = folder / "secret.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(env: dict, recipe: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, "--config", str(recipe), f"train.out_dir={out}", *overrides],
                          env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)


def grep_tree(folder: Path, values: list[str]) -> dict[str, list[str]]:
    """``{value: [files holding it]}`` over every file under ``folder`` (binary ones too)."""
    found: dict[str, list[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for v in values:
                if v.encode() in data:
                    found.setdefault(v, []).append(str(path.relative_to(folder)))
    return found


@pytest.mark.e2e
def test_no_secret_in_outputs_store_or_logs(tmp_path: Path, make_launch_env) -> None:
    env = make_launch_env(tmp_path)
    env.update(HF_TOKEN=SECRETS["hf_token"], MLFLOW_TRACKING_PASSWORD=SECRETS["mlflow_password"])
    recipe = secret_recipe(tmp_path)
    res = launch(env, recipe, tmp_path / "out", *RUN)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert (tmp_path / "out" / "tokenizer.pt").is_file()
    values = list(SECRETS.values())
    recipe.unlink()  # the one file that holds them on purpose; everything else in tmp_path is the run's
    leaks = grep_tree(tmp_path, values)
    leaks.update({v: ["stdout/stderr"] for v in values if v in res.stdout + res.stderr})
    assert not leaks, leaks

    # The masked record still says what was run, and the export (rebuilt from meta.json) works.
    flat = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "-u user:***" in flat["data.train_shards"] and "Bearer ***" in flat["data.train_shards"]
    meta = json.loads(next((tmp_path / "out" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["config"]["data"]["train_shards"] == flat["data.train_shards"]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["data.train_shards"] == flat["data.train_shards"]
    assert client.get_experiment(run.info.experiment_id).name == "secret-exp password: ***"
    from vitvq.models.tokenizer import Tokenizer
    assert Tokenizer.load_export(tmp_path / "out" / "tokenizer.pt") is not None


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_resume_redoes_steps_once_and_a_copied_folder_gets_its_own_run(tmp_path: Path, make_launch_env) -> None:
    env = make_launch_env(tmp_path)
    recipe, a, b = ROOT / "configs" / "stage1" / "debug.yaml", tmp_path / "a", tmp_path / "b"
    args = ["train.steps=4", "train.ckpt_every=2", "train.val_every=2", "train.val_batches=1", "train.image_every=4"]
    crash = launch({**env, "VITVQ_INJECT_FAULT": "step@3"}, recipe, a, *args)
    assert crash.returncode != 0 and "injected fault" in crash.stderr, crash.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = json.loads((a / "checkpoints" / "step_00000002" / "meta.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FAILED"
    assert 3 in metrics_steps(a)  # logged before the crash, redone after the resume

    resumed = launch(env, recipe, a, *args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-4000:]
    steps = metrics_steps(a)
    train_steps = [json.loads(line)["step"] for line in (a / "metrics.jsonl").read_text().splitlines()
                   if "train/total_loss" in line]
    original = client.get_run(run_id)
    assert original.info.status == "FINISHED" and original.data.tags["resume.count"] == "1"

    shutil.copytree(a, b)
    copy = launch(env, recipe, b, *args[1:], "train.steps=6")
    assert copy.returncode == 0, copy.stdout[-3000:] + copy.stderr[-4000:]
    new_id = json.loads((b / "checkpoints" / "step_00000006" / "meta.json").read_text())["mlflow_run_id"]
    assert new_id != run_id and f"MLflow run is {run_id}" in copy.stdout
    new = client.get_run(new_id)
    assert new.data.tags["copied_from_run_id"] == run_id and new.data.tags["vitvq.out_dir"] == str(b.resolve())
    assert new.data.params["train.steps"] == "6" and new.info.status == "FINISHED"
    untouched = client.get_run(run_id)  # the original's latest loss, restart count and status are as they were
    assert untouched.data.tags["resume.count"] == "1" and untouched.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run_id, "train/total_loss")) == 4
    assert untouched.data.metrics["train/total_loss"] == original.data.metrics["train/total_loss"]
    assert original.data.tags["vitvq.out_dir"] == str(a.resolve())  # where the run lives, recorded
    # metrics.jsonl holds each step once (validation shares steps 0, 2, 4 with training)
    assert sorted(set(steps)) == [0, 1, 2, 3, 4] and train_steps == [1, 2, 3, 4], steps


@pytest.mark.e2e
def test_a_run_failing_at_step_0_ends_failed(tmp_path: Path, make_launch_env) -> None:
    # A corrupt validation shard: listed by a valid index, so the run starts, and the first read (step 0's
    # validation, after the MLflow run exists) fails.
    demo, bad = demo_shards(), tmp_path / "badval"
    bad.mkdir()
    index = json.loads((demo / "demo-val-index.json").read_text())
    index["shards"] = index["shards"][:1]
    index["num_samples"] = index["shards"][0]["samples"]
    (bad / "demo-val-index.json").write_text(json.dumps(index))
    (bad / index["shards"][0]["name"]).write_bytes(b"not a tar file " * 4096)
    env = make_launch_env(tmp_path)
    res = launch(env, ROOT / "configs" / "stage1" / "debug.yaml", tmp_path / "out", *RUN,
                 "data.source=shards", f"data.train_shards={demo / 'demo-train-index.json'}",
                 f"data.val_shards={bad / 'demo-val-index.json'}")
    assert res.returncode != 0, res.stdout[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FAILED", (runs, res.stderr[-3000:])
