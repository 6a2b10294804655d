"""Routed evaluation against a per-token hand computation: single exit, cascade, threshold table, cost."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import between, peaky_model
from torch.testing import assert_close

from ease import EarlyExitTransformer, Trainer, TrainingConfig, collect_token_stats, compute_cost, threshold_rows
from ease.routing import max_prob, neg_entropy, route_by_confidence, route_from_confidences, top2_margin

V = 50
METRICS = ("ppl", "acc", "shallow_ratio", "compute_cost")


def make_model(num_layers: int = 3) -> EarlyExitTransformer:
    model = peaky_model(V, 16, num_layers, 2)  # peaky, varied confidences (an untrained head is near-uniform)
    with torch.no_grad():
        for block in model.layers:  # blocks that change the residual stream, so the exits disagree
            block.attn.proj.weight.mul_(10.0)
            block.ffn.w2.weight.mul_(10.0)
    return model


def make_batches(n: int = 3, batch: int = 4, seq: int = 12, seed: int = 0, model=None) -> list:
    """Random inputs. With a model, targets cycle over "what layer 1 predicts", ..., "what layer L predicts",
    "random", so a token's correctness depends on where it exits (random targets are almost never hit)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (batch, seq + 1), generator=g)
        x, y = x[:, :-1], x[:, 1:].clone()
        if model is not None:
            with torch.no_grad():
                preds = [logits.argmax(-1) for logits in model.forward_all_layers(x)]  # (B, T) each
            choice = torch.randint(0, model.num_layers + 1, y.shape, generator=g)
            for layer, pred in enumerate(preds):
                y = torch.where(choice == layer, pred, y)
        out.append((x, y))
    return out


def layer_outputs(model, batches) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's logits over every token, (N, V) each, and the targets (N,), from forward_all_layers."""
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(model.num_layers)]
    targets = []
    with torch.no_grad():
        for x, y in batches:
            for i, logits in enumerate(model.forward_all_layers(x)):
                per_layer[i].append(logits.reshape(-1, V))
            targets.append(y.reshape(-1))
    return [torch.cat(chunks) for chunks in per_layer], torch.cat(targets)


def confidences(model, batches, layer: int) -> torch.Tensor:
    logits, _ = layer_outputs(model, batches)
    return F.softmax(logits[layer - 1], dim=-1).max(dim=-1).values


def manual_routed(model, batches, exits, thresholds) -> dict:
    """Per token: the first exit whose max-softmax confidence >= its (positive) threshold, else the last layer."""
    logits, targets = layer_outputs(model, batches)
    L = model.num_layers
    nll_sum, correct, exit_sum, shallow = 0.0, 0, 0, 0
    for n in range(targets.numel()):
        layer = L
        for e, t in zip(exits, thresholds):
            if t > 0 and F.softmax(logits[e - 1][n], -1).max().item() >= t:
                layer = e
                break
        row = logits[layer - 1][n]
        nll_sum += F.cross_entropy(row[None], targets[n : n + 1]).item()
        correct += int(row.argmax().item() == targets[n].item())
        exit_sum += layer
        shallow += layer < L
    N = targets.numel()
    return {
        "ppl": math.exp(nll_sum / N),
        "acc": correct / N,
        "shallow_ratio": shallow / N,
        "compute_cost": exit_sum / N / L,
        "loss": nll_sum / N,
    }


def assert_metrics(got: dict, want: dict) -> None:
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), key


def trainer_for(exit_layer=1, threshold=0.0, weights=None) -> Trainer:
    return Trainer(
        TrainingConfig(layer_weights=weights or {1: 0.5, 3: 0.5}, exit_layer=exit_layer, routing_threshold=threshold)
    )


@pytest.fixture(scope="module")
def model() -> EarlyExitTransformer:
    return make_model()


@pytest.fixture(scope="module")
def batches(model) -> list:
    return make_batches(model=model)


# --- single exit --------------------------------------------------------------------------------------------


