"""LayerSkip (Elhoushi et al., 2024): early-exit loss scales, curricula, per-example layer dropout, the preset.

Every number is checked against a plain re-implementation written here (a loop over layers or steps).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, strip_timing
from hf_models import tiny
from killswitch import Interrupted, interrupt_after

from ease.app.runner import run, validate
from ease.config import TrainingConfig
from ease.curriculum import ExitCurriculum, gradual_exits, rotational_exits
from ease.losses import (
    EARLY_EXIT_SCALES,
    LossWeightsConfig,
    inv_l,
    inv_sqrt_l,
    linear_l,
    sqrt_l,
    sum_l,
    weighted_exit_loss,
)
from ease.model.backbone import hidden_states
from ease.model.layer_dropout import LayerDropout, LayerDropoutConfig, dropout_rates
from ease.model.transformer import EarlyExitTransformer
from ease.training import Trainer

# --- loss scales --------------------------------------------------------------------------------------------------

RAW = {
    "linear_l": lambda layers: [float(n) for n in layers],
    "sum_l": lambda layers: [float(sum(layers[: k + 1])) for k in range(len(layers))],
    "sqrt_l": lambda layers: [n**0.5 for n in layers],
    "inv_l": lambda layers: [1 / n for n in layers],
    "inv_sqrt_l": lambda layers: [n**-0.5 for n in layers],
}


def plain_scale(kind: str, num_layers: int, e_scale: float, layers: list[int]) -> dict[int, float]:
    raw = RAW[kind](layers)
    scaled = [r * (e_scale if n < num_layers else 1.0) for n, r in zip(layers, raw)]
    out = {n: 0.0 for n in range(1, num_layers + 1)}
    for n, v in zip(layers, scaled):
        out[n] = v / sum(scaled)
    return out


@pytest.mark.parametrize("kind", list(RAW))
@pytest.mark.parametrize("num_layers", [1, 3, 6])
@pytest.mark.parametrize("e_scale", [1.0, 0.25, 3.0])
def test_scales_match_the_plain_formula(kind: str, num_layers: int, e_scale: float) -> None:
    fn = EARLY_EXIT_SCALES[kind]
    got = fn(num_layers, e_scale)
    assert got == pytest.approx(plain_scale(kind, num_layers, e_scale, list(range(1, num_layers + 1))))
    assert sum(got.values()) == pytest.approx(1.0)
    subset = [n for n in range(1, num_layers + 1) if n % 2 == 0 or n == num_layers]
    got = fn(num_layers, e_scale, subset)
    assert got == pytest.approx(plain_scale(kind, num_layers, e_scale, subset))
    assert all(got[n] == 0.0 for n in range(1, num_layers + 1) if n not in subset)


def test_scales_numbers_and_e_scale() -> None:
    assert sum_l(3) == pytest.approx({1: 0.1, 2: 0.3, 3: 0.6})  # 1, 1+2, 1+2+3 over 10
    assert linear_l(3) == pytest.approx({1: 1 / 6, 2: 2 / 6, 3: 3 / 6})
    assert inv_l(2) == pytest.approx({1: 2 / 3, 2: 1 / 3})
    assert sqrt_l(2)[2] == pytest.approx(2**0.5 / (1 + 2**0.5))
    assert inv_sqrt_l(2)[1] == pytest.approx(1 / (1 + 2**-0.5))
    # e_scale multiplies the early exits only: 0.5 · (1, 3) and 6 -> (0.5, 1.5, 6) / 8
    assert sum_l(3, 0.5) == pytest.approx({1: 0.5 / 8, 2: 1.5 / 8, 3: 6 / 8})
    assert sum_l(3, 2.0, [3]) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_loss_weights_config_exposes_the_scales() -> None:
    cfg = LossWeightsConfig(kind="inv_sqrt_l", e_scale=0.5)
    assert cfg.layer_weights(4, 1) == pytest.approx(plain_scale("inv_sqrt_l", 4, 0.5, [1, 2, 3, 4]))
    assert LossWeightsConfig(kind="uniform").curriculum_for(3) is None


# --- curricula ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_layers", "period"), [(3, 2), (4, 2), (5, 3), (6, 1), (1, 1)])
def test_rotational_matches_rolling_a_mask(num_layers: int, period: int) -> None:
    mask = np.array([i % period == 0 for i in range(num_layers)])  # every R-th layer from layer 1
    for step in range(3 * num_layers):
        expected = {i + 1 for i in range(num_layers) if mask[i]} | {num_layers}
        assert rotational_exits(step, num_layers, period) == expected, step
        mask = np.roll(mask, 1)  # torchtune: one layer deeper per step


@pytest.mark.parametrize("fraction", [0.5, 1.0, 0.3])
def test_gradual_matches_a_plain_loop(fraction: float) -> None:
    L, total = 4, 40
    for step in range(total):
        expected = {L}
        for index in range(L):  # torchtune's 0-based layer index
            if step / total >= fraction * (L - index) / L:
                expected.add(index + 1)
        assert gradual_exits(step, total, L, fraction) == expected
    assert gradual_exits(0, total, L, fraction) == {L}
    assert gradual_exits(int(fraction * total), total, L, fraction) == {1, 2, 3, 4}


def test_curriculum_record_counts_the_steps_each_layer_had_loss() -> None:
    cur = LossWeightsConfig(kind="sum_l", curriculum="rotational", rotation_period=2).curriculum_for(3)
    assert isinstance(cur, ExitCurriculum)
    rec = cur.record(7, None, 3)
    counts = {n: sum(n in rotational_exits(s, 3, 2) for s in range(7)) for n in (1, 2, 3)}
    assert rec["active_steps"] == counts == {1: 5, 2: 4, 3: 7}
    assert cur.weights(2, None, 3) == pytest.approx(sum_l(3, 1.0, [2, 3]))


def test_the_trainer_applies_the_curriculum_per_step() -> None:
    """The loss of each step is the scale over that step's exits: checked by recording the weights used."""
    torch.manual_seed(0)
    model = EarlyExitTransformer(vocab_size=11, dim=8, num_layers=3, num_heads=2, routing_threshold=0.0)
    cur = LossWeightsConfig(kind="sum_l", curriculum="gradual", gradual_fraction=0.5).curriculum_for(3)
    trainer = Trainer(TrainingConfig(layer_weights=sum_l(3), routing_threshold=0.0), 11, curriculum=cur)
    used = []
    real = trainer.batch_loss

    def spy(m, x, y, weights):
        used.append(dict(weights))
        return real(m, x, y, weights)

    trainer.batch_loss = spy
    batches = [(torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))) for _ in range(6)]
    trainer.planned_steps = 6
    opt = trainer.create_optimizer(model)
    result = trainer.train_epoch(model, batches, opt)
    assert used == [pytest.approx(sum_l(3, 1.0, gradual_exits(s, 6, 3, 0.5))) for s in range(6)]
    assert used[0] == {1: 0.0, 2: 0.0, 3: 1.0} and used[5][1] > 0
    assert result.weights == sum_l(3)  # the epoch reports the scheme over every exit


