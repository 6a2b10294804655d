"""Routed evaluation that skips compute: equal to the counted mode where it must be, and what it saves."""

import pytest
import torch
from conftest import between, peaky_model, random_batches
from torch.testing import assert_close

from ease import EarlyExitTransformer, Trainer, TrainingConfig
from ease.inference.fused import FusedDecoder as EarlyExitDecoder
from ease.inference.routed_eval import evaluate_routed, skip_routed_forward
from ease.routing import max_prob

V, D, L, H = 24, 32, 4, 4
KEYS = ("ppl", "acc", "shallow_ratio", "compute_cost")


@pytest.fixture
def model() -> EarlyExitTransformer:
    return peaky_model(V, D, L, H)


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return random_batches(V, 3, 4, 16, seed=1)


def median_threshold(model: EarlyExitTransformer, batches, layer: int, q: float = 0.5) -> float:
    with torch.no_grad():
        conf = torch.cat([max_prob(model(x, [layer])[layer]).flatten() for x, _ in batches])
    return between(conf, q, gap=1e-4)


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
@pytest.mark.parametrize("setting", ["no_exit", "all_exit"])
def test_identical_to_counted_where_equal_by_construction(model, batches, kv_mode, setting) -> None:
    """No token stops (threshold 0), or every token stops at the first exit: the same layers on the same
    inputs, so the metrics are identical, not just close."""
    threshold = 0.0 if setting == "no_exit" else 1e-9
    counted = evaluate_routed(model, batches, "counted", exit_layer=[1, 2], routing_threshold=threshold)
    skipped = evaluate_routed(model, batches, "skip", kv_mode, exit_layer=[1, 2], routing_threshold=threshold)
    for key in (*KEYS, "loss", "exit_fractions"):
        assert skipped[key] == counted[key], key
    assert counted["shallow_ratio"] == (0.0 if setting == "no_exit" else 1.0)
    assert skipped["layer_fraction"] == (1.0 if setting == "no_exit" else 0.25)


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
def test_single_exit_decisions_and_early_tokens_identical(model, batches, kv_mode) -> None:
    """With one routing exit, the decisions and the logits of every token that stops there are identical."""
    threshold = median_threshold(model, batches, 1)
    for x, _ in batches:
        counted = model.routed_forward(x, 1, threshold)
        skipped = skip_routed_forward(model, x, 1, threshold, kv_mode)
        assert torch.equal(skipped.exit_layer, counted.exit_layer)
        early = counted.exit_layer == 1
        assert early.any() and (~early).any()
        assert torch.equal(skipped.logits[early], counted.logits[early])
    c = evaluate_routed(model, batches, "counted", exit_layer=1, routing_threshold=threshold)
    s = evaluate_routed(model, batches, "skip", kv_mode, exit_layer=1, routing_threshold=threshold)
    assert s["shallow_ratio"] == c["shallow_ratio"] and s["compute_cost"] == c["compute_cost"]


