"""``data/pool.py``: a pool whose start fails leaves nothing behind (issue 20.10: each failed start used to leave its
``/tmp/ray*`` folder, and the local cluster it had started kept running until the process exited)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FAILING_START = """
import ray
from vitvq.data.pool import ActorPool

class Worker:
    def ready(self):
        return 1

try:
    ActorPool(Worker, workers=1, cpus_per_worker=-1)  # Ray refuses the actors after the local cluster started
except ValueError as e:
    assert "cannot be negative" in str(e), e
    assert not ray.is_initialized(), "the local cluster the pool started is still connected"
    print("refused")
"""


@pytest.mark.e2e  # starts a local Ray cluster in a fresh process (about 10 s)
def test_a_pool_that_fails_to_start_stops_its_cluster_and_removes_its_folder(tmp_path: Path) -> None:
    before = set(Path("/tmp").glob("ray*"))
    res = subprocess.run([sys.executable, "-c", FAILING_START], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "refused" in res.stdout, res.stderr[-3000:]
    left = set(Path("/tmp").glob("ray*")) - before
    assert not left, f"left behind: {sorted(map(str, left))}"