# --- layer dropout ------------------------------------------------------------------------------------------------


def plain_rate(scale: str, i: int, depth: int, p: float) -> float:
    t = (i - 1) / (depth - 1)
    shape = {
        "uniform": 1.0,
        "linear": t,
        "exp": 2**t - 1,
        "log": math.log(i) / math.log(depth),
        "sin": math.sin(math.pi / 2 * t),
        "sigmoid": 1 / (1 + math.exp(-10 * (t - 0.5))),
        "step": 1.0 if i == depth else 0.0,
    }[scale]
    return p * shape


@pytest.mark.parametrize("scale", ["uniform", "linear", "exp", "log", "sin", "sigmoid", "step"])
def test_rates_per_layer_match_the_formula(scale: str) -> None:
    rates = dropout_rates(5, 0.3, scale)
    assert rates == pytest.approx({i: plain_rate(scale, i, 5, 0.3) for i in range(1, 6)})
    assert max(rates.values()) == pytest.approx(0.3, abs=0.003)  # sigmoid stops at 0.3 · 0.9933
    assert dropout_rates(1, 0.3, scale) == {1: pytest.approx(0.3)}


def check_rows(model, drop: LayerDropout, seed: int) -> None:
    """Run layer 2 through the dropout and compare each row with the layer's input and output."""
    h = torch.randn(16, 5, model_dim(model))
    with torch.no_grad():
        full = model.layer(2, h)
        gen = drop.generator(seed)
        expected_drop = torch.rand(16, generator=drop.generator(seed)) < drop.rates[2]
        out = drop.layer_fn(model, gen)(2, h)
    assert 0 < int(expected_drop.sum()) < 16
    for row in range(16):
        if expected_drop[row]:
            assert torch.equal(out[row], h[row])  # dropped: passes through unchanged
        else:
            torch.testing.assert_close(out[row], full[row], atol=1e-5, rtol=1e-5)  # kept: the layer's output


def model_dim(model) -> int:
    return model.embed(torch.zeros(1, 1, dtype=torch.long)).shape[-1]


