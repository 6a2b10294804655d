"""ASHEM (seed 002): threshold quantile, hard-example cache, frozen block, phase 2 from cache, two-stage routing."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batches as conftest_batches
from torch.testing import assert_close

from ease import EarlyExitTransformer, StageConfig, TrainingConfig
from ease.data import DataConfig, build_data
from ease.strategies.ashem import (
    ASHEMConfig,
    HardExampleBatches,
    cache_exit_states,
    collect_hard_examples,
    compute_confidence,
    compute_confidence_threshold,
    confidence_quantile,
    create_hard_example_loader,
    evaluate_on_hard_examples,
    evaluate_routed_from_cache,
    freeze_lower_layers,
    params_unchanged,
    run_ashem,
    train_upper_layers,
)

V = 32


def grow(model, num_layers: int, exit_layer: int | None = None, routing_threshold: float = 0.0):
    """ASHEM's growth: the protocol's deeper copy, routed at `exit_layer` (default: the old top)."""
    big = model.extended(num_layers)
    big.set_routing(exit_layer or model.num_layers, routing_threshold)
    return big


def tiny_data(source_seed: int = 0):
    cfg = DataConfig(name="synthetic", synthetic_tokens=4000, synthetic_vocab_size=V, seq_len=16, batch_size=16)
    return build_data(cfg, seed=source_seed)


def make_model(num_layers: int, seed: int = 0, **kwargs) -> EarlyExitTransformer:
    torch.manual_seed(seed)
    return EarlyExitTransformer(V, 16, num_layers, num_heads=2, **kwargs)


def random_batches(n: int = 3, batch: int = 4, seq: int = 12, seed: int = 0) -> list:
    return conftest_batches(V, n, batch, seq, seed)


def manual_confidences(model: EarlyExitTransformer, batches: list, layer: int) -> torch.Tensor:
    """Max softmax at `layer` for every token, by the plain forward pass."""
    model.eval()
    with torch.no_grad():
        return torch.cat([F.softmax(model(x, [layer])[layer], -1).amax(-1).reshape(-1) for x, _ in batches])


@pytest.fixture(scope="module")
def ashem_run():
    """One small end-to-end ASHEM run shared by the flow tests: the seed's recipe (hard tokens from val, no
    longer the default), which these tests check against the seed's functions on the validation batches."""
    data = tiny_data()
    phase1 = make_model(2)
    config = ASHEMConfig(max_epochs=2, phase2_lr=3e-3, phase2_patience=2, hard_examples_from="val")
    result = run_ashem(config, phase1, data.train, data.val, batch_size=8, verbose=False)
    return config, data, result


# --- config and bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"hard_example_ratio": 0.0}, "hard_example_ratio"),
        ({"hard_example_ratio": 1.0}, "hard_example_ratio"),
        ({"hard_example_ratio": 1.5}, "hard_example_ratio"),
        ({"hard_example_ratio": -0.2}, "hard_example_ratio"),
        ({"phase2_layers": 2}, "phase2_layers"),
        ({"phase1_layers": 3, "phase2_layers": 2}, "phase2_layers"),
        ({"phase1_layers": 0}, "phase1_layers"),
        ({"phase1_lr": 0.0}, "phase1_lr"),
        ({"phase2_lr": float("nan")}, "phase2_lr"),
        ({"phase2_patience": 0}, "phase2_patience"),
        ({"hard_examples_from": "test"}, "hard_examples_from"),
        ({"confidence": "entropy"}, "confidence"),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"^{key}: ") as err:
        ASHEMConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_stages_are_the_two_lego_blocks() -> None:
    config = ASHEMConfig(phase1_layers=2, phase2_layers=5)
    assert [s.layers for s in config.stages] == [(1, 2), (3, 5)]
    assert config.phase1_config().weights_for(2) == {1: 0.0, 2: 1.0}
    phase2 = config.phase2_config(0.4)
    assert phase2.weights_for(5) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 1.0}
    assert phase2.exit_layers == (2,) and phase2.routing_thresholds == (0.4,)


