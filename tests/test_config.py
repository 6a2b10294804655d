"""TrainingConfig, StageConfig, AlphaSchedule and presets: valid configs, and one-line errors naming the field."""

import pytest
import torch

from ease import (
    PRESET_ALIASES,
    PRESETS,
    AlphaSchedule,
    EarlyExitTransformer,
    StageConfig,
    Trainer,
    TrainingConfig,
    create_deep_supervision_config,
    create_standard_config,
    normalize_routing,
)


def expect_error(fn, field: str) -> str:
    """fn() raises a one-line ValueError whose message names `field`."""
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert field in message, message
    assert "\n" not in message
    return message


def tiny_model(num_layers: int = 3) -> EarlyExitTransformer:
    torch.manual_seed(0)
    return EarlyExitTransformer(50, 16, num_layers, num_heads=2)


def batch():
    x = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    return [(x[:, :-1], x[:, 1:])]


# --- bad inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layer_weights": {1: -0.1, 3: 1.0}}, "layer_weights"),
        ({"layer_weights": {1: 0.0, 2: 0.0, 3: 0.0}}, "layer_weights"),
        ({"layer_weights": {}}, "layer_weights"),
        ({"layer_weights": {0: 1.0}}, "layer_weights"),
        ({"layer_weights": {1: float("nan")}}, "layer_weights"),
        ({"layer_weights": {1: float("inf")}}, "layer_weights"),
        ({"layer_weights": {"a": 1.0}}, "layer_weights"),
        ({}, "layer_weights"),
        ({"layer_weights": {3: 1.0}, "routing_threshold": 1.5}, "routing_threshold"),
        ({"layer_weights": {3: 1.0}, "routing_threshold": -0.1}, "routing_threshold"),
        ({"layer_weights": {3: 1.0}, "routing_threshold": float("nan")}, "routing_threshold"),
        ({"layer_weights": {3: 1.0}, "exit_layer": 0}, "exit_layer"),
        ({"layer_weights": {3: 1.0}, "exit_layer": [1, 2], "routing_threshold": [0.9]}, "routing_threshold"),
        ({"layer_weights": {3: 1.0}, "exit_layer": [1, 2], "routing_threshold": [0.9, 0.8, 0.7]}, "routing_threshold"),
        ({"layer_weights": {3: 1.0}, "exit_layer": [1, 1], "routing_threshold": 0.9}, "exit_layer"),
        ({"layer_weights": {3: 1.0}, "exit_layer": [], "routing_threshold": []}, "exit_layer"),
        ({"layer_weights": {3: 1.0}, "layer_lr_scales": {1: 0.0}}, "layer_lr_scales"),
        ({"layer_weights": {3: 1.0}, "layer_lr_scales": {1: -1.0}}, "layer_lr_scales"),
        ({"layer_weights": {3: 1.0}, "layer_lr_scales": {0: 1.0}}, "layer_lr_scales"),
        ({"layer_weights": {3: 1.0}, "embedding_lr_scale": 0.0}, "embedding_lr_scale"),
        ({"layer_weights": {3: 1.0}, "head_lr_scale": -1.0}, "head_lr_scale"),
        ({"layer_weights": {3: 1.0}, "confidence": "entropy?"}, "confidence"),
        ({"layer_weights": {3: 1.0}, "alpha_schedule": "linear"}, "alpha_schedule"),
        ({"layer_weights": {3: 1.0}, "alpha_schedule": {"kind": "exponential"}}, "alpha_schedule.kind"),
        ({"layer_weights": {3: 1.0}, "stages": []}, "stages"),
        ({"layer_weights": {3: 1.0}, "stages": [StageConfig(layers=(1, 3))]}, "stages"),
        ({"stages": [{"layers": (3, 2)}]}, "stages.layers"),
    ],
)
def test_bad_config_raises_one_line_error_naming_field(kwargs, field):
    expect_error(lambda: TrainingConfig(**kwargs), field)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "exponential"}, "alpha_schedule.kind"),
        ({"kind": "linear", "start": 1.2}, "alpha_schedule.start"),
        ({"kind": "linear", "start": -0.1}, "alpha_schedule.start"),
        ({"kind": "cosine", "start": 0.9, "end": 1.5}, "alpha_schedule.end"),
        ({"kind": "cosine", "start": 0.9, "end": -0.01}, "alpha_schedule.end"),
    ],
)
def test_bad_alpha_schedule(kwargs, field):
    expect_error(lambda: AlphaSchedule(**kwargs), field)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layers": (3, 2)}, "stages.layers"),
        ({"layers": (0, 2)}, "stages.layers"),
        ({"layers": (1, 2, 3)}, "stages.layers"),
        ({"layers": (1, 2), "loss_weight": -1.0}, "stages.loss_weight"),
    ],
)
def test_bad_stage(kwargs, field):
    expect_error(lambda: StageConfig(**kwargs), field)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"layer_weights": {3: 1.0}, "exit_layer": 5, "routing_threshold": 0.9}, "exit_layer"),
        ({"layer_weights": {3: 1.0}, "exit_layer": 5, "routing_threshold": 0.0}, "exit_layer"),
        ({"layer_weights": {3: 1.0}, "exit_layer": 3, "routing_threshold": 0.9}, "exit_layer"),  # at the last layer
        ({"layer_weights": {3: 1.0}, "exit_layer": [1, 4], "routing_threshold": [0.9, 0.9]}, "exit_layer"),
        ({"layer_weights": {1: 0.5, 5: 0.5}}, "layer_weights"),
        ({"layer_weights": {3: 1.0}, "layer_lr_scales": {4: 0.5}}, "layer_lr_scales"),
        (
            {"layer_weights": {3: 1.0}, "stages": None, "layer_lr_scales": {1: 1.0, 2: 1.0, 3: 1.0, 9: 1.0}},
            "layer_lr_scales",
        ),
        (
            {
                "layer_weights": {1: 0.5, 3: 0.5},
                "exit_layer": 3,
                "routing_threshold": 0.0,
                "alpha_schedule": AlphaSchedule(),
            },
            "alpha_schedule",
        ),
    ],
)
def test_config_beyond_the_model_fails_on_use(kwargs, field):
    config = TrainingConfig(**kwargs)  # fine on its own: it does not know the model yet
    model = tiny_model(3)
    trainer = Trainer(config)
    expect_error(lambda: config.check_model(3), field)
    expect_error(lambda: trainer.create_optimizer(model), field)
    expect_error(lambda: trainer.train_epoch(model, batch(), torch.optim.SGD(model.parameters(), lr=0.1)), field)
    expect_error(lambda: trainer.evaluate(model, batch()), field)
    config.check_model(9)  # a deep enough model accepts it


