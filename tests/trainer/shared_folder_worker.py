"""Two gloo ranks: ``check_shared_folder`` passes on one folder and refuses per-rank folders (node-local disks).

Run by tests/trainer/test_preemption.py under ``torchrun --nproc_per_node 2``; exits 0 only if both behave."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitvq.trainer.checkpoint import check_shared_folder
from vitvq.trainer.engine import init_distributed, shutdown_distributed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    out = Path(p.parse_args().out)
    dist = init_distributed()
    check_shared_folder(out, dist)  # the same folder on both ranks: passes
    own = out / f"rank{dist.rank}"  # what two nodes with local disks see: a folder each
    own.mkdir(parents=True, exist_ok=True)
    try:
        check_shared_folder(own, dist)
    except RuntimeError as e:
        assert "ranks [1]" in str(e) and str(own.parent / "rank") in str(e), e
    else:
        raise AssertionError("per-rank folders were taken for shared storage")
    shutdown_distributed()


if __name__ == "__main__":
    main()
