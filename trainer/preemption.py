"""Stop at a step boundary on a signal: SIGTERM, ``train.preempt_signal`` or Ctrl-C, then exit with status 75.

A scheduler's SIGTERM (or Ray's downscale) must not kill a rank mid-step: :class:`StopRequest` turns the signal into a
flag that ``Trainer.fit`` reads after each step, all ranks agree on it (one all-reduce), save that step and leave
through :class:`Preempted`, whose status :data:`PREEMPTED_EXIT` tells a launcher to rerun the same command.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional


PREEMPTED_EXIT = 75
"""Exit status of a run stopped by SIGTERM, ``train.preempt_signal`` or Ctrl-C after saving its step (EX_TEMPFAIL:
rerun the same command to continue)."""


class Preempted(SystemExit):
    """Raised by :func:`train` once every rank has saved the step it stopped at."""


class StopRequest:
    """SIGTERM, the configured second signal and SIGINT set a flag instead of killing the process; the loop reads
    it after each step and all ranks stop together (a second Ctrl-C interrupts at once, as usual).

    Handlers can only be installed from the main thread. A Ray Train worker runs ``train()`` in a thread of its own
    while Ray's SIGTERM handler on the actor's main thread exits the process at once (mid-step, nothing saved):
    there the handlers go in through :attr:`main_thread`, which ``launch/orchestration/ray_train.py`` sets."""

    main_thread: Optional[Callable[[Callable[[], Any]], Any]] = None
    """``main_thread(fn)`` runs ``fn`` on this process's main thread and returns its result (None: not available)."""

    def __init__(self, extra: Optional[str]):
        import threading
        self.signal: Optional[str] = None
        self.previous: dict[int, Any] = {}
        self.names = ["SIGTERM", "SIGINT"] + ([extra] if extra and extra not in ("SIGTERM", "SIGINT") else [])
        self.runner = None if threading.current_thread() is threading.main_thread() else StopRequest.main_thread
        try:
            self.runner(self._install) if self.runner else self._install()
        except Exception as e:  # not the main thread and no way to reach it: the launcher handles signals
            if self.runner:
                print(f"warning: no stop-at-step on signals in this process ({type(e).__name__}: {e})",
                      file=sys.stderr, flush=True)
            self.restore()

    def _install(self) -> None:
        import signal
        for name in self.names:
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def _undo(self) -> None:
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def restore(self) -> None:
        if not self.previous:
            return
        try:
            self.runner(self._undo) if self.runner else self._undo()
        except Exception:  # the process is going away (Ray tears the worker group down): nothing to give back
            self.previous = {}