def test_recompute_equals_counted_for_any_thresholds(model, batches) -> None:
    exits = [1, 2]
    thresholds = [median_threshold(model, batches, 1, 0.6), median_threshold(model, batches, 2, 0.5)]
    counted = evaluate_routed(model, batches, "counted", exit_layer=exits, routing_threshold=thresholds)
    exact = evaluate_routed(model, batches, "skip", "recompute", exit_layer=exits, routing_threshold=thresholds)
    assert 0 < counted["exit_fractions"][1] < 1 and counted["exit_fractions"].get(2, 0) > 0
    for key in KEYS:
        assert exact[key] == pytest.approx(counted[key], rel=1e-6), key
    for x, _ in batches:
        out = skip_routed_forward(model, x, exits, thresholds, "recompute")
        ref = model.routed_forward(x, exits, thresholds)
        assert torch.equal(out.exit_layer, ref.exit_layer)
        assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_propagation_changes_deep_tokens_only(model, batches) -> None:
    """The KV trade-off in full-sequence form: tokens that go deep after an earlier token stopped see
    propagated K/V and get different logits; so ppl differs from the counted mode."""
    threshold = median_threshold(model, batches, 1)
    x = batches[0][0]
    counted = model.routed_forward(x, 1, threshold)
    skipped = skip_routed_forward(model, x, 1, threshold, "propagate")
    deep = counted.exit_layer == L
    stopped_before = (counted.exit_layer < L).int().cumsum(1) > 0  # some earlier (or this) token stopped
    after_stop = deep & torch.roll(stopped_before, 1, dims=1) & (torch.arange(x.shape[1]) > 0)
    assert after_stop.any()
    assert not torch.allclose(skipped.logits[after_stop], counted.logits[after_stop], atol=1e-4)
    c = evaluate_routed(model, batches, "counted", exit_layer=1, routing_threshold=threshold)
    s = evaluate_routed(model, batches, "skip", "propagate", exit_layer=1, routing_threshold=threshold)
    assert s["ppl"] != c["ppl"]


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
def test_full_sequence_skip_equals_the_incremental_decoder(model, batches, kv_mode) -> None:
    """Two independent implementations of the same routing: the whole sequence at once with real skipping,
    and the KV-cached decoder fed the same tokens one by one from position 0."""
    exits = [1, 2]
    thresholds = [median_threshold(model, batches, 1, 0.6), median_threshold(model, batches, 2, 0.5)]
    x = batches[1][0]
    out = skip_routed_forward(model, x, exits, thresholds, kv_mode)
    dec = EarlyExitDecoder(model, x.shape[0], x.shape[1], exits, thresholds, kv_mode)
    for t in range(x.shape[1]):
        step = dec.step(x[:, t])
        assert step.exit_layer.tolist() == out.exit_layer[:, t].tolist()
        assert_close(step.logits, out.logits[:, t], rtol=1e-4, atol=1e-4)


def test_counted_mode_matches_the_trainers_evaluation(model, batches) -> None:
    threshold = median_threshold(model, batches, 1)
    trainer = Trainer(TrainingConfig(layer_weights={L: 1.0}, exit_layer=1, routing_threshold=threshold))
    reference = trainer.evaluate(model, batches)
    counted = evaluate_routed(model, batches, "counted", exit_layer=1, routing_threshold=threshold)
    for key in KEYS:
        assert counted[key] == pytest.approx(reference[key], rel=1e-9), key


def test_accounting_of_what_was_computed(model, batches) -> None:
    threshold = median_threshold(model, batches, 1)
    prop = evaluate_routed(model, batches, "skip", "propagate", exit_layer=1, routing_threshold=threshold)
    exact = evaluate_routed(model, batches, "skip", "recompute", exit_layer=1, routing_threshold=threshold)
    counted = evaluate_routed(model, batches, "counted", exit_layer=1, routing_threshold=threshold)
    # propagate: each token runs exactly its exit's layers, and gets K/V only in the rest
    assert prop["layer_fraction"] == pytest.approx(prop["compute_cost"])
    assert prop["kv_fraction"] == pytest.approx(1 - prop["compute_cost"])
    # recompute runs every layer a later token needs; counted runs everything
    assert prop["layer_fraction"] <= exact["layer_fraction"] <= 1.0 and exact["kv_fraction"] == 0
    assert counted["layer_fraction"] == 1.0
    # heads: counted scores every token at the exit and at the last layer; skip only the tokens still going
    assert counted["heads_per_token"] == 2.0
    assert prop["heads_per_token"] == pytest.approx(2.0 - prop["shallow_ratio"])
    for result in (prop, exact, counted):
        assert result["time_s"] > 0 and result["tokens"] == 3 * 4 * 16


def test_bad_arguments(model, batches) -> None:
    with pytest.raises(ValueError, match="mode"):
        evaluate_routed(model, batches, "lazy")
    with pytest.raises(ValueError, match="kv_mode"):
        evaluate_routed(model, batches, "skip", "lazy")
    with pytest.raises(ValueError, match="empty"):
        evaluate_routed(model, [], "skip")
