"""strategy=ashem and strategy=token_routed through train.py: records, checkpoints, bad input, sweeps."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, train_py

from ease.app.runner import run, validate
from ease.checkpoint import load_checkpoint
from ease.data import DataConfig, build_data
from ease.training import Trainer

SMALL_ASHEM = ["+preset=ashem", "data=synthetic", "model.dim=16", "model.num_heads=2", "progress=false"]
STANDARD_KEYS = (
    "ppl", "acc", "shallow_ratio", "compute_cost", "per_exit", "threshold_analysis", "history", "train_time_s",
    "tokens_per_s", "best_epoch", "epochs_run", "num_parameters", "layer_weights", "vocab_size",
)  # fmt: skip


def synthetic_val(record: dict):
    """The val batches a synthetic run used, rebuilt from its recorded config."""
    cfg = DataConfig(**record["config"]["data"])
    return build_data(cfg, seed=record["config"]["seed"]).val


def test_train_py_ashem_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = train_py(*SMALL_ASHEM, "train.max_epochs=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok"
    m = record["metrics"]
    for key in STANDARD_KEYS:
        assert key in m, key
    s = m["strategy"]
    # The default since issue 14: hard tokens from train, phase 2 early-stopped on val (out of sample).
    assert s["name"] == "ashem" and s["hard_examples_from"] == "train" and s["exit_layer"] == 2
    assert s["in_sample"] is False
    assert s["stages"] == [[1, 2], [3, 4]]
    assert abs(s["hard_ratio"] - 0.5) <= 0.02
    assert s["num_hard_tokens"] == round(s["hard_ratio"] * s["num_source_tokens"])
    assert 0 < s["threshold"] < 1
    assert s["frozen_params_unchanged"] is True
    assert s["phase1"]["metrics"]["ppl"] > 1 and s["phase1"]["epochs_run"] >= 1
    assert s["phase1"]["history"][0]["epoch"] == 1
    p2 = s["phase2"]
    assert p2["hard_ppl"] > 1 and p2["from_cached_hidden_states"] and not p2["in_sample"]
    assert 1 <= p2["epochs_run"] <= 2 and len(p2["history"]) == p2["epochs_run"]
    assert s["final"] == {k: m[k] for k in ("ppl", "acc", "shallow_ratio", "compute_cost")}
    # Frozen head: the val tokens that exit are exactly the non-hard ones.
    assert m["shallow_ratio"] == pytest.approx(1 - s["val_hard_ratio"])
    assert m["compute_cost"] == pytest.approx((2 * m["shallow_ratio"] + 4 * (1 - m["shallow_ratio"])) / 4)
    assert [row["phase"] for row in m["history"]] == [1] * s["phase1"]["epochs_run"] + [2] * p2["epochs_run"]
    assert any(row["threshold"] == pytest.approx(s["threshold"]) for row in m["threshold_analysis"])

    # The checkpoint is the routed 4-layer model: loading it and evaluating reproduces the record.
    model, ckpt = load_checkpoint(out / "checkpoint.pt")
    assert model.num_layers == 4 and model.exit_layers == (2,)
    assert model.routing_thresholds[0] == pytest.approx(s["threshold"])
    assert ckpt["strategy"]["name"] == "ashem"
    config = s["config"]
    from ease.strategies.ashem import ASHEMConfig

    trainer = Trainer(ASHEMConfig(**config).phase2_config(model.routing_threshold))
    again = trainer.evaluate(model, synthetic_val(record))
    assert again["ppl"] == pytest.approx(m["ppl"], rel=1e-5)
    assert again["shallow_ratio"] == pytest.approx(m["shallow_ratio"])


def test_token_routed_run_records_routes(tmp_path: Path) -> None:
    cfg = compose(["+preset=token_routed", *FAST, "train.max_epochs=2", "train.patience=3"])
    record = run(cfg, tmp_path)
    m = record["metrics"]
    for key in STANDARD_KEYS:
        assert key in m, key
    s = m["strategy"]
    assert s["name"] == "token_routed" and s["threshold"] == 0.7 and s["min_route_fraction"] == 0.05
    assert [r["epoch"] for r in s["routes"]] == [1, 2]
    for route in s["routes"]:
        assert route["exit_fraction"] >= 0.05 - 1e-9 and route["deep_fraction"] >= 0.05 - 1e-9
        assert route["exit_fraction"] + route["deep_fraction"] == pytest.approx(1.0)
    assert m["history"][0]["route"]["exit_fraction"] == s["routes"][0]["exit_fraction"]
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert model.exit_layers == (1,) and model.routing_thresholds == (0.7,)


# --- bad input: one line naming the key, before any data is read ---------------------------------------------

A, T = "+preset=ashem", "+preset=token_routed"
BAD = [
    (f"{A} strategy.hard_example_ratio=1.5", r"^strategy\.hard_example_ratio: must be in \(0, 1\), got 1\.5$"),
    (f"{A} strategy.hard_example_ratio=0", r"^strategy\.hard_example_ratio: must be in \(0, 1\)"),
    (f"{A} strategy.hard_example_ratio=1.0", r"^strategy\.hard_example_ratio: must be in \(0, 1\)"),
    (f"{A} strategy.phase2_layers=2", r"^strategy\.phase2_layers: must be > strategy\.phase1_layers \(2\)"),
    (f"{A} strategy.phase1_layers=4", r"^strategy\.phase2_layers: must be > strategy\.phase1_layers \(4\)"),
    (f"{A} strategy.phase1_layers=0", r"^strategy\.phase1_layers: must be an int >= 1, got 0$"),
    (f"{A} routing.exit_layer=5", r"^routing\.exit_layer: must be one layer in 1\.\.3 for a 4-layer model, got 5$"),
    (f"{A} routing.exit_layer=3", r"^routing\.exit_layer: ASHEM routes at the top of Block 1"),
    (f"{A} model.num_layers=6", r"^strategy\.phase2_layers: must equal model\.num_layers \(6\)"),
    (f"{A} strategy.hard_examples_from=test", r"^strategy\.hard_examples_from: must be one of val, train"),
    (f"{A} strategy.phase2_lr=0", r"^strategy\.phase2_lr: must be a finite number > 0, got 0"),
    (f"{A} loss_weights=uniform", r"^loss_weights\.kind: ASHEM trains each block on its last layer"),
    ("strategy=ashem", r"^strategy\.phase2_layers: must equal model\.num_layers \(3\)"),
    (f"{T} routing.exit_layer=3", r"^routing\.exit_layer: must be in 1\.\.2 for a 3-layer model, got 3$"),
    (f"{T} routing=none", r"^routing\.kind: token_routed routes tokens by confidence"),
    (f"{T} strategy.min_route_fraction=0.7", r"^strategy\.min_route_fraction: must be in \[0, 0\.5\]"),
    (f"{T} routing.exit_layer=[1,2] routing.threshold=[0.7,0.8]", r"^routing\.exit_layer: token_routed takes one"),
    (f"{T} routing.threshold=1.5", r"^routing\.threshold: must be in \[0, 1\]"),
    (f"{T} loss_weights=asymmetric", r"^loss_weights\.kind: token_routed scores each token"),
]


@pytest.mark.parametrize(("overrides", "pattern"), BAD, ids=[o for o, _ in BAD])
def test_bad_strategy_settings_fail_in_validate(overrides: str, pattern: str) -> None:
    cfg = compose(overrides.split())
    with pytest.raises(ValueError, match=pattern) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_presets_validate_and_tie_depth_and_exit_to_the_phases() -> None:
    cfg = compose(["+preset=ashem", "strategy.phase1_layers=3", "strategy.phase2_layers=6"])
    validate(cfg)
    assert cfg.model.num_layers == 6 and cfg.routing.exit_layer == 3


def test_bad_ratio_fails_before_reading_data(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    # data.data_dir points nowhere: if the data were read first, the error would be about the data.
    cfg = compose(["+preset=ashem", "strategy.hard_example_ratio=1.5", f"data.data_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match=r"^strategy\.hard_example_ratio: must be in \(0, 1\), got 1\.5$"):
        run(cfg, out)
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "failed" and not (out / "checkpoint.pt").exists()


@pytest.mark.slow  # in-process above; the one-line error of a subprocess: tests/test_bad_inputs.py
def test_train_py_bad_ratio_exits_with_one_line_before_reading_data(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    # data.data_dir points nowhere: if the data were read first, the error would be about the data.
    proc = train_py(
        "+preset=ashem",
        "strategy.hard_example_ratio=1.5",
        f"data.data_dir={tmp_path / 'nowhere'}",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode != 0
    assert "error: strategy.hard_example_ratio: must be in (0, 1), got 1.5" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "failed" and not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_multirun_over_hard_example_ratios(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = train_py(
        "-m", *SMALL_ASHEM, "train.max_epochs=1", "strategy.hard_example_ratio=0.3,0.5,0.7", f"hydra.sweep.dir={sweep}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(records) == 3
    by_ratio = {r["metrics"]["strategy"]["hard_example_ratio"]: r["metrics"]["strategy"] for r in records}
    assert sorted(by_ratio) == [0.3, 0.5, 0.7]
    for ratio, s in by_ratio.items():
        assert abs(s["hard_ratio"] - ratio) <= 0.02
    # A larger hard share means a higher threshold and fewer tokens exiting early.
    thresholds = [by_ratio[r]["threshold"] for r in (0.3, 0.5, 0.7)]
    assert thresholds == sorted(thresholds)


@pytest.mark.slow
def test_ashem_on_wikitext_reports_both_phases(tmp_path: Path, wikitext_dir: Path) -> None:
    out = tmp_path / "wt"
    proc = train_py(
        "+preset=ashem", f"data.data_dir={wikitext_dir}", "train.max_epochs=2", "progress=false", f"hydra.run.dir={out}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    s = m["strategy"]
    assert s["phase1"]["metrics"]["ppl"] > 1 and s["phase2"]["hard_ppl"] > 1
    assert abs(s["hard_ratio"] - 0.5) <= 0.02 and s["frozen_params_unchanged"]
    assert "test" in m and "test" in s["phase1"]
    assert torch.isfinite(torch.tensor(m["ppl"]))
