"""Test-only run callbacks (`callbacks.NAME._target_=killswitch.KillAfterEpoch`): stop a run right after an
epoch's checkpoint, as a crash or a preemption would. Subprocesses find this module through PYTHONPATH, which
`conftest.train_py` sets."""

import os
import signal


class Interrupted(BaseException):
    """Stands in for a kill in-process."""


class KillAfterEpoch:
    """SIGKILL this process right after epoch `epoch`'s checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAfterEpoch(KillAfterEpoch):
    """Raise `Interrupted` instead: the same stopping point, in-process and in a fraction of the time."""

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        if epoch == self.epoch:
            raise Interrupted(epoch)


def kill_after(epoch: int) -> list[str]:
    """The overrides that SIGKILL a train.py run after `epoch`."""
    return ["+callbacks.kill._target_=killswitch.KillAfterEpoch", f"+callbacks.kill.epoch={epoch}"]


def interrupt_after(epoch: int) -> list[str]:
    """The overrides that interrupt an in-process run after `epoch`."""
    return ["+callbacks.stop._target_=killswitch.InterruptAfterEpoch", f"+callbacks.stop.epoch={epoch}"]


class SignalAfterEpoch(KillAfterEpoch):
    """Send this process `signal_name` (SIGTERM, SIGINT) right after epoch `epoch`'s checkpoint: the run must
    stop at its next safe point, in the middle of the next epoch's first step."""

    def __init__(self, epoch: int, signal_name: str = "SIGTERM") -> None:
        super().__init__(epoch)
        self.signum = signal.Signals[signal_name]

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        if epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


def signal_after(epoch: int, signal_name: str = "SIGTERM") -> list[str]:
    """The overrides that send `signal_name` to a train.py run after `epoch`."""
    return [
        "+callbacks.signal._target_=killswitch.SignalAfterEpoch",
        f"+callbacks.signal.epoch={epoch}",
        f"+callbacks.signal.signal_name={signal_name}",
    ]
