"""Graceful stop: SIGTERM / SIGUSR1 set a flag; the ranks agree on it through an all-reduce at a step boundary.

A signal may reach only some ranks (Slurm's --signal goes to the tasks of a step, a user may `kill` one pid,
torchrun forwards SIGTERM to its workers); whichever rank saw it, all ranks stop after the same step, save one
checkpoint together and exit, so the job can be requeued and resumed with `--resume auto`.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch

from lasers_dist.train import distributed as D

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_REQUESTED = 255  # stop asked for by code (train.stop_at_step); above every signal number


class StopFlag:
    """Installs handlers for `signals` (main thread only) that only record the signal; `should_stop()` is the
    collective that turns "some rank saw a signal" into "every rank stops now". Use as a context manager so the
    previous handlers come back afterwards."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None  # what this rank saw: a signal number, or _REQUESTED
        self.agreed: int = 0  # after should_stop(): the largest code any rank saw (0: none)
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record: saving from inside a handler would interleave with a half-finished step or collective.
        self.received = signum

    def __enter__(self) -> StopFlag:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self) -> None:
        """Ask for a stop from code (e.g. train.stop_at_step): handled exactly like a signal."""
        self.received = max(self.received or 0, _REQUESTED)

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank iff any rank has received a stop signal or request. A collective: call it on all
        ranks at the same point of the loop. Afterwards `reason` names what stopped the run on every rank."""
        code = torch.tensor([float(self.received or 0)], device=device)
        self.agreed = int(D.all_reduce_(code, op="max").item())
        return self.agreed > 0

    @property
    def reason(self) -> str:
        """"SIGTERM" / "SIGUSR1" (seen by any rank), "requested", or "none"."""
        if self.agreed == _REQUESTED:
            return "requested"
        return signal.Signals(self.agreed).name if self.agreed else "none"
