"""``launch/submit.py`` against a real Ray head on this machine: jobs submitted, followed, listed, stopped.

The session's Ray cluster serves the module (``ray_cluster`` in tests/conftest.py: ``ray.cluster_utils.Cluster``, its
own processes, killed by ``shutdown()``, never ``ray stop``), with the dashboard and job server on 127.0.0.1 at free
ports and its temp files in a short folder under /tmp. Every call is the real command line in a subprocess, as a user types it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vitvq.configs.redact import looks_secret, redact
from vitvq.trainer.engine import free_port

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = str(ROOT / "launch" / "submit.py")


@pytest.fixture
def address(ray_cluster) -> str:
    """The job server of the session's Ray cluster (tests/conftest.py): http://127.0.0.1:PORT."""
    return ray_cluster.dashboard


def cli(address: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, SUBMIT, "--address", address, *args], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    res.all = res.stdout + res.stderr
    return res


def job_id(text: str) -> str:
    ids = set(re.findall(r"raysubmit_\w+", text))
    assert len(ids) == 1, text
    return ids.pop()


def test_redact() -> None:
    assert redact("https://alice:s3cret@mlflow.example:5000/api") == "https://***@mlflow.example:5000/api"
    assert redact("postgresql://u:p@ss@db/x") == "postgresql://***@db/x"  # an unescaped @ in the password
    assert redact("anything", "HF_TOKEN") == redact("x", "AWS_SECRET_ACCESS_KEY") == redact("x", "apiKey") == "***"
    assert redact("/data/t.idx", "tokens.train_tokens") == "/data/t.idx"  # "tokens" is not "TOKEN"
    cmd = "HF_TOKEN=abc python launch/ray_train.py tokenizer=/t.pt --password pw --api-key=k --workers 2"
    assert redact(cmd) == ("HF_TOKEN=*** python launch/ray_train.py tokenizer=/t.pt --password *** --api-key=*** "
                           "--workers 2")
    assert redact("s3://b/k?X-Amz-Signature=beef&n=1") == "s3://b/k?X-Amz-Signature=***&n=1"
    ray_error = """{'HF_TOKEN': 'hunter2', "apiKey": "k", 'A': 'b'}"""  # Ray quotes runtime envs as dicts
    assert redact(ray_error) == """{'HF_TOKEN': '***', "apiKey": "***", 'A': 'b'}"""
    assert redact("http://127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert looks_secret("MLFLOW_TRACKING_PASSWORD") and not looks_secret("tokenizer")
    # Signed URLs and credentials inside config values (issue 13): query parameters and a URI inside a command.
    assert redact("https://acct.blob/c/x?sv=2024&sig=c2VjcmV0&se=1") == "https://acct.blob/c/x?sv=2024&sig=***&se=1"
    assert redact("https://h/x?token=abc&key=k1&n=1") == "https://h/x?token=***&key=***&n=1"
    assert redact("pipe:curl -s https://user:pw@host/x.tar") == "pipe:curl -s https://***@host/x.tar"
    assert not looks_secret("prior.token_dropout") and not looks_secret("train.preempt_signal")
    assert looks_secret("X-Amz-Security-Token") and looks_secret("sig")


@pytest.mark.e2e
def test_job_succeeds_and_logs_read_back(address: str, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("uploaded")
    for private in ("runs/big.bin", ".venv/lib.so", ".git/HEAD", "mlflow.db", ".env"):
        (tmp_path / private).parent.mkdir(exist_ok=True)
        (tmp_path / private).write_text("not for the cluster")
    code = ("import os, vitvq.launch.submit as m; print('hello from the job', open('data.txt').read()); "
            "print('files', sorted(os.listdir('.'))); print('vitvq from', m.__file__)")
    res = cli(address, "--working-dir", str(tmp_path), "--", "python", "-c", code)
    assert res.returncode == 0, res.all
    assert "hello from the job uploaded" in res.stdout and "SUCCEEDED" in res.stderr, res.all
    assert "files ['data.txt']" in res.stdout, res.all  # the default excludes kept the rest here
    shipped = re.search(r"vitvq from (\S+)", res.stdout)[1]  # this checkout's package, shipped as a py_module:
    assert "/runtime_resources/py_modules_files/" in shipped, shipped  # not whatever vitvq the cluster has
    logs = cli(address, "logs", job_id(res.stderr))
    assert logs.returncode == 0 and "hello from the job uploaded" in logs.stdout, logs.all


@pytest.mark.e2e
def test_failing_job_exits_non_zero(address: str, tmp_path: Path) -> None:
    res = cli(address, "--working-dir", str(tmp_path), "--no-package", "--",
              "python", "-c", "import sys; print('about to fail'); sys.exit(3)")
    assert res.returncode == 1, res.all
    assert "about to fail" in res.stdout and re.search(r"raysubmit_\w+ FAILED \(exit code 3\)", res.stderr), res.all


@pytest.mark.e2e
def test_no_wait_status_stop(address: str, tmp_path: Path) -> None:
    res = cli(address, "--working-dir", str(tmp_path), "--no-package", "--no-wait", "--",
              "python", "-c", "import time; print('sleeping', flush=True); time.sleep(120)")
    assert res.returncode == 0, res.all
    jid = res.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", jid) and f"stop {jid}" in res.stderr, res.all  # the id alone on stdout
    status = cli(address, "status", jid)
    assert status.returncode == 0 and re.match(rf"{jid}: (PENDING|RUNNING)\n", status.stdout), status.all
    stop = cli(address, "stop", jid)
    assert stop.returncode == 0 and f"{jid} STOPPED" in stop.stderr, stop.all
    assert cli(address, "status", jid).stdout.startswith(f"{jid}: STOPPED")
    follow = cli(address, "logs", jid, "--follow")  # an ended job: prints its logs, exits with its status
    assert follow.returncode == 2 and "STOPPED" in follow.stderr, follow.all
    unknown = cli(address, "status", "raysubmit_nosuchjob")
    assert unknown.returncode == 1 and "raysubmit_nosuchjob" in unknown.stderr, unknown.all


@pytest.mark.e2e
def test_env_reaches_the_job_and_secrets_stay_out_of_ray(address: str, tmp_path: Path) -> None:
    # Public variables reach Ray workers through the runtime env (launch/ray_train.py's ray_cluster() passes VITVQ_*
    # again); secret ones reach the job's driver from a shipped file, never the runtime env that Ray logs and keeps
    # (issue 20, item 3). launch/ray_train.py hands them to its Train workers through the object store.
    code = ("import os, ray; from vitvq.launch.orchestration.ray_train import ray_cluster\n"
            "with ray_cluster():\n"
            "    env = ray.get(ray.remote(num_cpus=1)(lambda: dict(os.environ)).remote())\n"
            "print('worker sees', env['VITVQ_PROBE'], 'HF_TOKEN' in env, 'MLFLOW_TRACKING_URI' in env)\n"
            "print('driver sees', len(os.environ['HF_TOKEN']), os.environ['MLFLOW_TRACKING_URI'][-12:])")
    secret = "s3cr3t-VALUE-17"
    res = cli(address, "--working-dir", str(tmp_path), "--env", "VITVQ_PROBE=visible", "--env", "HF_TOKEN",
              "--env", f"MLFLOW_TRACKING_URI=https://alice:{secret}@mlflow.example", "--", "python", "-c", code,
              env={"HF_TOKEN": secret}, timeout=180)
    assert res.returncode == 0, res.all
    assert "worker sees visible False False" in res.stdout and "driver sees 15 flow.example" in res.stdout, res.all
    assert "HF_TOKEN=***" in res.stderr and "MLFLOW_TRACKING_URI=https://***@mlflow.example" in res.stderr, res.all
    status = cli(address, "status", job_id(res.stderr))
    assert "  env: PYTHONUNBUFFERED=1 VITVQ_PROBE=visible\n" in status.stdout, status.all  # no secret one
    for text in (res.all, status.all):
        assert secret not in text and "alice" not in text, text
    ray_files = Path(os.environ["RAY_TMPDIR"]) / "ray"  # the cluster's logs (runtime_env_agent.log ...) and state
    leaks = [str(p) for p in ray_files.rglob("*") if p.is_file() and "py_modules_files" not in str(p)
             and secret.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_no_job_server(tmp_path: Path) -> None:
    res = cli(f"http://127.0.0.1:{free_port()}", "--working-dir", str(tmp_path), "--", "true")
    assert res.returncode == 1 and "no Ray job server at http://127.0.0.1:" in res.stderr, res.all
