"""train.py end to end: every preset for one epoch, the subprocess entry point, -m, and bad configurations."""

import json
from pathlib import Path

import pytest
from conftest import FAST, REPO, compose, train_py

from ease.app.runner import run

PRESETS = sorted(p.stem for p in (REPO / "conf" / "preset").glob("*.yaml"))
METRIC_KEYS = ("ppl", "acc", "shallow_ratio", "compute_cost", "per_exit", "history", "threshold_analysis")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_one_epoch(name: str, tmp_path: Path) -> None:
    cfg = compose([f"+preset={name}", *FAST])
    record = run(cfg, tmp_path, [f"+preset={name}"])
    assert record["status"] == "ok"
    metrics = record["metrics"]
    for key in METRIC_KEYS:
        assert key in metrics, key
    assert 1.0 < metrics["ppl"] < cfg.data.synthetic_vocab_size * 2
    assert 0.0 <= metrics["shallow_ratio"] <= 1.0
    assert (tmp_path / "checkpoint.pt").is_file()
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["overrides"] == [f"+preset={name}"]


def test_routed_metrics_follow_the_preset(tmp_path: Path) -> None:
    """The run's headline numbers are the routed ones: the same as its threshold-curve row at its threshold."""
    cfg = compose(["+preset=deed", *FAST, "train.max_epochs=3", "routing.analysis_thresholds=[0.3,0.7]"])
    metrics = run(cfg, tmp_path)["metrics"]
    row = next(r for r in metrics["threshold_analysis"] if r["threshold"] == 0.7)
    for key in ("ppl", "acc", "shallow_ratio", "compute_cost"):
        assert metrics[key] == pytest.approx(row[key])
    # compute_cost counts layers: exits at L1 cost 1, the rest 3.
    shallow = metrics["shallow_ratio"]
    assert metrics["compute_cost"] == pytest.approx((shallow * 1 + (1 - shallow) * 3) / 3)


def test_weights_recorded_per_epoch_under_a_schedule(tmp_path: Path) -> None:
    cfg = compose(["+preset=asymmetric", *FAST, "schedule=linear", "train.max_epochs=3", "train.patience=5"])
    history = run(cfg, tmp_path)["metrics"]["history"]
    alphas = [row["weights"][1] for row in history]
    assert alphas == pytest.approx([0.9, 0.7, 0.5])
    assert [row["weights"][3] for row in history] == pytest.approx([0.1, 0.3, 0.5])


def test_train_py_subprocess_writes_record(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = train_py("+preset=deed", "data=synthetic", "train.max_epochs=1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["config"]["routing"]["threshold"] == 0.7
    assert record["config"]["model"]["num_layers"] == 3
    assert record["overrides"] == ["+preset=deed", "data=synthetic", "train.max_epochs=1"]
    assert record["objective"]["names"] == ["ppl"]
    assert record["objective"]["values"][0] == pytest.approx(record["metrics"]["ppl"])
    assert (out / "checkpoint.pt").is_file() and (out / "train.log").is_file()
    assert not (tmp_path / "outputs").exists()  # nothing lands in the cwd


def test_multirun_over_two_presets(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = train_py("-m", "+preset=standard_llm,deed", *FAST, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = sorted(sweep.glob("*/metrics.json"))
    assert len(records) == 2
    presets = {json.loads(p.read_text())["overrides"][0] for p in records}
    assert presets == {"+preset=standard_llm", "+preset=deed"}


# Bad configurations (out of range, unknown option or preset, mistyped key, missing data, ...) are the table in
# tests/test_bad_inputs.py: each exits non-zero with one line naming the key, and leaves no record claiming success.
