"""Reliability: resume after a kill is bit-identical, runs are deterministic, NaN stops cleanly, writes are atomic."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, strip_timing, train_py
from killswitch import kill_after

from ease.app.runner import run
from ease.io import write_json_atomic
from ease.training import NonFiniteLossError, Trainer

RUN = [
    "+preset=asymmetric", "model=tiny", "data=synthetic", "data.synthetic_tokens=6000", "schedule=linear",
    "train.max_epochs=4", "train.patience=10", "progress=false", "threads=1",
]  # fmt: skip


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert train_py(*RUN, f"hydra.run.dir={full}").returncode == 0
    # A test-only run callback SIGKILLs the process right after epoch 2's checkpoint is written.
    proc = train_py(*RUN, *kill_after(2), f"hydra.run.dir={killed}")
    assert proc.returncode == -9
    assert not (killed / "metrics.json").exists()
    state = torch.load(killed / "checkpoint.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 2 and not state["completed"]
    proc = train_py(*RUN, "resume=true", f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr + proc.stdout or "resumed from" in (killed / "train.log").read_text()
    a = json.loads((full / "metrics.json").read_text())["metrics"]
    b = json.loads((killed / "metrics.json").read_text())["metrics"]
    assert strip_timing(a) == strip_timing(b)  # bit for bit: JSON floats round-trip exactly
    assert [row["weights"]["1"] for row in b["history"]] == pytest.approx([0.9, 0.7666667, 0.6333333, 0.5])


def test_same_config_and_seed_give_identical_metrics(tmp_path: Path) -> None:
    cfg = compose([*RUN, "train.max_epochs=2"])
    a = run(cfg, tmp_path / "a")["metrics"]
    b = run(cfg, tmp_path / "b")["metrics"]
    assert strip_timing(a) == strip_timing(b)
    other = run(compose([*RUN, "train.max_epochs=2", "seed=1"]), tmp_path / "c")["metrics"]
    assert other["ppl"] != a["ppl"]  # the seed really reaches data, init and order


def test_nan_loss_stops_cleanly_and_keeps_the_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Trainer.batch_loss

    def nan_in_second_epoch(self, model, x, y, weights):
        loss, report = real(self, model, x, y, weights)
        return (loss * float("nan") if self.epoch >= 1 else loss), report

    monkeypatch.setattr(Trainer, "batch_loss", nan_in_second_epoch)
    cfg = compose([*FAST, "train.max_epochs=3"])
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        run(cfg, tmp_path)
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed"
    assert "non-finite training loss" in record["error"]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["train_state"]["epoch"] == 1  # epoch 1's checkpoint, not overwritten
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_json_writes_are_atomic(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"status": "ok", "x": float("nan")})
    assert json.loads(path.read_text()) == {"status": "ok", "x": None}  # NaN is not JSON: stored as null
    with pytest.raises(TypeError):
        write_json_atomic(path, {"status": "broken", "bad": object()})
    assert json.loads(path.read_text())["status"] == "ok"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_results_tables_are_written_atomically(tmp_path: Path) -> None:
    from ease.io import atomic_write

    table = tmp_path / "results.csv"
    table.write_text("run,ppl\nold,1.0\n")

    def crash_half_way(tmp: Path) -> None:
        tmp.write_text("run,ppl\nnew,")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        atomic_write(table, crash_half_way)
    assert table.read_text() == "run,ppl\nold,1.0\n"
    assert list(tmp_path.iterdir()) == [table]
    atomic_write(table, lambda tmp: tmp.write_text("run,ppl\nnew,2.0\n"))
    assert table.read_text() == "run,ppl\nnew,2.0\n"
