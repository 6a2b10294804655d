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
