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


class StopFlag:
    """Installs handlers for `signals` (main thread only) that only record the signal; `should_stop()` is the
    collective that turns "some rank saw a signal" into "every rank stops now". Use as a context manager so the
    previous handlers come back afterwards."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
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
        if self.received is None:
            self.received = 0

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank iff any rank has received a stop signal. A collective: call it on all ranks at
        the same point of the loop."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        return bool(D.all_reduce_(flag, op="max").item() > 0)

    @property
    def reason(self) -> str:
        if self.received is None:
            return "none"
        if self.received == 0:
            return "requested"
        return signal.Signals(self.received).name