def test_threshold_zero_means_no_exit(model, batches):
    stats = trainer_for(threshold=0.0).evaluate(model, batches)
    assert stats["shallow_ratio"] == 0.0
    assert stats["compute_cost"] == 1.0
    logits, targets = layer_outputs(model, batches)
    ce = F.cross_entropy(logits[-1], targets).item()
    assert stats["ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert stats["acc"] == pytest.approx((logits[-1].argmax(-1) == targets).double().mean().item())
    assert_metrics(stats, manual_routed(model, batches, [1], [0.0]))


def test_threshold_above_every_confidence_gives_no_exits(model, batches):
    conf = confidences(model, batches, 1)
    top = conf.max().item()
    assert top < 1.0
    threshold = min(1.0, top + (1.0 - top) / 2)
    stats = trainer_for().evaluate(model, batches, routing_threshold=threshold)
    assert stats["shallow_ratio"] == 0.0
    assert stats["compute_cost"] == 1.0
    assert_metrics(stats, trainer_for().evaluate(model, batches, routing_threshold=0.0))


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_tiny_threshold_lets_every_token_exit(model, batches, exit_layer):
    stats = trainer_for(exit_layer=exit_layer).evaluate(model, batches, routing_threshold=1e-9)
    assert stats["shallow_ratio"] == 1.0
    assert stats["compute_cost"] == pytest.approx(exit_layer / 3)
    logits, targets = layer_outputs(model, batches)
    ce = F.cross_entropy(logits[exit_layer - 1], targets).item()
    assert stats["ppl"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert stats["acc"] == pytest.approx((logits[exit_layer - 1].argmax(-1) == targets).double().mean().item())
    # Where a token exits changes whether it is right, for many tokens.
    flips = (logits[exit_layer - 1].argmax(-1) == targets) != (logits[-1].argmax(-1) == targets)
    assert flips.sum() > 10


@pytest.mark.parametrize("quantile", [0.25, 0.5, 0.8])
def test_mid_threshold_matches_manual_routing(model, batches, quantile):
    conf = confidences(model, batches, 1)
    t = between(conf, quantile)
    stats = trainer_for(threshold=t).evaluate(model, batches)
    want = manual_routed(model, batches, [1], [t])
    assert_metrics(stats, want)
    assert stats["routed_loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert 0.0 < stats["shallow_ratio"] < 1.0
    assert stats["shallow_ratio"] == pytest.approx((conf >= t).double().mean().item())
    # One exit at layer 1 of 3: compute = (s * 1 + (1 - s) * 3) / 3.
    assert stats["compute_cost"] == pytest.approx(1 - 2 / 3 * stats["shallow_ratio"])
    assert sum(stats["exit_fractions"].values()) == pytest.approx(1.0)
    assert stats["exit_fractions"][1] == pytest.approx(stats["shallow_ratio"])


def test_exit_layer_two_mid_threshold(model, batches):
    t = between(confidences(model, batches, 2), 0.5)
    stats = trainer_for(exit_layer=2, threshold=t).evaluate(model, batches)
    assert_metrics(stats, manual_routed(model, batches, [2], [t]))
    assert stats["compute_cost"] == pytest.approx(1 - 1 / 3 * stats["shallow_ratio"])


def test_other_confidence_measures_route_by_their_own_score(model, batches):
    logits, _ = layer_outputs(model, batches)
    margin = top2_margin(logits[0])
    t = between(margin, 0.5)
    config = TrainingConfig(layer_weights={3: 1.0}, exit_layer=1, routing_threshold=t, confidence="top2_margin")
    stats = Trainer(config).evaluate(model, batches)
    assert stats["shallow_ratio"] == pytest.approx((margin >= t).double().mean().item())
    assert 0.0 < stats["shallow_ratio"] < 1.0


def test_evaluate_reports_per_exit_and_the_training_objective(model, batches):
    trainer = trainer_for(threshold=0.5, weights={1: 0.7, 2: 0.0, 3: 0.3})
    stats = trainer.evaluate(model, batches)
    logits, targets = layer_outputs(model, batches)
    ce = [F.cross_entropy(lg, targets).item() for lg in logits]
    assert sorted(stats["per_exit"]) == [1, 3]  # the exit and the weighted layers; layer 2 has weight 0
    for layer in (1, 3):
        assert stats["per_exit"][layer]["loss"] == pytest.approx(ce[layer - 1], rel=1e-5)
        assert stats["per_exit"][layer]["ppl"] == pytest.approx(math.exp(ce[layer - 1]), rel=1e-5)
        acc = (logits[layer - 1].argmax(-1) == targets).double().mean().item()
        assert stats["per_exit"][layer]["acc"] == pytest.approx(acc)
    assert stats["loss"] == pytest.approx(0.7 * ce[0] + 0.3 * ce[2], rel=1e-5)
    assert stats["num_tokens"] == targets.numel()


@pytest.mark.parametrize(
    ("weights", "exit_layer", "threshold", "heads"),
    [
        ({4: 1.0}, 1, 0.5, [1, 4]),
        ({4: 1.0}, 2, 0.0, [2, 4]),
        ({1: 0.3, 3: 0.0, 4: 0.7}, 2, 0.5, [1, 2, 4]),
    ],
)
def test_evaluate_runs_heads_only_where_needed(weights, exit_layer, threshold, heads):
    """One pass per batch; the head runs at the routing exits, the weighted layers and the last layer only."""
    model = make_model(num_layers=4)
    batches = make_batches(2)
    seen: list[int] = []
    blocks = Counter()
    hooks = [model.output_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))]
    hooks += [b.register_forward_hook(lambda *a, n=n: blocks.update([n])) for n, b in enumerate(model.layers, 1)]
    config = TrainingConfig(layer_weights=weights, exit_layer=exit_layer, routing_threshold=threshold)
    Trainer(config).evaluate(model, batches)
    for h in hooks:
        h.remove()
    assert len(seen) == len(heads) * len(batches)  # one head call per computed layer and batch
    assert dict(blocks) == dict.fromkeys(range(1, 5), len(batches))


def test_evaluate_restores_training_mode_and_uses_no_grad():
    model = make_model()
    model.train()
    trainer_for().evaluate(model, make_batches(1))
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_rejects_empty_batches(model):
    with pytest.raises(ValueError, match="empty"):
        trainer_for().evaluate(model, [])


# --- cascade ------------------------------------------------------------------------------------------------


def test_cascade_matches_hand_computation():
    model = make_model(num_layers=4)
    batches = make_batches(model=model)
    c1, c2 = confidences(model, batches, 1), confidences(model, batches, 2)
    t1, t2 = between(c1, 0.7), between(c2, 0.4)
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 4: 0.5}, exit_layer=[1, 2], routing_threshold=[t1, t2]))
    stats = trainer.evaluate(model, batches)
    want = manual_routed(model, batches, [1, 2], [t1, t2])
    assert_metrics(stats, want)
    # All three routes are taken, so the test tells the layers apart.
    exit_at = torch.where(c1 >= t1, 1, torch.where(c2 >= t2, 2, 4))
    counts = Counter(exit_at.tolist())
    assert all(counts[layer] > 0 for layer in (1, 2, 4))
    assert stats["exit_fractions"] == pytest.approx({k: counts[k] / exit_at.numel() for k in (1, 2, 4)})
    assert stats["compute_cost"] == pytest.approx((counts[1] * 1 + counts[2] * 2 + counts[4] * 4) / exit_at.numel() / 4)
    # The same cascade given to evaluate directly, in either order.
    again = trainer_for(weights={4: 1.0}).evaluate(model, batches, exit_layer=[2, 1], routing_threshold=[t2, t1])
    assert_metrics(again, want)


