"""DataLoader worker processes of the shard stream: how they treat stop signals, and how they are stopped.

Workers ignore SIGTERM / SIGUSR1 (torchrun and Slurm signal a rank's whole process group; a worker that died of
it would take the rank down before it could save the checkpoint the signal asked for). The price: torch's own
shutdown cannot end them. Its `_shutdown_workers` joins each worker for up to 5 s and then sends SIGTERM, and it
does nothing at all once the interpreter is exiting; multiprocessing's exit handler then sends SIGTERM and joins
forever. So `stop_workers` ends them itself: the stop request torch's protocol defines, a short grace period,
then SIGKILL for whatever still runs (a worker blocked on a dead server, or in a long decode). An exit handler
does the same for every stream still open when the interpreter exits (an exception that skipped `close()`).
"""

from __future__ import annotations

import atexit
import signal
import time
import weakref
from typing import Any

_open_streams: "weakref.WeakSet[Any]" = weakref.WeakSet()
_exit_hook_installed = False


def survive_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: ignore SIGTERM / SIGUSR1 (workers still end with their parent: torch's
    workers watch it, and `stop_workers` kills them)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def stop_workers(loader_iter: Any, grace_s: float = 2.0) -> None:
    """End the worker processes of a DataLoader iterator within about `grace_s` seconds, whatever they do."""
    workers = list(getattr(loader_iter, "_workers", ()))
    if not workers:
        return  # single-process loading: nothing runs in the background
    if getattr(loader_iter, "_worker_pids_set", False):
        # Unregister first: torch's SIGCHLD handler would otherwise raise "DataLoader worker (pid ...) is killed
        # by signal" in this process when a worker is killed below.
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(loader_iter))
        loader_iter._worker_pids_set = False
    loader_iter._workers_done_event.set()
    for index_queue in loader_iter._index_queues:  # torch's "final signal": a worker exits when it reads None
        try:
            index_queue.put(None)
        except (OSError, ValueError):
            pass  # queue already closed
    deadline = time.monotonic() + grace_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    for worker in workers:
        worker.join(5.0)
    loader_iter._shutdown_workers()  # releases torch's queues and threads; the workers are gone, so no waiting


def track(stream: Any) -> None:
    """Close `stream` at interpreter exit if it is still open then."""
    global _exit_hook_installed
    _open_streams.add(stream)
    if not _exit_hook_installed:
        # Registered after torch and multiprocessing registered theirs, so it runs before them (atexit is LIFO):
        # while torch's DataLoader still works and before multiprocessing would join the workers forever.
        atexit.register(_close_open_streams)
        _exit_hook_installed = True


def untrack(stream: Any) -> None:
    _open_streams.discard(stream)


def _close_open_streams() -> None:
    for stream in list(_open_streams):
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - best effort at exit; the next stream must still be closed
            pass