def test_stage_out_of_order_or_out_of_range_fails() -> None:
    with pytest.raises(ValueError, match=r"^stages\.layers: must satisfy 1 <= first <= last, got \(3, 2\)$"):
        StageConfig(layers=(3, 2))
    with pytest.raises(ValueError, match=r"^stages\.layers: "):
        StageConfig(layers=(0, 2))
    config = TrainingConfig(stages=[StageConfig(layers=(3, 5))], routing_threshold=0.0)
    with pytest.raises(ValueError, match=r"^layer_weights: layers must be in 1\.\.4 for a 4-layer model, got \[5\]$"):
        config.check_model(4)
    routed = TrainingConfig(stages=[StageConfig(layers=(4, 4))], exit_layer=4, routing_threshold=0.5)
    with pytest.raises(ValueError, match=r"^exit_layer: must be in 1\.\.3 for a 4-layer model, got 4$"):
        routed.check_model(4)


# --- threshold and hard ratio -------------------------------------------------------------------------------


def test_confidence_quantile_equals_torch_quantile() -> None:
    values = torch.rand(1001, generator=torch.Generator().manual_seed(3))
    for q in (0.1, 0.3, 0.5, 0.77, 0.9):
        assert confidence_quantile(values, q) == pytest.approx(torch.quantile(values.double(), q).item(), abs=1e-12)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_measured_hard_ratio_within_two_points_on_the_source(ashem_run, ratio: float) -> None:
    """On the data the threshold came from, the share of tokens below it is the asked ratio (±2 points)."""
    _, data, result = ashem_run
    model = result.phase1_model  # trained Block 1
    threshold = compute_confidence_threshold(model, data.val, ratio)
    hard = collect_hard_examples(model, data.val, threshold)
    manual = manual_confidences(model, list(data.val), 2)
    assert_close(hard.confidences.reshape(-1), manual)
    measured = (manual < threshold).double().mean().item()
    assert hard.hard_ratio == pytest.approx(measured)
    assert abs(measured - ratio) <= 0.02


def test_run_records_the_measured_ratio_and_source(ashem_run) -> None:
    config, data, result = ashem_run
    assert abs(result.hard_examples.hard_ratio - config.hard_example_ratio) <= 0.02
    assert result.hard_examples.num_tokens == data.val.num_tokens  # the seed's source: val
    assert result.val_examples is result.hard_examples
    manual = manual_confidences(result.phase1_model, list(data.val), 2)
    assert result.threshold == pytest.approx(torch.quantile(manual.double(), config.hard_example_ratio).item())


def test_hard_examples_from_train_with_trainable_head() -> None:
    data = tiny_data()
    config = ASHEMConfig(max_epochs=1, hard_examples_from="train", hard_example_ratio=0.3, phase2_train_head=True)
    result = run_ashem(config, make_model(2), data.train, data.val, batch_size=8, verbose=False)
    assert result.hard_examples.num_tokens == data.train.num_tokens
    assert abs(result.hard_examples.hard_ratio - 0.3) <= 0.02
    assert result.val_examples.num_tokens == data.val.num_tokens
    assert result.val_examples.threshold == result.threshold
    assert result.frozen_params_unchanged  # embedding and Block 1
    assert "output_head" not in result.phase2["frozen"]
    assert not torch.equal(result.model.output_head.weight, result.phase1_model.output_head.weight)
    manual = manual_two_stage(result.model, list(data.val), 2, result.threshold)
    for key, value in manual.items():  # routing follows the trained head's confidences
        assert result.final[key] == pytest.approx(value, rel=1e-6), key


