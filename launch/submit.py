"""Run a command on a Ray cluster as a Ray job: upload the code, submit, follow the logs, exit with the job's status.

    python launch/submit.py --address http://HEAD:8265 -- \\
        python launch/ray_train.py --config configs/stage1/debug.yaml --workers 2
    python launch/submit.py --env MLFLOW_TRACKING_URI --env HF_TOKEN --no-wait -- python launch/ray_train.py ...
    python launch/submit.py status ID | logs ID [--follow] | stop ID      # each with --address

The address is the head's dashboard (job server), default ``RAY_ADDRESS`` or http://127.0.0.1:8265. Ray binds it to
127.0.0.1 unless the head was started with ``--dashboard-host``; the job API runs any command it is sent, so reach a
remote head through ``ssh -L 8265:127.0.0.1:8265 HEAD`` rather than exposing it. The working directory (default:
this repository, without .git, .venv, runs/, tokens/, mlflow.db and other large or private files, see ``EXCLUDES``)
is uploaded and the command runs in it on the head; this checkout's ``vitvq`` package travels with it (Ray
``py_modules``), so the cluster runs the code you have here whether or not it has vitvq installed
(``--no-package``: use the cluster's own). ``--env NAME=VALUE`` (or ``--env NAME``, taking the value from here, which
keeps secrets off the command line) reaches the job and every Ray worker it starts. Values whose names look secret,
and credentials inside URIs, are never printed (``vitvq.configs.redact``), and never enter the job's runtime env:
Ray logs runtime envs with their values (``runtime_env_agent.log``, served by the dashboard) and keeps them in the
job's record. They travel instead in a file of a second shipped module, ``vitvq_job_env``, which the job's
entrypoint runs first (``python -m vitvq_job_env COMMAND``: load them, then exec the command); ``launch/ray_train.py``
hands them on to its workers through the object store.
The job runs in Ray's copy of the working directory, deleted with the session: give ``train.out_dir`` and
``MLFLOW_TRACKING_URI`` as paths on storage every node sees, or a tracking server, never relative ones.
Exit status: 0 SUCCEEDED, 1 FAILED, 2 STOPPED; Ctrl-C stops following, not the job.

The plain Ray form (no package shipping, no redaction; Ray skips what .gitignore lists):

    ray job submit --address http://HEAD:8265 --working-dir . -- python launch/ray_train.py --config ... --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, TextIO

from vitvq.configs.redact import redact

JOB_ENV_MODULE = "vitvq_job_env"
_JOB_ENV_MAIN = '''"""Put the secret variables of this job (env.json, beside this file) in the environment, then run the command."""
import json, os, pathlib, sys
os.environ.update(json.loads((pathlib.Path(__file__).parent / "env.json").read_text()))
os.execvp("sh", ["sh", "-c", sys.argv[1]])
'''

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [".git", ".venv", "venv", "/runs", "/outputs", "/tokens", "mlruns", "mlflow.db", "*.egg-info",
            "__pycache__", ".pytest_cache", ".cache", "/build", "/dist", "/.whl", "/.gl",
            ".env", ".env.*", ".netrc", "*.pem", "id_rsa*", "id_ed25519*"]
"""Never uploaded (Ray's gitignore-style ``excludes``, relative to the working directory): environments, run
outputs, tracking stores, caches, and files that hold credentials."""
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}
TERMINAL = set(EXIT)
def say(msg: str) -> None:
    print(f"submit: {msg}", file=sys.stderr, flush=True)


# -- what is sent ---------------------------------------------------------------------------------
def parse_env(specs: list[str]) -> dict[str, str]:
    """``--env NAME=VALUE`` as given; ``--env NAME`` takes this environment's value."""
    env = {}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"--env {redact(spec)!r}: write NAME=VALUE or NAME")
        if not eq:
            if name not in os.environ:
                raise ValueError(f"--env {name}: not set in this environment; write {name}=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def job_env(user: dict[str, str]) -> dict[str, str]:
    """The job's environment variables: the user's, plus PYTHONUNBUFFERED (the user's value wins)."""
    return {
        "PYTHONUNBUFFERED": "1",  # the job's stdout is a file: without this, logs arrive in 8 KiB blocks
        **user,
    }


def split_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(public, secret)``: secret when the name looks secret or redaction changes the value. Only ``public`` may
    enter the runtime env."""
    public = {k: v for k, v in env.items() if redact(v, k) == v}
    return public, {k: v for k, v in env.items() if k not in public}


def stage_job_env(dest: Path, secret: dict[str, str]) -> Path:
    """The ``vitvq_job_env`` module in ``dest``: ``env.json`` (mode 0600) holding ``secret``, and the ``__main__``
    that loads it and execs the job's command."""
    pkg = dest / JOB_ENV_MODULE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(_JOB_ENV_MAIN)
    fd = os.open(pkg / "env.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(secret, f)
    return pkg


def stage_package(dest: Path, root: Path = REPO) -> Path:
    """Copy this checkout's ``vitvq`` into ``dest/vitvq``, laid out as installed (setup.cfg's ``package_dir``:
    ``models/`` -> ``vitvq/models``): the folder Ray ships as a py_module."""
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    pkg = dest / "vitvq"
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, folder = (s.strip() for s in line.split("="))
        shutil.copytree(root / folder, pkg / name.split(".", 1)[1],
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return pkg


def entrypoint(command: list[str]) -> str:
    """The shell command Ray runs: the words after ``--``, quoted; one word is taken as a shell command line."""
    return command[0] if len(command) == 1 else shlex.join(command)


# -- following a job ------------------------------------------------------------------------------
def wait_done(client: Any, job_id: str, timeout: Optional[float] = None) -> str:
    deadline = None if timeout is None else time.monotonic() + timeout
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return status


def follow(client: Any, job_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they come until it ends; its final status."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            out.write(redact(chunk))
            out.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream dropped (a proxy, a restarted dashboard): poll the logs instead
        say(f"log stream closed ({type(e).__name__}: {redact(str(e))}); polling")
        while True:
            status = str(client.get_job_status(job_id).value)
            logs = client.get_job_logs(job_id)
            out.write(redact(logs[printed:]))
            out.flush()
            printed = len(logs)
            if status in TERMINAL:
                break
            time.sleep(2)
    return wait_done(client, job_id)


def outcome(client: Any, job_id: str, status: str) -> int:
    """Say how the job ended (its message's first line: the rest repeats the logs); the exit status for it."""
    info = client.get_job_info(job_id)
    code = f" (exit code {info.driver_exit_code})" if getattr(info, "driver_exit_code", None) is not None else ""
    message = first_line(info.message)
    say(f"job {job_id} {status}{code}" + (f": {message}" if message and status != "SUCCEEDED" else ""))
    return EXIT[status]


def first_line(message: Optional[str]) -> str:
    """Ray's job message without the copy of the last logs that it appends on failure."""
    lines = (message or "").strip().splitlines()
    return redact(lines[0].split(", last available logs")[0]) if lines else ""


def describe(info: Any) -> str:
    """``status``: the job's state, command and environment (redacted), times and message."""
    env = (info.runtime_env or {}).get("env_vars", {})
    rows = [f"{info.submission_id or info.job_id}: {info.status.value}", f"  entrypoint: {redact(info.entrypoint)}"]
    if env:
        rows.append("  env: " + " ".join(f"{k}={redact(v, k)}" for k, v in sorted(env.items())))
    for label, ms in (("started", info.start_time), ("ended", info.end_time)):
        if ms:
            rows.append(f"  {label}: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    if getattr(info, "driver_exit_code", None) is not None:
        rows.append(f"  exit code: {info.driver_exit_code}")
    if info.message:
        rows.append(f"  message: {first_line(info.message)}")
    return "\n".join(rows)


# -- the command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] -- COMMAND ... | %(prog)s {status,logs,stop} ID [options]")
    p.add_argument("action", nargs="?", choices=("status", "logs", "stop"), help="act on a submitted job")
    p.add_argument("job_id", nargs="?", help="the job's id (raysubmit_...)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
                   help=f"the head's job server (default RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", type=Path, default=REPO, help="folder to upload (default: this repository)")
    p.add_argument("--exclude", action="append", default=[], help="gitignore-style pattern not to upload (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]", help="job environment (repeatable)")
    p.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job (repeatable)")
    p.add_argument("--no-package", action="store_true", help="do not ship this checkout's vitvq package")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--follow", action="store_true", help="logs: follow until the job ends")
    return p


def connect(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        sys.exit(f"error: no Ray job server at {redact(address)} ({redact(str(e).splitlines()[0])}). Start a head with "
                 f"`ray start --head` (dashboard on 127.0.0.1:8265) or pass --address http://HEAD:8265")


def submit(args: argparse.Namespace, command: list[str]) -> int:
    try:
        env = job_env(parse_env(args.env))
    except ValueError as e:
        sys.exit(f"error: {e}")
    folder = args.working_dir.resolve()
    if not folder.is_dir():
        sys.exit(f"error: --working-dir {folder} is not a folder")
    client = connect(args.address)
    public, secret = split_env(env)
    runtime_env: dict[str, Any] = {"working_dir": str(folder), "excludes": EXCLUDES + args.exclude,
                                   "env_vars": public, "py_modules": []}
    if args.pip:
        runtime_env["pip"] = args.pip
    say(f"job server {redact(args.address)}; uploading {folder} (not: {' '.join(runtime_env['excludes'])})")
    if args.env:
        say("env " + " ".join(f"{k}={redact(v, k)}" for k, v in env.items() if k not in job_env({})))
    say(f"command {redact(entrypoint(command))}")
    run = entrypoint(command)
    with tempfile.TemporaryDirectory(prefix="vitvq-submit") as tmp:
        if not args.no_package:
            runtime_env["py_modules"].append(str(stage_package(Path(tmp))))
        if secret:  # in a shipped file, not in the runtime env that Ray logs (see the module docstring)
            runtime_env["py_modules"].append(str(stage_job_env(Path(tmp), secret)))
            run = f"python -m {JOB_ENV_MODULE} {shlex.quote(run)}"
        if not runtime_env["py_modules"]:
            del runtime_env["py_modules"]
        try:
            job_id = client.submit_job(entrypoint=run, runtime_env=runtime_env)
        except (RuntimeError, ValueError) as e:  # refused by the server, or a working dir over Ray's upload limit
            sys.exit(f"error: submission refused: {redact(str(e))}")
    if args.no_wait:
        print(job_id, flush=True)  # alone on stdout: ID=$(python launch/submit.py --no-wait -- ...)
        me = f"python launch/submit.py --address {redact(args.address)}"
        say(f"submitted {job_id}; then:\n  {me} status {job_id}\n  {me} logs {job_id} --follow\n  {me} stop {job_id}")
        return 0
    say(f"job {job_id} submitted; following its logs (Ctrl-C stops following, not the job)")
    return watch(client, job_id, args.address)


def watch(client: Any, job_id: str, address: str) -> int:
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        me = f"python launch/submit.py --address {redact(address)}"
        say(f"job {job_id} keeps running: `{me} logs {job_id} --follow`, `{me} stop {job_id}`")
        return 130
    return outcome(client, job_id, status)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    options, command = argv[:split], argv[split + 1:]
    parser = build_parser()
    args = parser.parse_intermixed_args(options)
    if args.action is None:
        if args.follow:
            parser.error("--follow is for `logs ID`; a submission follows its job unless --no-wait")
        if args.job_id or not command:
            parser.error("give the command to run after --, or one of status, logs, stop with a job id")
        return submit(args, command)
    if not args.job_id or command:
        parser.error(f"{args.action} takes a job id and no command")
    given = {"--working-dir": args.working_dir != REPO, "--exclude": args.exclude, "--env": args.env,
             "--pip": args.pip, "--no-package": args.no_package, "--no-wait": args.no_wait,
             "--follow": args.follow and args.action != "logs"}
    submit_only = [flag for flag, used in given.items() if used]
    if submit_only:
        parser.error(f"{args.action} does not take {', '.join(submit_only)}")
    client = connect(args.address)
    try:
        if args.action == "status":
            print(describe(client.get_job_info(args.job_id)))
        elif args.action == "logs":
            if args.follow:
                return watch(client, args.job_id, args.address)
            logs = redact(client.get_job_logs(args.job_id))
            sys.stdout.write(logs if logs.endswith("\n") or not logs else logs + "\n")
        else:
            sent = client.stop_job(args.job_id)
            status = wait_done(client, args.job_id, timeout=30)
            say(f"job {args.job_id} {status}" + ("" if sent else " (it had already ended)"))
    except RuntimeError as e:  # unknown id, or the server's error
        sys.exit(f"error: {redact(str(e))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
