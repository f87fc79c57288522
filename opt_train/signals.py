"""Preemption signals: SIGTERM and SIGUSR1 stop the run cleanly with a checkpoint.

Contract (launch scripts rely on it; see docs/fault-tolerance.md): on SIGTERM or SIGUSR1 a rank
only raises a flag. At the end of the current optimizer step every rank all-reduces the flag
(MAX), so all ranks stop after the same step even when only some were signalled; they save a
checkpoint synchronously, leave the process group, and the process exits with `EXIT_REQUEUE`.
A launch script that sees 85 requeues the job; the requeued job resumes from that checkpoint.

The handler does nothing else: raising from a signal handler could interrupt a collective half
way on one rank and leave its peers waiting, and writing a checkpoint from inside a handler
would race the training step that was running.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)

EXIT_REQUEUE = 85  # "stopped by a preemption signal after saving; requeue me"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; read by the training loop at the end of each step."""

    def __init__(self) -> None:
        self.signum = 0  # 0: no signal received
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            log.warning(
                "received %s: finishing this step, then saving and exiting with %d",
                signal.Signals(signum).name,
                EXIT_REQUEUE,
            )
        self.signum = signum

    def install(self) -> PreemptionFlag:
        """Route the preemption signals to this flag (main thread only, as Python requires)."""
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back to whoever handled them before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


__all__ = ["EXIT_REQUEUE", "PREEMPTION_SIGNALS", "PreemptionFlag"]
