"""Preemption and interrupts: SIGTERM / SIGINT stop a run at the next safe point with a record that says so,
exit 128+signal, and `resume=true` ends with the metrics of an uninterrupted run. Also: no stale records, no
orphaned temporary files, files readable under the umask."""

import json
import os
import signal
import stat

import pytest
import torch
from conftest import strip_timing, train_py
from killswitch import signal_after

from ease.io import atomic_write, remove_orphans

RUN = ["+preset=deed", "model=tiny", "data=synthetic", "data.synthetic_tokens=6000", "train.max_epochs=3",
       "train.patience=5", "progress=false"]  # fmt: skip


def record(folder):
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("name", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_signal_stops_cleanly_and_resume_matches_an_uninterrupted_run(tmp_path, name) -> None:
    full = tmp_path / "full"
    assert train_py(*RUN, f"hydra.run.dir={full}").returncode == 0
    stopped = tmp_path / "stopped"
    proc = train_py(*RUN, *signal_after(1, name), f"hydra.run.dir={stopped}")
    assert proc.returncode == 128 + signal.Signals[name]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"stopped by {name}" in lines[0] and "resume=true" in lines[0]
    assert "Traceback" not in proc.stderr
    r = record(stopped)
    assert r["status"] == "interrupted" and r["signal"] == name and r["metrics"] == {}
    assert (stopped / "checkpoint.pt").is_file() and not list(stopped.glob(".*.tmp"))
    # the checkpoint is the stop point, one step into epoch 2, not the end of epoch 1
    state = torch.load(stopped / "checkpoint.pt", weights_only=True)["train_state"]
    steps_per_epoch = record(full)["metrics"]["training"]["steps_run"] // 3
    assert state["interval"]["steps"] == 1 and state["trainer"]["step"] == steps_per_epoch + 1
    assert train_py(*RUN, "resume=true", f"hydra.run.dir={stopped}").returncode == 0
    assert record(stopped)["status"] == "ok"
    assert strip_timing(record(stopped)["metrics"]) == strip_timing(record(full)["metrics"])


@pytest.mark.slow
def test_a_stop_by_steps_resumes_mid_interval(tmp_path) -> None:
    args = [*RUN, "train.max_steps=12", "train.eval_every=5", "train.grad_accum=2", "train.lr_schedule=linear"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert train_py(*args, f"hydra.run.dir={full}").returncode == 0
    assert train_py(*args, *signal_after(1), f"hydra.run.dir={stopped}").returncode == 128 + signal.SIGTERM
    state = torch.load(stopped / "checkpoint.pt", weights_only=True)["train_state"]
    assert state["trainer"]["step"] == 6 and state["interval"]["steps"] == 1
    assert train_py(*args, "resume=true", f"hydra.run.dir={stopped}").returncode == 0
    assert strip_timing(record(stopped)["metrics"]) == strip_timing(record(full)["metrics"])


def test_a_finished_folder_refuses_a_new_run_without_resume(tmp_path) -> None:
    args = [*RUN, "train.max_epochs=1", f"hydra.run.dir={tmp_path}"]
    assert train_py(*args).returncode == 0
    before = (tmp_path / "metrics.json").read_bytes()
    proc = train_py(*args)
    assert proc.returncode == 1
    assert f"error: hydra.run.dir: {tmp_path} already holds a run's record (metrics.json, status ok)" in proc.stderr
    assert (tmp_path / "metrics.json").read_bytes() == before  # the old record is untouched


def test_orphaned_temporary_files_are_removed(tmp_path) -> None:
    orphan = tmp_path / ".checkpoint.pt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    keep = tmp_path / "checkpoint.pt"
    keep.write_bytes(b"x")
    assert remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and keep.exists()


def test_written_files_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint would do if loaded unsafely."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("args", [["task=eval", "checkpoint={ckpt}"], ["resume=true", "hydra.run.dir={run}"]])
def test_a_crafted_checkpoint_runs_no_code(tmp_path, args) -> None:
    import torch

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model_args": {}, "model": {}, "train_state": _Payload(str(marker))}, run / "checkpoint.pt")
    filled = [a.format(ckpt=run / "checkpoint.pt", run=run) for a in args]
    proc = train_py(*filled, "model=tiny", "data=synthetic", "progress=false")
    assert proc.returncode == 1 and not marker.exists()
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert "safe loading (weights_only=True) refuses" in line and str(run / "checkpoint.pt") in line


def test_a_failed_write_names_the_file(tmp_path) -> None:
    import errno

    def full(_tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device: cannot write .*metrics\.json$") as err:
        atomic_write(tmp_path / "metrics.json", full)
    assert err.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())
