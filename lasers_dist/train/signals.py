"""Graceful stop: SIGTERM / SIGUSR1 or a stop file set a flag; the ranks agree on it through an all-reduce at a
step boundary.

A signal may reach only some ranks (Slurm's --signal goes to the tasks of a step, a user may `kill` one pid,
torchrun forwards SIGTERM to its workers); whichever rank saw it, all ranks stop after the same step, save one
checkpoint together and exit, so the job can be requeued and resumed with `--resume auto`.

The stop file (train.stop_file, by default out_dir/STOP) works whatever a launcher forwards: a Slurm batch
script that traps USR1 creates it, or a user runs `touch runs/x/STOP`. Every rank looks for it at each step
boundary (one stat), so on a shared file system all ranks see it at the same step; if they do not, the
all-reduce still makes them stop together.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import torch

from lasers_dist.train import distributed as D

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Codes agreed by a max-reduction, above every signal number; the larger code names the reason.
_STOP_FILE = 254  # the stop file exists
_REQUESTED = 255  # stop asked for by code (train.stop_at_step)


def stop_file_path(out_dir: str | Path, stop_file: str = "") -> Path:
    """Where a run looks for its stop file: train.stop_file, or out_dir/STOP when that is empty."""
    return Path(stop_file) if stop_file else Path(out_dir) / "STOP"


class StopFlag:
    """Installs handlers for `signals` (main thread only) that only record the signal; `should_stop()` is the
    collective that turns "some rank saw a signal or the stop file" into "every rank stops now". Use as a context
    manager so the previous handlers come back afterwards."""

    def __init__(
        self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, stop_file: str | Path | None = None
    ) -> None:
        self.signals = signals
        self.stop_file = Path(stop_file) if stop_file else None
        self.received: int | None = None  # what this rank saw: a signal number, or _REQUESTED
        self.agreed: int = 0  # after should_stop(): the largest code any rank saw (0: none)
        self.saw_stop_file = False  # this rank found the stop file at the last should_stop()
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
        """True on every rank iff any rank has received a stop signal or request, or found the stop file. A
        collective: call it on all ranks at the same point of the loop. Afterwards `reason` names what stopped
        the run on every rank."""
        self.saw_stop_file = self.stop_file is not None and self.stop_file.exists()
        local = max(self.received or 0, _STOP_FILE if self.saw_stop_file else 0)
        code = torch.tensor([float(local)], device=device)
        self.agreed = int(D.all_reduce_(code, op="max").item())
        return self.agreed > 0

    def consume_stop_file(self) -> bool:
        """Remove the stop file this rank acted on (call on one rank, after the stop's checkpoint is committed),
        so that the resumed run does not stop again at once. True if a file was removed."""
        if not (self.saw_stop_file and self.stop_file is not None):
            return False
        try:
            self.stop_file.unlink()
        except FileNotFoundError:  # removed by hand meanwhile
            return False
        return True

    @property
    def reason(self) -> str:
        """"SIGTERM" / "SIGUSR1" (seen by any rank), "stop_file", "requested", or "none"."""
        if self.agreed == _REQUESTED:
            return "requested"
        if self.agreed == _STOP_FILE:
            return "stop_file"
        return signal.Signals(self.agreed).name if self.agreed else "none"
