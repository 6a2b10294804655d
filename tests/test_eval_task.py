"""task=eval: a saved checkpoint scored under other routing settings, without training, through train.py."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, train_py

from ease.app.runner import run

# Tiny and fast; low thresholds, so that a barely trained model routes some tokens at L1.
SMALL = [*FAST, "data.synthetic_tokens=3000", "data.seq_len=16"]
CURVE = [0.02, 0.05, 0.1, 0.2]
TRAIN = [*SMALL, "+preset=asymmetric", "routing.threshold=0.05", f"routing.analysis_thresholds={CURVE}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny training run: its folder (with checkpoint.pt) and its metrics.json record."""
    out = tmp_path_factory.mktemp("train")
    record = run(compose(TRAIN), out)
    assert record["status"] == "ok"
    return out, record


def evaluate(run_dir: Path, out: Path, *overrides: str) -> dict:
    cfg = compose([*SMALL, "task=eval", f"checkpoint={run_dir}", "routing=confidence", *overrides])
    return run(cfg, out)


def test_eval_reproduces_the_training_runs_metrics(trained: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, train_record = trained
    record = evaluate(run_dir, tmp_path, "routing.threshold=0.05", f"routing.analysis_thresholds={CURVE}")
    got, want = record["metrics"], train_record["metrics"]
    assert record["task"] == "eval"
    for key in ("ppl", "acc", "shallow_ratio", "compute_cost", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert [r["threshold"] for r in got["threshold_analysis"]] == CURVE
    for g, w in zip(got["threshold_analysis"], want["threshold_analysis"]):
        assert g["ppl"] == pytest.approx(w["ppl"], rel=1e-6)
        assert g["compute_cost"] == pytest.approx(w["compute_cost"], rel=1e-6)
    # The routing must actually matter here, or the comparison above proves little.
    assert len({round(r["compute_cost"], 6) for r in got["threshold_analysis"]}) > 1


def test_other_threshold_equals_the_recorded_curve_and_records_no_training(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    run_dir, train_record = trained
    ckpt = run_dir / "checkpoint.pt"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    record = evaluate(run_dir, tmp_path, "routing.threshold=0.2")
    m = record["metrics"]
    row = next(r for r in train_record["metrics"]["threshold_analysis"] if r["threshold"] == 0.2)
    assert m["ppl"] == pytest.approx(row["ppl"], rel=1e-6)
    assert m["shallow_ratio"] == pytest.approx(row["shallow_ratio"], rel=1e-6)
    assert m["trained"] is False and m["epochs_run"] == 0 and "history" not in m
    assert m["checkpoint"] == str(ckpt.resolve())
    assert not (tmp_path / "checkpoint.pt").exists()
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before  # the checkpoint is only read


def test_cached_pass_gives_identical_metrics_and_follows_the_checkpoint(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    run_dir, _ = trained
    first = evaluate(run_dir, tmp_path / "a", "routing.threshold=0.1")["metrics"]
    second = evaluate(run_dir, tmp_path / "b", "routing.threshold=0.1")["metrics"]
    assert second["model_passes"] == 0 and second["cached_passes"] == 1
    assert second["ppl"] == first["ppl"] and second["threshold_analysis"] == first["threshold_analysis"]
    off = evaluate(run_dir, tmp_path / "c", "routing.threshold=0.1", "task.cache_stats=false")["metrics"]
    assert off["model_passes"] == 1 and off["ppl"] == pytest.approx(first["ppl"], rel=1e-9)

    # Rewritten weights must not be scored from the old pass.
    copy = tmp_path / "copy"
    copy.mkdir()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["model"]["output_head.weight"] = torch.zeros_like(ckpt["model"]["output_head.weight"])
    torch.save(ckpt, copy / "checkpoint.pt")
    zeroed = evaluate(copy, tmp_path / "d", "routing.threshold=0.1")["metrics"]
    assert zeroed["model_passes"] == 1
    assert zeroed["ppl"] == pytest.approx(ckpt["model_args"]["vocab_size"], rel=1e-4)  # uniform logits


def test_missing_checkpoint_fails_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^checkpoint: task=eval needs checkpoint="):
        run(compose([*SMALL, "task=eval"]), tmp_path / "none")
    record = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("checkpoint:")
    with pytest.raises(ValueError, match="checkpoint: file not found"):
        run(compose([*SMALL, "task=eval", f"checkpoint={tmp_path / 'nope.pt'}"]), tmp_path / "nope")


@pytest.mark.slow  # the in-process tests above cover the cache; tests/test_sweeps.py runs a representative sweep
def test_threshold_sweep_reuses_the_checkpoint(trained: tuple[Path, dict], tmp_path: Path) -> None:
    """`-m +sweep=threshold checkpoint=...`: K eval jobs, no training, one model pass in all."""
    run_dir, train_record = trained
    sweep = tmp_path / "sweep"
    thresholds = "0.02,0.05,0.1"
    args = ["-m", "+sweep=threshold", f"checkpoint={run_dir}", *SMALL]
    args += [f"routing.threshold={thresholds}", "task.cache_stats=true", f"hydra.sweep.dir={sweep}"]
    # Other tests may have cached passes of this checkpoint already; start from none.
    for cache in (run_dir / "eval_cache").glob("*.pt"):
        cache.unlink()
    proc = train_py(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert len(records) == 3
    for record in records:
        m = record["metrics"]
        assert record["task"] == "eval" and record["status"] == "ok"
        assert m["trained"] is False and m["epochs_run"] == 0 and m["train_time_s"] == 0.0
        row = next(r for r in train_record["metrics"]["threshold_analysis"] if r["threshold"] == m_threshold(record))
        assert m["ppl"] == pytest.approx(row["ppl"], rel=1e-6)
    assert sum(r["metrics"]["model_passes"] for r in records) == 1  # K thresholds, one pass over the data
    assert not list(sweep.glob("*/checkpoint.pt"))
    table = (sweep / "results.md").read_text()
    assert "| Threshold" in table and (sweep / "results.csv").is_file()


def m_threshold(record: dict) -> float:
    return float(record["config"]["routing"]["threshold"])