def test_vocab_size_checks():
    expect_error(lambda: EarlyExitTransformer(1, 16, 3, num_heads=2), "vocab_size")
    expect_error(lambda: EarlyExitTransformer(0, 16, 3, num_heads=2), "vocab_size")
    model = tiny_model()
    trainer = Trainer(create_standard_config(3), vocab_size=1000)
    expect_error(lambda: trainer.create_optimizer(model), "vocab_size")
    Trainer(create_standard_config(3), vocab_size=50).create_optimizer(model)


def test_bad_model_shapes():
    expect_error(lambda: EarlyExitTransformer(50, 16, 0), "num_layers")
    expect_error(lambda: EarlyExitTransformer(50, 18, 3, num_heads=4), "num_heads")
    expect_error(lambda: EarlyExitTransformer(50, 12, 3, num_heads=4), "head dimension")  # head dim 3 is odd


def test_bad_routing_arguments_at_evaluation():
    model = tiny_model()
    trainer = Trainer(create_standard_config(3))
    expect_error(lambda: trainer.evaluate(model, batch(), routing_threshold=2.0), "routing_threshold")
    expect_error(lambda: trainer.evaluate(model, batch(), exit_layer=3, routing_threshold=0.5), "exit_layer")
    expect_error(lambda: trainer.threshold_analysis(model, batch(), [1.01]), "routing_threshold")
    expect_error(lambda: model.routed_forward(batch()[0][0], exit_layer=1, routing_threshold=-1.0), "routing_threshold")


