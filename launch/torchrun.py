"""``torchrun``, with the exit status a scheduler requeues on: 75 when the ranks were preempted and saved their step.

    python launch/torchrun.py --nproc_per_node 8 launch/train_stage1.py --config configs/stage1/vit_ss_imagenet.yaml

Every ``torchrun`` option is accepted as it is (this calls ``torch.distributed.run`` in this process). Why a
wrapper: on SIGTERM, torchrun (torch 2.14, ``elastic/multiprocessing/api.py``) raises ``SignalException`` in its
agent, gives the workers ``--shutdown_timeout`` (30 s) to stop and exits 1, whatever they did; and when the workers
exit 75 on their own (a scheduler that signals every process), it reports a ``ChildFailedError`` and exits 1 again.
A requeue-on-75 policy (``trainer/preemption.py``) then never requeues. Here SIGTERM is taken off torchrun's list
(``--signals-to-handle``) and forwarded to the worker processes, so the agent sees them end by themselves; when every
rank that ended did so with 75 (each saved the step it stopped at; the agent stops the others once one has ended,
which shows as -SIGTERM), this exits 75. Any other failure keeps torchrun's behaviour and status.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional

from vitvq.trainer.preemption import PREEMPTED_EXIT

TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's default list without SIGTERM, which we forward ourselves


def forward_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM to this process -> SIGTERM to its direct children (the worker processes torchrun started)."""
    import psutil
    for child in psutil.Process(os.getpid()).children(recursive=False):
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.Error:  # already gone
            pass


def main(argv: Optional[list[str]] = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    argv = sys.argv[1:] if argv is None else list(argv)
    given = any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv)
    args = parse_args(argv if given else ["--signals-to-handle", TORCHRUN_SIGNALS, *argv])
    if "SIGTERM" not in args.signals_to_handle.split(","):
        signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        # A rank exits 75 only after every rank passed the barrier that follows the save and the MLflow close
        # (trainer.train: fit, shutdown_distributed, then Preempted); the agent then SIGTERMs the ranks still exiting.
        if PREEMPTED_EXIT in codes and codes <= {PREEMPTED_EXIT, -signal.SIGTERM}:
            print(f"launch/torchrun.py: every rank that stopped was preempted and saved its step (status "
                  f"{PREEMPTED_EXIT}); rerun the same command to continue", file=sys.stderr, flush=True)
            sys.exit(PREEMPTED_EXIT)
        raise


if __name__ == "__main__":
    main()