def test_hard_examples_hold_the_seed_fields() -> None:
    model = make_model(2)
    batches = random_batches()
    hard = collect_hard_examples(model, batches, threshold=float(manual_confidences(model, batches, 2).median()))
    mask = hard.hard_mask
    assert hard["hidden_states"].shape == (int(mask.sum()), 16)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        h2 = model.hidden_states(x, [2])[2]
    assert torch.equal(hard["inputs"], x[mask]) and torch.equal(hard["targets"], y[mask])
    assert_close(hard["hidden_states"], h2[mask])
    assert bool((hard["confidences"] < hard.threshold).all())
    assert_close(compute_confidence(model, hard["hidden_states"]), hard["confidences"])


# --- extending, freezing, phase 2 ---------------------------------------------------------------------------


def test_extend_model_keeps_block1_outputs() -> None:
    small = make_model(2)
    big = grow(small, 4, exit_layer=2, routing_threshold=0.3)
    x = random_batches()[0][0]
    with torch.no_grad():
        assert_close(big(x, [2])[2], small(x))
    assert big.num_layers == 4 and big.exit_layers == (2,) and big.routing_thresholds == (0.3,)


def test_frozen_parameters_bit_identical_after_phase2(ashem_run) -> None:
    _, _, result = ashem_run
    assert result.frozen_params_unchanged
    big, small = result.model, result.phase1_model
    for name, p in small.named_parameters():  # embedding, layers 1-2, norm, head: exactly phase 1's
        assert torch.equal(dict(big.named_parameters())[name], p), name
    assert result.phase2["epochs_run"] >= 1
    fresh = grow(small, 4)  # same construction, untrained upper block
    changed = [not torch.equal(a, b) for a, b in zip(big.layers[2].parameters(), fresh.layers[2].parameters())]
    assert any(changed)