def test_dropped_rows_pass_through_kept_rows_are_the_layer_output_native() -> None:
    torch.manual_seed(0)
    model = EarlyExitTransformer(vocab_size=11, dim=8, num_layers=3, num_heads=2, routing_threshold=0.0).eval()
    check_rows(model, LayerDropout({1: 0.0, 2: 0.5, 3: 0.5}, seed=3), seed=1)


def test_dropped_rows_pass_through_kept_rows_are_the_layer_output_hf_llama() -> None:
    model = tiny("llama", vocab=31, layers=3, dim=32)
    check_rows(model, LayerDropout({1: 0.0, 2: 0.5, 3: 0.5}, seed=3), seed=2)


def test_empirical_drop_share_matches_the_rates() -> None:
    drop = LayerDropout(dropout_rates(3, 0.4, "linear"), seed=0)  # 0, 0.2, 0.4

    class Marker:  # a layer that marks the rows it ran on
        @staticmethod
        def layer(i: int, h: torch.Tensor) -> torch.Tensor:
            return h + 1.0

    model = Marker()
    shares = {1: [], 2: [], 3: []}
    for step in range(400):
        run = drop.layer_fn(model, drop.generator(step))
        for i in (1, 2, 3):
            h = torch.zeros(8, 1, 1)
            shares[i].append(float((run(i, h) == 0).float().mean()))
    for i, p in drop.rates.items():
        assert np.mean(shares[i]) == pytest.approx(p, abs=0.03)  # 3200 draws: sd of the share ≈ 0.009
        assert drop.record()["dropped_share"][i] == pytest.approx(np.mean(shares[i]))


def test_no_dropout_in_eval_mode_and_none_at_max_rate_zero() -> None:
    torch.manual_seed(0)
    model = EarlyExitTransformer(vocab_size=11, dim=8, num_layers=3, num_heads=2, routing_threshold=0.0)
    x, y = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    trainer = Trainer(TrainingConfig(layer_weights=sum_l(3), routing_threshold=0.0), 11)
    trainer.layer_dropout = LayerDropout({1: 0.9, 2: 0.9, 3: 0.9}, seed=0)
    model.eval()
    assert trainer.layer_fn(model) is None
    plain = weighted_exit_loss(model, x, y, sum_l(3))[0]
    assert torch.equal(trainer.batch_loss(model, x, y, sum_l(3)).loss, plain)
    model.train()
    assert not torch.equal(trainer.batch_loss(model, x, y, sum_l(3)).loss, plain)


def test_hidden_states_with_dropout_equal_a_plain_loop() -> None:
    """The training states through `hidden_states(..., layer_fn)` equal a per-row loop over the layers."""
    torch.manual_seed(0)
    model = EarlyExitTransformer(vocab_size=11, dim=8, num_layers=3, num_heads=2, routing_threshold=0.0).eval()
    drop = LayerDropout({1: 0.3, 2: 0.5, 3: 0.5}, seed=7)
    x = torch.randint(0, 11, (6, 4))
    with torch.no_grad():
        got = hidden_states(model, x, [1, 2, 3], drop.layer_fn(model, drop.generator(0)))
        gen = drop.generator(0)
        h = model.embed(x)
        for i in (1, 2, 3):
            dropped = torch.rand(6, generator=gen) < drop.rates[i]
            rows = [h[r] if dropped[r] else model.layer(i, h[r : r + 1])[0] for r in range(6)]
            h = torch.stack(rows)
            torch.testing.assert_close(got[i], h, atol=1e-5, rtol=1e-5)


