"""ASHEM out of sample by default (issue 14, item 6): hard tokens mined from the TRAIN split, phase 2
early-stopped on the validation tokens below the same threshold, held-out test metrics in the record; the
seed's `hard_examples_from=val` stays an option that says it is in-sample."""

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import WIKITEXT_DIR, compose

from ease.app import build
from ease.app.runner import run
from ease.checkpoint import load_checkpoint
from ease.data import build_data
from ease.strategies import StrategyConfig
from ease.strategies.ashem import ASHEMConfig
from ease.training import Trainer

# A real corpus (WikiText-2 valid text for train/val, its test file held out), small enough for seconds.
WIKI = [
    "+preset=ashem", f"data.data_dir={WIKITEXT_DIR}", "data.max_chars=30000", "data.vocab_size=300",
    "data.seq_len=32", "model.dim=16", "model.num_heads=2", "train.max_epochs=2", "train.batch_size=16",
    "strategy.phase1_lr=1e-2", "strategy.phase2_lr=1e-2", "progress=false",
]  # fmt: skip


def test_default_is_train_everywhere() -> None:
    assert ASHEMConfig().hard_examples_from == "train"
    assert StrategyConfig().hard_examples_from == "train"
    assert compose(["+preset=ashem"]).strategy.hard_examples_from == "train"
    assert compose(["+sweep=hard_ratio"], hydra_config=True).strategy.hard_examples_from == "train"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    if not (WIKITEXT_DIR / "wiki.test.tokens").is_file():
        pytest.skip("WikiText-2 (with its test file) not found")
    out = {}
    for mode, extra in (("default", []), ("val", ["strategy.hard_examples_from=val"])):
        folder = tmp_path_factory.mktemp(mode)
        record = run(compose([*WIKI, *extra]), folder)
        assert record["status"] == "ok"
        out[mode] = (record["metrics"], folder)
    return out


def test_default_mines_train_and_reports_held_out_test(runs) -> None:
    m, folder = runs["default"]
    s = m["strategy"]
    data = build_data(build.data_config(compose(WIKI)), seed=0)
    # Phase 2 trained on hard TRAIN tokens; the validation tokens below the same threshold stopped it.
    assert s["hard_examples_from"] == "train" and s["in_sample"] is False and s["phase2"]["in_sample"] is False
    assert s["num_source_tokens"] == data.train.num_tokens != data.val.num_tokens
    assert s["val_hard_ratio"] == pytest.approx(1 - m["shallow_ratio"])  # val tokens at the same threshold
    # The held-out test metrics are the routed model's on the test file, recomputed here from the checkpoint.
    model, _ = load_checkpoint(folder / "checkpoint.pt")
    trainer = Trainer(ASHEMConfig().phase2_config(s["threshold"]), device="cpu")
    test = trainer.evaluate(model, data.test)
    assert data.test.num_tokens > 0 and m["test"]["ppl"] == pytest.approx(test["ppl"], rel=1e-6)
    assert s["final"]["test"] == {k: m["test"][k] for k in ("ppl", "acc", "shallow_ratio", "compute_cost")}
    assert s["phase1"]["test"]["ppl"] > 1  # Block 1 alone, on the same held-out tokens


def test_val_mode_is_kept_and_says_in_sample(runs) -> None:
    m, folder = runs["val"]
    s = m["strategy"]
    assert s["hard_examples_from"] == "val" and s["in_sample"] is True and s["phase2"]["in_sample"] is True
    assert s["num_source_tokens"] == m["num_tokens"]  # the validation tokens: the seed's recipe
    assert json.loads((folder / "metrics.json").read_text())["metrics"]["strategy"]["in_sample"] is True
    assert "test" in m and s["final"]["test"]["ppl"] > 1
    # Both modes share phase 1 (same seed and data): only the source of the hard tokens differs.
    d = runs["default"][0]["strategy"]
    assert s["phase1"]["metrics"]["ppl"] == d["phase1"]["metrics"]["ppl"]
    assert s["threshold"] != d["threshold"]


def test_val_mode_logs_its_warning(caplog: pytest.LogCaptureFixture) -> None:
    from conftest import random_batches

    from ease.model import EarlyExitTransformer
    from ease.strategies.ashem import run_ashem

    torch.manual_seed(0)
    model = EarlyExitTransformer(20, 16, 2, num_heads=2)
    batches = random_batches(20, n=2, batch=4, seq=8)
    caplog.set_level(logging.WARNING, logger="ease")
    run_ashem(ASHEMConfig(max_epochs=1, hard_examples_from="val"), model, batches, batches, verbose=False)
    assert "in-sample" in caplog.text
