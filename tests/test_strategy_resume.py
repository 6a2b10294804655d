"""Resuming strategy=ashem and strategy=token_routed: a kill at any epoch, of either ASHEM phase, then resume=true in
the same run folder ends with the metrics of an uninterrupted run, bit for bit on CPU (timing keys aside).

SIGKILL through a test-only run callback (`killswitch.KillAfterEpoch`) in a subprocess for one epoch of each phase;
for every other epoch an in-process callback raises instead, which stops the run at the same point (right after
that epoch's checkpoint) in a fraction of the time.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import compose, strip_timing, train_py
from killswitch import Interrupted, interrupt_after, kill_after, signal_after

from ease.app.runner import run
from ease.checkpoint import load_checkpoint
from ease.stop import StopRequested

# 6 epochs: phase 1 runs into max_epochs with its last epoch not improving (so the best one is restored),
# phase 2 stops early after 2 of 4 epochs. Dropout and several batches per epoch make the restored RNG state
# and the data order matter.
ASHEM = [
    "+preset=ashem", "model.dim=16", "model.num_heads=2", "model.dropout=0.1", "data=synthetic",
    "data.synthetic_tokens=6000", "train.batch_size=8", "train.max_epochs=4", "strategy.phase1_lr=0.05",
    "strategy.phase1_patience=1", "strategy.phase2_lr=0.1", "strategy.phase2_patience=1", "progress=false",
    "threads=1",
]  # fmt: skip
ASHEM_PHASES = [1, 1, 1, 1, 2, 2]
# 4 epochs of 6 batches: stops early (patience 1) before max_epochs, the exit route's share moving from 5% to 50%.
TOKEN_ROUTED = [
    "+preset=token_routed", "model=tiny", "model.dropout=0.1", "data=synthetic", "data.synthetic_tokens=6000",
    "train.max_epochs=5", "train.patience=1", "train.lr=0.05", "progress=false", "threads=1",
]  # fmt: skip


def metrics(overrides: list[str], out: Path) -> dict:
    """Run in-process; the metrics as metrics.json has them (JSON floats round-trip exactly)."""
    run(compose(overrides), out)
    return json.loads((out / "metrics.json").read_text())["metrics"]


def train_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["train_state"]


# --- ASHEM --------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # one SIGKILL + resume stays in the default suite (test_reliability.py); every epoch in-process below
def test_ashem_sigkill_in_each_phase_then_resume_matches_uninterrupted_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ease")
    full = metrics(ASHEM, tmp_path / "full")
    assert [row["phase"] for row in full["history"]] == ASHEM_PHASES
    for kill, phase in ((2, 1), (5, 2)):
        out = tmp_path / f"killed_{kill}"
        proc = train_py(*ASHEM, *kill_after(kill), f"hydra.run.dir={out}")
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert not (out / "metrics.json").exists()
        state = train_state(out)
        assert (state["strategy"], state["phase"], state["epoch"], state["completed"]) == ("ashem", phase, kill, False)
        # The checkpoint holds the model being trained: Block 1 in phase 1, the routed 4-layer model in phase 2.
        model, _ = load_checkpoint(out / "checkpoint.pt")
        assert model.num_layers == (2 if phase == 1 else 4)
        if phase == 2:
            assert model.exit_layers == (2,) and model.routing_threshold == full["strategy"]["threshold"]
            assert state["threshold"] == full["strategy"]["threshold"]
            assert len(state["phase2_train"]["early_stopping"]["history"]) == kill - 4
        resumed = metrics([*ASHEM, "resume=true"], out)
        assert strip_timing(resumed) == strip_timing(full)
        assert f"after epoch {kill} (ASHEM phase {phase})" in caplog.text
    # The final checkpoint is still the routed model, and carries its finished state; task=eval scores it.
    threshold = full["strategy"]["threshold"]
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert model.num_layers == 4 and model.routing_threshold == threshold
    assert ckpt["train_state"]["completed"] and ckpt["train_state"]["epoch"] == len(ASHEM_PHASES)
    routing = ["routing=confidence", "routing.exit_layer=2", f"routing.threshold={threshold!r}"]
    scored = metrics(["task=eval", f"checkpoint={out}", *routing], tmp_path / "eval")
    assert (scored["ppl"], scored["shallow_ratio"]) == (full["ppl"], full["shallow_ratio"])


def test_ashem_stopped_by_a_signal_mid_epoch_resumes_from_that_step(tmp_path: Path) -> None:
    """SIGTERM right after epoch e's checkpoint stops the run at its next safe point: one step into phase 1's
    epoch 2 (e=1), phase 1's final evaluation (e=4: no step taken, epoch 4's checkpoint stands), one step into
    phase 2's second epoch (e=5). The checkpoint is that point; resuming ends with the uninterrupted metrics."""
    full = metrics(ASHEM, tmp_path / "full")
    for after, phase, epochs_done in ((1, 1, 1), (4, 1, 4), (5, 2, 1)):
        out = tmp_path / f"stopped_{after}"
        with pytest.raises(StopRequested):
            run(compose([*ASHEM, *signal_after(after)]), out)
        assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
        state = train_state(out)
        assert (state["phase"], state["completed"]) == (phase, False)
        train = state["phase1_train"] if phase == 1 else state["phase2_train"]
        assert len(train["early_stopping"]["history"]) == epochs_done
        if after == 4:  # stopped during an evaluation: the epoch's own checkpoint
            assert train["interval"] is None and state["epoch"] == 4
        elif phase == 1:  # the Trainer's sums of the unfinished epoch, after its first step
            assert train["interval"]["steps"] == 1
        else:  # phase 2: a batch or more of its second epoch (epoch index 1) done
            assert train["interval"]["epoch"] == 1 and train["interval"]["batches"] >= 1
            assert train["interval"]["tokens"] > 0
        assert strip_timing(metrics([*ASHEM, "resume=true"], out)) == strip_timing(full), f"stopped after {after}"