def test_cascade_with_one_inactive_exit_equals_single_exit():
    model = make_model(num_layers=4)
    batches = make_batches(model=model)
    t2 = between(confidences(model, batches, 2), 0.5)
    trainer = Trainer(TrainingConfig(layer_weights={4: 1.0}, exit_layer=[1, 2], routing_threshold=[0.0, t2]))
    assert_metrics(trainer.evaluate(model, batches), manual_routed(model, batches, [2], [t2]))


# --- threshold analysis -------------------------------------------------------------------------------------


def test_threshold_rows_equal_separate_evaluations(model, batches):
    trainer = trainer_for(threshold=0.9)
    conf = confidences(model, batches, 1)
    thresholds = [0.0, 1e-9, between(conf, 0.3), between(conf, 0.5), 0.99, 1.0]
    rows = trainer.threshold_analysis(model, batches, thresholds)
    from_eval = trainer.evaluate(model, batches, thresholds=thresholds)["threshold_analysis"]
    assert len(rows) == len(from_eval) == len(thresholds)
    for t, row, row2 in zip(thresholds, rows, from_eval):
        single = trainer.evaluate(model, batches, routing_threshold=t)
        assert row["threshold"] == pytest.approx(t)
        assert_metrics(row, single)
        assert_metrics(row2, single)
        assert_metrics(row, manual_routed(model, batches, [1], [t]))
    shallow = [row["shallow_ratio"] for row in rows[1:]]
    assert shallow == sorted(shallow, reverse=True)  # higher thresholds let fewer tokens exit
    assert shallow[0] == 1.0


