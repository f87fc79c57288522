"""Stop signals: SIGTERM and SIGUSR1 (preemption) and SIGINT (Ctrl-C) stop the run cleanly with
a checkpoint.

Contract (launch scripts rely on it; see docs/fault-tolerance.md): on SIGTERM or SIGUSR1 a rank
only raises a flag. At the end of the current optimizer step every rank all-reduces the flag
(MAX), so all ranks stop after the same step even when only some were signalled; they save a
checkpoint synchronously, leave the process group, and the process exits with `EXIT_REQUEUE`.
A launch script that sees 85 requeues the job; the requeued job resumes from that checkpoint.

SIGINT (Ctrl-C, or torchrun passing it on) takes the same orderly path, agreed the same way: the
step finishes, a save in flight completes, the final checkpoint is written, the run lock is
released, and the process exits with `EXIT_INTERRUPTED` (130, the shell's status for Ctrl-C) so
that nothing requeues a user's interrupt. A second SIGINT raises KeyboardInterrupt at once (the
way out of a hung step); checkpoint files are published atomically, so a save it cuts short is
left incomplete and never loaded.

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
EXIT_INTERRUPTED = 130  # "stopped by Ctrl-C after saving": 128 + SIGINT, as a shell reports it
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (`requested`) or SIGINT (`interrupted`); read by the training
    loop at the end of each step."""

    def __init__(self) -> None:
        self.signum = 0  # 0: no preemption signal received
        self.interrupted = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.interrupted = True
        log.warning(
            "received SIGINT: finishing this step, then saving and exiting with %d "
            "(Ctrl-C again stops at once, without saving)",
            EXIT_INTERRUPTED,
        )

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
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def uninstall(self) -> None:
        """Give the signals back to whoever handled them before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


__all__ = ["EXIT_INTERRUPTED", "EXIT_REQUEUE", "PREEMPTION_SIGNALS", "PreemptionFlag"]