# Every epoch with the seed's hard examples from val; with them from train, the epochs where the source
# batches' order matters: phase 1's last (the cache is rebuilt after it) and phase 2's last (already stopped).
@pytest.mark.parametrize(("source", "kills"), [("val", [1, 2, 3, 4, 5, 6]), ("train", [4, 6])])
def test_ashem_resume_after_any_epoch_matches_uninterrupted_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, source: str, kills: list[int]
) -> None:
    caplog.set_level(logging.INFO, logger="ease")
    cfg = [*ASHEM, f"strategy.hard_examples_from={source}"]
    full = metrics(cfg, tmp_path / "full")
    assert [row["phase"] for row in full["history"]] == ASHEM_PHASES
    threshold = full["strategy"]["threshold"]
    for kill in kills:
        phase = ASHEM_PHASES[kill - 1]
        out = tmp_path / f"killed_{kill}"
        with pytest.raises(Interrupted):
            run(compose([*cfg, *interrupt_after(kill)]), out)
        state = train_state(out)
        assert (state["strategy"], state["phase"], state["epoch"], state["completed"]) == ("ashem", phase, kill, False)
        # The checkpoint holds the model being trained: Block 1 in phase 1, the routed 4-layer model in phase 2.
        model, _ = load_checkpoint(out / "checkpoint.pt")
        assert model.num_layers == (2 if phase == 1 else 4)
        if phase == 2:
            assert model.exit_layers == (2,) and model.routing_threshold == threshold == state["threshold"]
            assert len(state["phase2_train"]["early_stopping"]["history"]) == kill - 4
        assert strip_timing(metrics([*cfg, "resume=true"], out)) == strip_timing(full), f"killed after epoch {kill}"
        assert f"after epoch {kill} (ASHEM phase {phase})" in caplog.text
    # The final checkpoint is still the routed model, and carries its finished state; task=eval scores it.
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert model.num_layers == 4 and model.routing_threshold == threshold
    assert ckpt["train_state"]["completed"] and ckpt["train_state"]["epoch"] == len(ASHEM_PHASES)
    routing = ["routing=confidence", "routing.exit_layer=2", f"routing.threshold={threshold!r}"]
    scored = metrics(["task=eval", f"checkpoint={out}", *routing], tmp_path / "eval")
    assert (scored["ppl"], scored["shallow_ratio"]) == (full["ppl"], full["shallow_ratio"])
    # Resuming a finished run (killed after its last checkpoint, before metrics.json) repeats its metrics.
    assert strip_timing(metrics([*cfg, "resume=true"], tmp_path / "full")) == strip_timing(full)