# --- bad inputs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rate": 1.0}, r"^layer_dropout\.max_rate: must be in \[0, 1\), got 1\.0$"),
        ({"max_rate": -0.1}, r"^layer_dropout\.max_rate: must be in \[0, 1\)"),
        ({"max_rate": float("nan")}, r"^layer_dropout\.max_rate: must be in \[0, 1\)"),
        ({"scale": "cubic"}, r"^layer_dropout\.scale: must be one of uniform, linear, exp"),
    ],
)
def test_bad_layer_dropout(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerDropoutConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "sum_l", "e_scale": 0.0}, r"^loss_weights\.e_scale: must be a finite number > 0, got 0\.0$"),
        ({"kind": "sum_l", "e_scale": float("inf")}, r"^loss_weights\.e_scale: must be a finite number > 0"),
        ({"kind": "uniform", "e_scale": 0.5}, r"^loss_weights\.e_scale: applies to the kinds linear_l"),
        ({"kind": "sum_l", "curriculum": "random"}, r"^loss_weights\.curriculum: must be one of none, rotational"),
        ({"kind": "asymmetric", "curriculum": "rotational"}, r"^loss_weights\.curriculum: needs one of the kinds"),
        ({"kind": "sum_l", "rotation_period": 0}, r"^loss_weights\.rotation_period: must be an int >= 1, got 0$"),
        ({"kind": "sum_l", "gradual_fraction": 0.0}, r"^loss_weights\.gradual_fraction: must be in \(0, 1\]"),
        ({"kind": "sum_x"}, r"^loss_weights\.kind: must be one of .*inv_sqrt_l, got 'sum_x'$"),
    ],
)
def test_bad_loss_weights(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossWeightsConfig(**kwargs)


def test_bad_inputs_fail_at_validation_with_one_line() -> None:
    cases = [
        (["layer_dropout.max_rate=1.5"], r"^layer_dropout\.max_rate: must be in \[0, 1\), got 1\.5$"),
        (["+preset=token_routed", "layer_dropout=layerskip"], r"^layer_dropout\.max_rate: .*strategy=standard"),
        (["layer_dropout.scale=cubic"], r"^layer_dropout\.scale: must be one of"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            validate(compose(["model=tiny", "data=synthetic", *overrides]))
        assert "\n" not in str(err.value)


# --- runs ---------------------------------------------------------------------------------------------------------

RUN = ["+preset=layerskip", "model=tiny", "data=synthetic", "data.synthetic_tokens=4000", "progress=false", "threads=1"]


def read(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["metrics"]


def test_preset_trains_and_records_what_it_did(tmp_path: Path) -> None:
    run(compose([*RUN, "train.max_epochs=2", "train.patience=5"]), tmp_path)
    m = read(tmp_path)
    steps = m["training"]["steps_run"]
    assert m["curriculum"]["kind"] == "rotational" and m["curriculum"]["steps"] == steps
    counts = {str(n): sum(n in rotational_exits(s, 3, 2) for s in range(steps)) for n in (1, 2, 3)}
    assert m["curriculum"]["active_steps"] == counts and counts["3"] == steps
    drop = m["layer_dropout"]
    assert drop["rates"] == pytest.approx({"1": 0.0, "2": 0.2 * (2**0.5 - 1), "3": 0.2})
    assert drop["rows"]["3"] > 0 and 0.05 < drop["dropped_share"]["3"] < 0.4
    assert m["layer_weights"] == pytest.approx({"1": 0.1, "2": 0.3, "3": 0.6})
    assert m["ppl"] < 64  # learned something on a 64-token vocabulary


def test_resume_with_layer_dropout_is_bit_for_bit(tmp_path: Path) -> None:
    cfg = [*RUN, "train.max_epochs=3", "train.patience=5", "loss_weights.curriculum=gradual", "model.dropout=0.1"]
    run(compose(cfg), tmp_path / "full")
    with pytest.raises(Interrupted):
        run(compose([*cfg, *interrupt_after(1)]), tmp_path / "cut")
    run(compose([*cfg, "resume=true"]), tmp_path / "cut")
    full, resumed = read(tmp_path / "full"), read(tmp_path / "cut")
    assert strip_timing(full) == strip_timing(resumed)
    assert full["curriculum"]["total_steps"] == full["training"]["steps_run"]
    run(compose([*cfg, "layer_dropout=none"]), tmp_path / "nodrop")  # the drops really reach training
    assert read(tmp_path / "nodrop")["ppl"] != full["ppl"]


def test_one_step_on_a_tiny_hf_llama(tmp_path: Path) -> None:
    run(compose([*RUN, "model=hf_tiny_llama", "model.dim=32", "train.max_steps=1", "train.eval_batches=1"]), tmp_path)
    m = read(tmp_path)
    assert m["training"]["steps_run"] == 1 and m["ppl"] > 1
    assert m["curriculum"]["active_steps"] == {"1": 1, "2": 0, "3": 1}
    assert m["layer_dropout"]["rows"]["3"] > 0


@pytest.mark.slow  # torchrun with 2 processes: ~20 s
def test_layerskip_under_ddp(tmp_path: Path) -> None:
    from test_distributed import torchrun

    args = [*RUN, "train.max_steps=6", "train.eval_every=3", "train.patience=5", f"hydra.run.dir={tmp_path}"]
    proc = torchrun(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read(tmp_path)
    assert m["training"]["world_size"] == 2 and m["curriculum"]["steps"] == 6
    assert m["curriculum"]["active_steps"] == {"1": 4, "2": 4, "3": 6}
    assert m["layer_dropout"]["rows"]["3"] > 0
