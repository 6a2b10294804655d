"""Graceful stops: SIGTERM (what SLURM sends on preemption) or SIGINT asks the run to stop at the next safe point.

    with stop_on_signals():
        ...  # training loops call check_stop() after every optimizer step and evaluation batch

The handler only records the request; `check_stop` raises `StopRequested` at the next safe point, so no step
is cut in half and no file is left half-written. A second signal of the same kind while the first is pending
stops at once (the default action), for a run stuck outside the loops. Training loops that catch the stop between
two steps save a checkpoint at that step (Trainer, ASHEM's phases); after a stop during an evaluation, the last
evaluation's checkpoint is what a resume continues from.
"""

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: int | None = None


class StopRequested(BaseException):
    """Raised at a safe point after a stop signal. A BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


def check_stop() -> None:
    """Raise `StopRequested` if a stop signal arrived; call at safe points (after a step, between batches)."""
    if _pending is not None:
        raise StopRequested(_pending)


def pending_stop() -> int | None:
    """The signal number of a pending stop request, or None (data-parallel ranks agree on it before stopping)."""
    return _pending


def _request(signum: int, frame: object) -> None:
    global _pending
    if _pending == signum:  # asked twice: the default action now
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
    _pending = signum


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Turn `signals` into stop requests inside the block (main thread only); restore the handlers after."""
    global _pending
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}
    _pending = None
    for s in signals:
        signal.signal(s, _request)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _pending = None