def test_bad_early_stopping_arguments():
    model = tiny_model()
    trainer = Trainer(create_standard_config(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expect_error(lambda: trainer.train_with_early_stopping(model, batch(), batch(), opt, max_epochs=0), "max_epochs")
    expect_error(lambda: trainer.train_with_early_stopping(model, batch(), batch(), opt, patience=0), "patience")


# --- good inputs --------------------------------------------------------------------------------------------


def test_weights_for_fills_missing_layers_with_zero():
    config = TrainingConfig(layer_weights={1: 0.7, 3: 0.3})
    assert config.weights_for(3) == {1: 0.7, 2: 0.0, 3: 0.3}
    assert config.weights_for(4) == {1: 0.7, 2: 0.0, 3: 0.3, 4: 0.0}
    assert config.exit_layers == (1,)
    assert config.routing_thresholds == (0.95,)  # seed 000 default
    assert config.routing_enabled


def test_layer_map_keys_are_coerced():
    config = TrainingConfig(layer_weights={"1": "0.5", 3: 1}, layer_lr_scales={"2": 0.5})
    assert config.layer_weights == {1: 0.5, 3: 1.0}
    assert config.layer_lr_scales == {2: 0.5}


def test_helpers_match_the_seeds():
    std = create_standard_config(num_layers=3)
    assert std.weights_for(3) == {1: 0.0, 2: 0.0, 3: 1.0}
    assert not std.routing_enabled
    ds = create_deep_supervision_config(num_layers=3)
    assert ds.weights_for(3) == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    assert not ds.routing_enabled
    assert create_standard_config(5).weights_for(5) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 1.0}


def test_stages_add_their_weight_at_their_last_layer():
    config = TrainingConfig(stages=[StageConfig((1, 1), 0.3), {"layers": (2, 3), "loss_weight": 0.7}])
    assert config.weights_for(3) == pytest.approx({1: 0.3, 2: 0.0, 3: 0.7})
    config = TrainingConfig(stages=[StageConfig((1, 2)), StageConfig((2, 2), 0.5)])
    assert config.weights_for(3) == pytest.approx({1: 0.0, 2: 1.5, 3: 0.0})


def test_normalize_routing_sorts_cascades():
    assert normalize_routing([2, 1], [0.8, 0.9]) == ((1, 2), (0.9, 0.8))
    assert normalize_routing([1, 2], 0.5) == ((1, 2), (0.5, 0.5))
    assert normalize_routing(2, 0, 3) == ((2,), (0.0,))
    assert normalize_routing(3, 0.0, 3) == ((3,), (0.0,))  # an inactive exit may sit at the last layer


def test_alpha_schedule_dict_is_accepted():
    config = TrainingConfig(layer_weights={1: 0.5, 3: 0.5}, alpha_schedule={"kind": "linear", "start": 0.9, "end": 0.5})
    assert isinstance(config.alpha_schedule, AlphaSchedule)
    assert config.alpha_schedule.at_epoch(1, 3) == pytest.approx(0.7)
    assert AlphaSchedule("constant", start=0.7).end == 0.7


# --- presets ------------------------------------------------------------------------------------------------


def test_presets_are_fresh_copies():
    a = PRESETS["asymmetric"]
    a.layer_weights[1] = 0.0
    a.routing_threshold = 0.1
    b = PRESETS["asymmetric"]
    assert a is not b
    assert b.layer_weights[1] == pytest.approx(0.7)
    assert PRESETS["asymmetric_best"].layer_weights == b.layer_weights


@pytest.mark.parametrize(("alias", "target"), sorted(PRESET_ALIASES.items()))
def test_aliases_equal_their_target(alias, target):
    a, t = PRESETS[alias], PRESETS[target]
    assert a.layer_weights == t.layer_weights
    assert a.routing_thresholds == t.routing_thresholds
    assert a.exit_layers == t.exit_layers
    assert a.layer_lr_scales == t.layer_lr_scales


def test_presets_reproduce_seed_000_table():
    expected = {
        "standard_llm": ({1: 0, 2: 0, 3: 1}, 0.0),
        "deep_supervision": ({1: 1 / 3, 2: 1 / 3, 3: 1 / 3}, 0.0),
        "deed": ({1: 1 / 3, 2: 1 / 3, 3: 1 / 3}, 0.7),
        "auxiliary_loss": ({1: 0.5, 2: 0, 3: 0.5}, 0.95),
        "asymmetric": ({1: 0.7, 2: 0, 3: 0.3}, 0.95),
        "asymmetric_with_l2": ({1: 0.7, 2: 1.0, 3: 0.3}, 0.95),
    }
    for name, (weights, threshold) in expected.items():
        config = PRESETS[name]
        assert config.weights_for(3) == pytest.approx(weights), name
        assert config.routing_thresholds == pytest.approx((threshold,)), name
        assert config.exit_layers == (1,)
    assert PRESETS["asymmetric_lr_decreasing"].layer_lr_scales == {1: 1.0, 2: 0.5, 3: 0.1}
    assert PRESETS["asymmetric_lr_increasing"].layer_lr_scales == {1: 0.1, 2: 0.5, 3: 1.0}


def test_unknown_preset_is_a_key_error():
    with pytest.raises(KeyError, match="unknown"):
        PRESETS["nope"]
    assert len(PRESETS) == len(list(PRESETS))
