"""What a run reports is what it trained: the progress bar changes nothing, the α schedule's record is the
schedule as run (the α reached, the kept epoch's weights), and early stopping compares comparable losses."""

import json
from pathlib import Path

import pytest
from conftest import FAST, compose, strip_timing

from ease.app.runner import run

SYNTHETIC = [arg for arg in FAST if not arg.startswith(("progress=", "train.max_epochs="))]


def metrics(overrides: list[str], out: Path) -> dict:
    run(compose(overrides), out)
    return json.loads((out / "metrics.json").read_text())["metrics"]


def test_progress_bar_does_not_change_results(tmp_path: Path) -> None:
    # tqdm calls iter() on the batches more than once; the epoch's order must not move with it.
    args = [*SYNTHETIC, "+preset=deed", "routing.threshold=0.3", "train.max_epochs=3", "train.patience=5"]
    shown = metrics([*args, "progress=true"], tmp_path / "on")
    hidden = metrics([*args, "progress=false"], tmp_path / "off")
    assert shown["epochs_run"] == 3
    assert strip_timing(shown) == strip_timing(hidden)


def test_alpha_schedule_reports_what_was_trained(tmp_path: Path) -> None:
    args = [
        *SYNTHETIC, "+preset=asymmetric", "schedule=linear", "schedule.start=0.9", "schedule.end=0.1",
        "train.max_epochs=5", "train.patience=1", "train.lr=0.02",
    ]  # fmt: skip
    m = metrics(args, tmp_path / "run")
    history = m["history"]
    # The α each epoch trained with follows the plan over max_epochs: 0.9, 0.7, 0.5, ...
    alphas = [row["weights"]["1"] for row in history]
    assert alphas == pytest.approx([0.9 - 0.2 * e for e in range(len(history))])
    report = m["alpha_schedule"]
    assert (report["kind"], report["start"], report["end"], report["planned_epochs"]) == ("linear", 0.9, 0.1, 5)
    assert report["epochs_run"] == len(history) and report["reached"] == pytest.approx(alphas[-1])
    # The reported weights are the kept (best) epoch's, not the configured α = 0.7.
    best = m["best_epoch"]
    kept = history[best - 1]["weights"]
    assert m["layer_weights"] == kept and report["best_epoch_alpha"] == pytest.approx(alphas[best - 1])
    # Moving weights make the weighted loss incomparable across epochs: early stopping watched the routed loss.
    assert report["monitor"] == "routed_loss"
    routed_ppl = [row["val_ppl"] for row in history]  # exp(routed loss): the kept epoch has the lowest
    assert best == 1 + routed_ppl.index(min(routed_ppl))


def test_constant_weights_keep_the_weighted_monitor(tmp_path: Path) -> None:
    m = metrics([*SYNTHETIC, "+preset=asymmetric", "train.max_epochs=2"], tmp_path / "run")
    assert "alpha_schedule" not in m
    assert m["layer_weights"] == {"1": 0.7, "2": 0.0, "3": pytest.approx(0.3)}