def test_threshold_analysis_for_a_cascade():
    model4 = make_model(num_layers=4)
    batches = make_batches(model=model4)
    c1, c2 = confidences(model4, batches, 1), confidences(model4, batches, 2)
    pairs = [[between(c1, q), between(c2, q)] for q in (0.3, 0.6, 0.9)]
    trainer = Trainer(TrainingConfig(layer_weights={4: 1.0}, exit_layer=[1, 2], routing_threshold=0.5))
    rows = trainer.threshold_analysis(model4, batches, pairs)
    for pair, row in zip(pairs, rows):
        assert row["threshold"] == pytest.approx(pair)
        assert_metrics(row, manual_routed(model4, batches, [1, 2], pair))


def test_threshold_analysis_pairs_thresholds_with_exits_in_the_given_order():
    """exit_layer=[2, 1] with a pair [t2, t1] means t2 at layer 2 and t1 at layer 1, as in evaluate."""
    model4 = make_model(num_layers=4)
    batches = make_batches(model=model4)
    t1, t2 = between(confidences(model4, batches, 1), 0.7), between(confidences(model4, batches, 2), 0.4)
    trainer = Trainer(TrainingConfig(layer_weights={4: 1.0}, exit_layer=1, routing_threshold=0.5))
    (row,) = trainer.threshold_analysis(model4, batches, [[t2, t1]], exit_layer=[2, 1])
    want = manual_routed(model4, batches, [1, 2], [t1, t2])
    assert_metrics(row, want)
    assert_metrics(trainer.evaluate(model4, batches, exit_layer=[2, 1], routing_threshold=[t2, t1]), want)
    assert row["threshold"] == pytest.approx([t1, t2])  # reported in layer order


@pytest.mark.parametrize("k", [1, 7])
def test_threshold_analysis_runs_the_model_once(model, batches, k):
    calls = Counter()
    handle = model.layers[0].register_forward_hook(lambda *args: calls.update(["layer1"]))
    trainer_for().threshold_analysis(model, batches, [i / k for i in range(k)])
    assert calls["layer1"] == len(batches)
    calls.clear()
    trainer_for().evaluate(model, batches, thresholds=[i / k for i in range(k)])
    assert calls["layer1"] == len(batches)
    handle.remove()