def test_ashem_resume_refuses_a_changed_setup(tmp_path: Path) -> None:
    phase1, phase2 = tmp_path / "phase1", tmp_path / "phase2"
    for out, kill in ((phase1, 1), (phase2, 5)):
        with pytest.raises(Interrupted):
            run(compose([*ASHEM, *interrupt_after(kill)]), out)
    cases = [
        (phase1, [*ASHEM, "model.dim=32"], r"^checkpoint: .*checkpoint\.pt has dim=16, the configured model has 32$"),
        (phase2, [*ASHEM, "model.dim=32"], r"^checkpoint: .*checkpoint\.pt has dim=16, the configured model has 32$"),
        (phase2, [*ASHEM, "strategy.hard_example_ratio=0.3"], r"^resume: the threshold rebuilt from the checkpoint's"),
        (phase2, TOKEN_ROUTED, r"was saved by a strategy=ashem run, this run is strategy=token_routed$"),
    ]
    for out, overrides, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            run(compose([*overrides, "resume=true"]), out)
        assert "\n" not in str(err.value)
        assert json.loads((out / "metrics.json").read_text())["status"] == "failed"


# --- token-routed -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # one SIGKILL + resume stays in the default suite (test_reliability.py); every epoch in-process below
def test_token_routed_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = metrics(TOKEN_ROUTED, tmp_path / "full")
    assert full["epochs_run"] == 4 and full["history"][-1]["improved"] is False  # stopped early
    out = tmp_path / "killed"
    proc = train_py(*TOKEN_ROUTED, *kill_after(2), f"hydra.run.dir={out}")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    state = train_state(out)
    assert (state["strategy"], state["epoch"], state["completed"]) == ("token_routed", 2, False)
    routes = [{k: v for k, v in r.items() if k != "epoch"} for r in full["strategy"]["routes"]]
    assert [row["route"] for row in state["early_stopping"]["history"]] == routes[:2]
    resumed = metrics([*TOKEN_ROUTED, "resume=true"], out)
    assert strip_timing(resumed) == strip_timing(full)
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert model.exit_layers == (1,) and model.routing_thresholds == (0.7,)
    assert ckpt["train_state"]["completed"]
    routing = ["routing=confidence", "routing.exit_layer=1", "routing.threshold=0.7"]
    scored = metrics(["task=eval", f"checkpoint={out}", *routing], tmp_path / "eval")
    assert (scored["ppl"], scored["shallow_ratio"]) == (full["ppl"], full["shallow_ratio"])


def test_token_routed_resume_after_any_epoch_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = metrics(TOKEN_ROUTED, tmp_path / "full")
    assert full["epochs_run"] == 4 and full["history"][-1]["improved"] is False  # stopped early
    routes = [{k: v for k, v in r.items() if k != "epoch"} for r in full["strategy"]["routes"]]
    for kill in range(1, full["epochs_run"] + 1):
        out = tmp_path / f"killed_{kill}"
        with pytest.raises(Interrupted):
            run(compose([*TOKEN_ROUTED, *interrupt_after(kill)]), out)
        state = train_state(out)
        assert (state["strategy"], state["epoch"], state["completed"]) == ("token_routed", kill, False)
        assert [row["route"] for row in state["early_stopping"]["history"]] == routes[:kill]
        resumed = metrics([*TOKEN_ROUTED, "resume=true"], out)
        assert strip_timing(resumed) == strip_timing(full), f"killed after epoch {kill}"
        assert [r["epoch"] for r in resumed["strategy"]["routes"]] == [1, 2, 3, 4]
    # The resumed run's checkpoint is the routed model with its finished state; task=eval scores it.
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert model.exit_layers == (1,) and model.routing_thresholds == (0.7,)
    assert ckpt["train_state"]["completed"]
    routing = ["routing=confidence", "routing.exit_layer=1", "routing.threshold=0.7"]
    scored = metrics(["task=eval", f"checkpoint={out}", *routing], tmp_path / "eval")
    assert (scored["ppl"], scored["shallow_ratio"]) == (full["ppl"], full["shallow_ratio"])
    assert strip_timing(metrics([*TOKEN_ROUTED, "resume=true"], tmp_path / "full")) == strip_timing(full)
    # A token-routed run does not resume from another strategy's checkpoint.
    with pytest.raises(ValueError, match=r"^resume: .* was saved by a strategy=token_routed run, this run is "):
        run(compose([*ASHEM, "resume=true"]), tmp_path / "full")