def test_freeze_then_train_changes_only_the_upper_block() -> None:
    model = grow(make_model(2), 4, exit_layer=2, routing_threshold=0.5)
    batches = random_batches(seed=1)
    hard = collect_hard_examples(model, batches, 0.9, exit_layer=2)
    snapshot = freeze_lower_layers(model, 2)
    upper_before = [p.detach().clone() for p in model.layers[2:].parameters()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        train_upper_layers(model, create_hard_example_loader(hard, 2), optimizer, V, num_lower_layers=2)
    assert params_unchanged(model, snapshot)
    assert all(not torch.equal(a, b) for a, b in zip(upper_before, model.layers[2:].parameters()))
    with torch.no_grad():
        model.embedding.weight[0, 0] += 1.0  # the check itself can fail
    assert not params_unchanged(model, snapshot)


def test_train_head_option_leaves_embedding_and_block1_frozen() -> None:
    model = grow(make_model(2), 4)
    snapshot = freeze_lower_layers(model, 2, freeze_head=False)
    assert "output_head.weight" not in snapshot and "norm.weight" not in snapshot
    assert {"embedding.weight", "layers.1.ffn.w2.weight"} <= set(snapshot)
    assert model.output_head.weight.requires_grad and not model.layers[1].attn.qkv.weight.requires_grad


def test_phase2_from_cache_equals_rerunning_the_frozen_layers() -> None:
    """Loss and upper-block gradients from cached layer-2 states equal those of the full forward pass."""
    torch.manual_seed(1)
    model = grow(make_model(2), 4, exit_layer=2)
    for p in model.layers[2:].parameters():  # make the upper block non-trivial
        p.data.normal_(0, 0.2)
    batches = random_batches(n=2, seed=2)
    threshold = float(manual_confidences(model, batches, 2).quantile(0.5))
    hard = collect_hard_examples(model, batches, threshold, exit_layer=2)
    freeze_lower_layers(model, 2)
    upper = list(model.layers[2:].parameters())

    # Cached path: one batch holding every window; SGD with lr 0 leaves the weights, returns the loss.
    loader = HardExampleBatches(hard, batch_size=100, shuffle=False)
    cached_loss = train_upper_layers(model, loader, torch.optim.SGD(upper, lr=0.0), V, num_lower_layers=2)
    cached_grads = [p.grad.clone() for p in upper]

    # Reference: run every layer from the token ids, mask hard tokens by their layer-2 confidence.
    model.zero_grad(set_to_none=True)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    logits = model(x, [2, 4])
    mask = F.softmax(logits[2], -1).amax(-1) < threshold
    assert torch.equal(mask, hard.hard_mask)
    loss = F.cross_entropy(logits[4][mask], y[mask])
    loss.backward()
    assert cached_loss == pytest.approx(loss.item(), rel=1e-6)
    for got, p in zip(cached_grads, upper):
        assert_close(got, p.grad)
    ev = evaluate_on_hard_examples(model, hard, num_lower_layers=2)
    assert ev["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert ev["acc"] == pytest.approx((logits[4][mask].argmax(-1) == y[mask]).double().mean().item())
    assert ev["num_tokens"] == int(mask.sum())


# --- two-stage routing --------------------------------------------------------------------------------------


def manual_two_stage(model: EarlyExitTransformer, batches: list, k: int, threshold: float) -> dict[str, float]:
    """Exit at k when max softmax >= threshold, else score at the last layer; counted compute."""
    nll, correct, shallow, n = 0.0, 0, 0, 0
    L = model.num_layers
    with torch.no_grad():
        for x, y in batches:
            lk, lL = model(x, [k])[k], model(x)
            exits = F.softmax(lk, -1).amax(-1) >= threshold
            logits = torch.where(exits.unsqueeze(-1), lk, lL)
            nll += F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum())
            shallow += int(exits.sum())
            n += y.numel()
    return {
        "ppl": math.exp(nll / n),
        "acc": correct / n,
        "shallow_ratio": shallow / n,
        "compute_cost": (shallow * k + (n - shallow) * L) / (n * L),
    }


def test_two_stage_routing_equals_manual_computation(ashem_run) -> None:
    _, data, result = ashem_run
    batches = list(data.val)
    manual = manual_two_stage(result.model, batches, 2, result.threshold)
    for key, value in manual.items():
        assert result.final[key] == pytest.approx(value, rel=1e-6), key
    assert result.final["shallow_ratio"] == pytest.approx(1 - result.val_examples.hard_ratio)  # frozen head
    cached = evaluate_routed_from_cache(result.model, result.val_examples, result.threshold)
    for key, value in manual.items():
        assert cached[key] == pytest.approx(value, rel=1e-6), key
    # The model routes by itself with the stored threshold (what a checkpoint gives back).
    routed = result.model.routed_forward(batches[0][0])
    assert bool(((routed.exit_layer == 2) == ~result.val_examples.hard_mask[: len(batches[0][0])]).all())


def test_phase2_history_and_hard_ppl(ashem_run) -> None:
    _, _, result = ashem_run
    p2 = result.phase2
    best = p2["history"][p2["best_epoch"] - 1]
    assert p2["hard_ppl"] == pytest.approx(best["hard_ppl"])
    assert best["val_ppl"] == pytest.approx(result.final["ppl"], rel=1e-6)  # the cache's routed eval = the full one
    ev = evaluate_on_hard_examples(result.model, result.val_examples)
    assert p2["hard_ppl"] == pytest.approx(ev["ppl"])
    at_exit = evaluate_on_hard_examples(result.phase1_model, result.val_examples, layer=2)
    assert p2["hard_ppl_at_exit"] == pytest.approx(at_exit["ppl"])


def test_cache_is_whole_windows_for_attention_context() -> None:
    model = make_model(2)
    batches = random_batches(n=2, batch=3, seq=10)
    cache = cache_exit_states(model, batches)
    assert cache.hidden_states.shape == (6, 10, 16) and cache.hard_mask.shape == (6, 10)
    hard = cache.with_threshold(float(cache.confidences.median()))
    loader = create_hard_example_loader(hard, batch_size=4, seed=1)
    windows = [h for h, _, _ in loader]
    assert sum(w.shape[0] for w in windows) == int(hard.hard_mask.any(1).sum())
    assert all(w.shape[1] == 10 for w in windows)  # easy neighbours stay in the window as context