def test_collect_token_stats_and_threshold_rows_directly(model, batches):
    stats = collect_token_stats(model, batches, exit_layers=[1])
    assert stats.num_tokens == 3 * 4 * 12
    assert sorted(stats.nll) == [1, 3]
    conf = confidences(model, batches, 1)
    assert_close(stats.confidence[1], conf)
    t = between(conf, 0.5)
    (row,) = threshold_rows(stats, [1], [t])
    assert_metrics(row, manual_routed(model, batches, [1], [t]))


# --- routing primitives and compute_cost ---------------------------------------------------------------------


# Seed 003's tables: shallow% at exit 1 of 3 and the compute% reported beside it.
SEED_003_ROWS = [
    (72.0, 52.0),
    (52.3, 65.2),
    (52.4, 65.0),
    (94.4, 37.0),
    (87.8, 41.4),
    (84.5, 43.6),
    (73.4, 51.1),
    (59.7, 60.2),
    (86.3, 42.5),
    (91.0, 39.4),
    (87.5, 41.7),
    (79.0, 47.4),
    (68.9, 54.0),
]


@pytest.mark.parametrize(("shallow_pct", "compute_pct"), SEED_003_ROWS)
def test_compute_cost_reproduces_seed_003(shallow_pct, compute_pct):
    n_shallow = round(shallow_pct * 10)
    exit_at = torch.tensor([1] * n_shallow + [3] * (1000 - n_shallow))
    cost = compute_cost(exit_at, 3)
    assert cost == pytest.approx((n_shallow * 1 + (1000 - n_shallow) * 3) / 3000)
    # The seed rounds both columns to 0.1%.
    assert abs(100 * cost - compute_pct) < 0.1


def test_compute_cost_seed_003_headline():
    exit_at = torch.tensor([1] * 524 + [3] * 476).reshape(20, 50)
    assert compute_cost(exit_at, 3) == pytest.approx(0.6507, abs=1e-4)
    assert round(100 * compute_cost(exit_at, 3)) == 65


def test_compute_cost_general():
    exit_at = torch.tensor([[1, 2, 4, 4], [4, 4, 4, 4]])
    assert compute_cost(exit_at, 4) == pytest.approx((1 + 2 + 4 * 6) / 8 / 4)
    assert compute_cost(torch.full((5,), 3), 3) == 1.0


def test_route_from_confidences_prefers_the_first_exit():
    conf = {1: torch.tensor([0.9, 0.2, 0.2, 0.95]), 2: torch.tensor([0.1, 0.8, 0.3, 0.99])}
    out = route_from_confidences(conf, {1: 0.9, 2: 0.8}, 4)
    assert out.tolist() == [1, 2, 4, 1]
    assert route_from_confidences(conf, {1: 0.0, 2: 0.0}, 4).tolist() == [4, 4, 4, 4]
    assert route_from_confidences(conf, {1: 0.0, 2: 0.3}, 4).tolist() == [4, 2, 2, 2]


def test_confidence_measures():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = F.softmax(logits, -1)
    assert_close(max_prob(logits), p.max(-1).values)
    top = p.sort(-1, descending=True).values
    assert_close(top2_margin(logits), top[:, 0] - top[:, 1])
    entropy = -(p * p.log()).sum(-1)
    assert_close(neg_entropy(logits), 1 - entropy / math.log(4))
    assert neg_entropy(logits)[1].item() == pytest.approx(0.0, abs=1e-6)  # uniform
    assert neg_entropy(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(1.0, abs=1e-6)  # one-hot


def test_route_by_confidence_on_logits():
    logits = {1: torch.tensor([[[5.0, 0.0], [0.0, 0.1]]])}  # max prob ≈ 0.993 and ≈ 0.525
    out = route_by_confidence(logits, {1: 0.9}, 3)
    assert out.tolist() == [[1, 3]]
    with pytest.raises(ValueError, match="confidence"):
        route_by_confidence(logits, {1: 0.9}, 3, confidence="nope")
