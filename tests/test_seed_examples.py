"""The seeds' usage examples, run as written (minus sys.path), on a couple of small random batches."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batches as conftest_batches

VOCAB = 1000


def random_batches(n: int = 2, seed: int = 0) -> list:
    return conftest_batches(VOCAB, n, seed=seed)


@pytest.fixture
def train_batches() -> list:
    return random_batches(seed=0)


@pytest.fixture
def val_batches() -> list:
    return random_batches(seed=1)


def check_routing_stats(stats: dict, exit_layer: int = 1, num_layers: int = 3) -> None:
    for key in ("ppl", "acc", "shallow_ratio", "compute_cost"):
        assert key in stats
        assert math.isfinite(stats[key])
    assert 0.0 <= stats["acc"] <= 1.0
    assert 0.0 <= stats["shallow_ratio"] <= 1.0
    # One exit: compute = (s · exit + (1 - s) · L) / L.
    s = stats["shallow_ratio"]
    assert stats["compute_cost"] == pytest.approx((s * exit_layer + (1 - s) * num_layers) / num_layers)


def test_seed_004_basic_usage(train_batches, val_batches):
    torch.manual_seed(0)
    from ease import DeepSupervisionTransformer, Trainer, TrainingConfig

    # モデル作成
    model = DeepSupervisionTransformer(vocab_size=1000, dim=64, num_layers=3)

    # 設定
    config = TrainingConfig(
        layer_weights={1: 0.7, 2: 0, 3: 0.3},  # 層ごとの損失重み
        layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1},  # 層ごとの学習率
        routing_threshold=0.95,  # Early Exit閾値
    )

    # 訓練
    trainer = Trainer(config, vocab_size=1000)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    loss = trainer.train_epoch(model, train_batches, optimizer)

    # 評価
    stats = trainer.evaluate(model, val_batches)

    # The loss reads as a number (seed 004) and is the weighted CE of a near-uniform model: ≈ log(1000).
    assert float(loss) == pytest.approx(math.log(1000), rel=0.05)
    assert f"{loss:.2f}" == f"{float(loss):.2f}"
    check_routing_stats(stats)
    assert stats["ppl"] == pytest.approx(1000, rel=0.3)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert (lrs["layer_1"], lrs["layer_2"], lrs["layer_3"]) == pytest.approx((1e-3, 5e-4, 1e-4))
    # The reported loss is Σ w_l CE_l of the validation batches.
    with torch.no_grad():
        ce = []
        for layer in (1, 3):
            per_batch = [
                F.cross_entropy(model(x, [layer])[layer].reshape(-1, 1000), y.reshape(-1)) for x, y in val_batches
            ]
            ce.append(torch.stack(per_batch).mean().item())
    assert stats["loss"] == pytest.approx(0.7 * ce[0] + 0.3 * ce[1], rel=1e-5)


def test_seed_004_helpers():
    from ease import create_deep_supervision_config, create_standard_config

    # Standard LLM設定
    config = create_standard_config(num_layers=3)
    assert config.weights_for(3) == {1: 0, 2: 0, 3: 1}

    # Deep Supervision設定
    config = create_deep_supervision_config(num_layers=3)
    assert config.weights_for(3) == pytest.approx({1: 0.33, 2: 0.33, 3: 0.33}, abs=0.01)


def test_seed_004_early_stopping(train_batches, val_batches):
    torch.manual_seed(0)
    from ease import StandardTransformer, Trainer, create_standard_config

    model = StandardTransformer(vocab_size=1000, dim=64, num_layers=3)
    trainer = Trainer(create_standard_config(num_layers=3), vocab_size=1000)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)

    # Early Stopping付き訓練
    result = trainer.train_with_early_stopping(
        model=model,
        train_batches=train_batches,
        val_batches=val_batches,
        optimizer=optimizer,
        max_epochs=3,
        patience=1,  # デフォルト値: 1エポック改善なしで停止
        verbose=True,
    )

    history = result["history"]
    assert 1 <= len(history) <= 3
    val = [row["val_loss"] for row in history]
    assert result["best_epoch"] == 1 + val.index(min(val))
    if result["stopped_early"]:
        assert history[-1]["val_loss"] >= min(val[:-1])  # one bad epoch stops training
    assert trainer.evaluate(model, val_batches)["loss"] == pytest.approx(min(val), rel=1e-5)


def test_seed_000_usage(train_batches, val_batches):
    torch.manual_seed(0)
    from ease import (
        DEEDTransformer,
        TokenRoutedTransformer,
        UniversalConfig,
        UniversalTrainer,
    )

    # === DEEDTransformer ===
    # 訓練: 全トークンが両方の損失に貢献（α重み付け）
    # 推論: confidence-based early exit
    config = UniversalConfig(
        layer_weights={1: 0.5, 2: 0.3, 3: 0.2},  # 任意の重み配分 (α)
        routing_threshold=0.9,  # 推論時の閾値
        exit_layer=1,
    )
    model = DEEDTransformer(vocab_size=1000, dim=64, num_layers=3)
    trainer = UniversalTrainer(config, vocab_size=1000)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)

    # Training
    loss, weights = trainer.train_epoch(model, train_batches, optimizer)

    # Evaluation
    stats = trainer.evaluate(model, val_batches)
    # Returns: {ppl, acc, shallow_ratio, compute_cost}

    assert weights == {1: 0.5, 2: 0.3, 3: 0.2}
    assert loss == pytest.approx(math.log(1000), rel=0.05)  # the weights sum to 1, each CE ≈ log V
    check_routing_stats(stats)
    # An untrained 1000-way model is never 90% sure: no token exits.
    assert stats["shallow_ratio"] == 0.0
    assert stats["compute_cost"] == 1.0

    # === TokenRoutedTransformer ===
    model_tr = TokenRoutedTransformer(vocab_size=1000, dim=64, num_layers=3, exit_layer=1, routing_threshold=0.7)
    assert model_tr.exit_layer == 1 and model_tr.routing_threshold == 0.7
    assert model_tr(train_batches[0][0]).shape == (*train_batches[0][0].shape, 1000)


def test_seed_000_options():
    from ease import PRESETS, AlphaSchedule, EarlyExitTransformer, UniversalConfig, UniversalTrainer

    for layer_weights in (
        {1: 0, 2: 0, 3: 1},
        {1: 1 / 3, 2: 1 / 3, 3: 1 / 3},
        {1: 0.5, 2: 0, 3: 0.5},
        {1: 0.7, 2: 0.1, 3: 0.2},
    ):
        for routing_threshold in (0, 0.5, 0.95):
            for exit_layer in (1, 2):
                config = UniversalConfig(
                    layer_weights=layer_weights, routing_threshold=routing_threshold, exit_layer=exit_layer
                )
                assert config.weights_for(3) == pytest.approx(layer_weights)
                assert (config.exit_layers, config.routing_thresholds) == ((exit_layer,), (routing_threshold,))
    model = EarlyExitTransformer(50, 16, 3, num_heads=2)
    for layer_lr_scales in ({1: 1.0, 2: 0.5, 3: 0.1}, {1: 0.1, 2: 0.5, 3: 1.0}, {1: 1.0, 2: 1.0, 3: 1.0}):
        config = UniversalConfig(layer_weights={3: 1}, layer_lr_scales=layer_lr_scales)
        groups = {g["name"]: g["lr"] for g in UniversalTrainer(config).create_optimizer(model, 1e-3).param_groups}
        assert [groups[f"layer_{i}"] for i in (1, 2, 3)] == pytest.approx(
            [1e-3 * layer_lr_scales[i] for i in (1, 2, 3)]
        )

    assert AlphaSchedule("constant", start=0.7).at_epoch(3, 5) == 0.7
    assert AlphaSchedule("linear", start=0.9, end=0.5).at_epoch(4, 5) == pytest.approx(0.5)
    assert AlphaSchedule("cosine", start=0.9, end=0.5).at_epoch(2, 5) == pytest.approx(0.7)

    assert {"standard_llm", "deep_supervision", "deed", "auxiliary_loss", "asymmetric"} <= set(PRESETS)


def test_seed_003_training_method_equals_trainer_loss(train_batches):
    """Seed 003's setting A and B loops against Trainer.compute_loss with the matching weights."""
    torch.manual_seed(0)
    from ease import DeepSupervisionTransformer, Trainer, TrainingConfig

    model = DeepSupervisionTransformer(vocab_size=1000, dim=64, num_layers=3)
    x, target = train_batches[0]
    alpha = 0.7

    def cross_entropy(out, tgt):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), tgt.reshape(-1))

    all_outputs = model.forward_all_layers(x)
    shallow_out, middle_out, deep_out = all_outputs[0], all_outputs[1], all_outputs[-1]
    setting_a = alpha * cross_entropy(shallow_out, target) + (1 - alpha) * cross_entropy(deep_out, target)
    setting_b = (
        alpha * cross_entropy(shallow_out, target)
        + cross_entropy(middle_out, target)
        + (1 - alpha) * cross_entropy(deep_out, target)
    )
    a = Trainer(TrainingConfig(layer_weights={1: alpha, 2: 0.0, 3: 1 - alpha})).compute_loss(model, x, target)
    b = Trainer(TrainingConfig(layer_weights={1: alpha, 2: 1.0, 3: 1 - alpha})).compute_loss(model, x, target)
    torch.testing.assert_close(a, setting_a)
    torch.testing.assert_close(b, setting_b)
