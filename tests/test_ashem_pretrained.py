"""ASHEM on a pretrained model (`phase1="skip"`): layers 1..k of the given L-layer model are Block 1, frozen as
they are; no phase 1, no growth; the threshold comes from layer k; layers k+1..L train on the hard tokens."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose

from ease import EarlyExitTransformer
from ease.app.train_task import validate
from ease.config import create_standard_config
from ease.data import DataConfig, build_data
from ease.strategies import StrategyConfig
from ease.strategies.ashem import ASHEMConfig, check_resume_mode, run_ashem
from ease.training.trainer import Trainer

V, DIM, L, K = 64, 32, 4, 2
FROZEN = ("embedding", "layer_1", "layer_2", "head")


def tiny_data():
    cfg = DataConfig(name="synthetic", synthetic_tokens=6000, synthetic_vocab_size=V, seq_len=16, batch_size=16)
    return build_data(cfg, seed=0)


def make_model(seed: int = 0) -> EarlyExitTransformer:
    torch.manual_seed(seed)
    return EarlyExitTransformer(V, DIM, L, num_heads=2, dropout=0.1)


def skip_config(**kwargs) -> ASHEMConfig:
    base = {"phase1": "skip", "phase1_layers": K, "phase2_layers": L, "max_epochs": 3, "phase2_lr": 3e-3}
    return ASHEMConfig(**{**base, "phase2_patience": 3, **kwargs})


def group_values(model) -> dict[str, list[torch.Tensor]]:
    return {name: [p.detach().clone() for p in params] for name, params in model.param_groups()}


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not str(k).endswith(("time_s", "tokens_per_s"))}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


@pytest.fixture(scope="module")
def pretrained():
    """A 4-layer model trained one epoch as a standard LM (loss at layer L): the "pretrained" model."""
    data = tiny_data()
    model = make_model()
    trainer = Trainer(create_standard_config(L), V)
    trainer.train_epoch(model, data.train, trainer.create_optimizer(model, 3e-3), epoch=0)
    return data, copy.deepcopy(model.state_dict())


@pytest.fixture(scope="module")
def skip_run(pretrained):
    data, weights = pretrained
    model = make_model(seed=1)
    model.load_state_dict(weights)
    before = group_values(model)
    progress = []

    def capture(p) -> None:  # the tensors in the state are live: copy them at once
        checkpoint = {"model": p.model.state_dict(), "train_state": p.state}
        progress.append((p.phase, p.phase_epoch, copy.deepcopy(checkpoint)))

    result = run_ashem(skip_config(), model, data.train, data.val, batch_size=8, verbose=False, on_epoch_end=capture)
    return data, model, before, progress, result


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"phase1": "bogus"}, r"^phase1: must be one of train, skip, got 'bogus'$"),
        ({"phase1": "skip", "phase2_train_head": True}, r"^phase2_train_head: must be false with phase1=skip \("),
    ],
)
def test_bad_phase1_settings_fail_with_one_line(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as err:
        ASHEMConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_strategy_group_carries_phase1_and_names_the_hydra_key() -> None:
    assert StrategyConfig(name="ashem", phase1="skip").ashem().phase1 == "skip"
    assert StrategyConfig(name="ashem").ashem().phase1 == "train"
    with pytest.raises(ValueError, match=r"^strategy\.phase1: must be one of train, skip, got 'bogus'$"):
        StrategyConfig(name="ashem", phase1="bogus")
    with pytest.raises(ValueError, match=r"^strategy\.phase2_train_head: must be false with strategy\.phase1=skip "):
        StrategyConfig(name="ashem", phase1="skip", phase2_train_head=True)
    cfg = compose(["+preset=ashem", "strategy.phase1=skip"])
    assert cfg.strategy.phase1 == "skip"
    validate(cfg)
    with pytest.raises(ValueError, match=r"^strategy\.phase1: "):
        validate(compose(["+preset=ashem", "strategy.phase1=bogus"]))


def test_skip_needs_a_model_of_phase2_layers(pretrained) -> None:
    data, _ = pretrained
    torch.manual_seed(0)
    block1 = EarlyExitTransformer(V, DIM, K, num_heads=2)
    with pytest.raises(ValueError, match=r"^phase2_layers: with phase1=skip .* it has 2 layers, expected 4$") as err:
        run_ashem(skip_config(), block1, data.train, data.val, verbose=False)
    assert "\n" not in str(err.value)


def test_resume_refuses_the_other_phase1_mode(pretrained) -> None:
    data, _ = pretrained
    skip_state = {"train_state": {"strategy": "ashem", "phase": 2, "phase1": {"skipped": True}}}
    torch.manual_seed(0)
    block1 = EarlyExitTransformer(V, DIM, K, num_heads=2)
    train = ASHEMConfig(phase1_layers=K, phase2_layers=L)
    with pytest.raises(ValueError, match=r"^resume: .* phase1=skip run, this run is phase1=train$"):
        run_ashem(train, block1, data.train, data.val, verbose=False, resume=skip_state)
    for state in ({"strategy": "ashem", "phase": 1}, {"strategy": "ashem", "phase": 2, "phase1": {}}):
        with pytest.raises(ValueError, match=r"^resume: .*phase1=train run, this run is phase1=skip$"):
            run_ashem(skip_config(), make_model(), data.train, data.val, verbose=False, resume={"train_state": state})
        with pytest.raises(ValueError, match=r"^resume: .*phase1=train run, this run is phase1=skip$"):
            check_resume_mode(skip_config(), state)  # what an app calls before comparing architectures
    check_resume_mode(skip_config(), skip_state["train_state"])
    check_resume_mode(train, None)


# --- the run ------------------------------------------------------------------------------------------------------


def test_frozen_block_bit_identical_upper_layers_trained_no_growth(skip_run) -> None:
    _, model, before, _, result = skip_run
    assert result.model is model and result.phase1_model is model
    assert model.num_layers == L and len(model.param_groups()) == L + 2
    after = group_values(model)
    for name in FROZEN:
        assert all(torch.equal(a, b) for a, b in zip(after[name], before[name])), f"{name} moved"
    for name in ("layer_3", "layer_4"):
        assert any(not torch.equal(a, b) for a, b in zip(after[name], before[name])), f"{name} did not train"
    assert result.frozen_params_unchanged
    assert result.phase2["frozen"] == list(FROZEN)
    assert result.phase2["trainable_parameters"] == sum(p.numel() for n in ("layer_3", "layer_4") for p in after[n])
    assert all(p.requires_grad for p in model.parameters())  # a normal, trainable module again
    assert (model.exit_layers, model.routing_thresholds) == ((K,), (result.threshold,))


def test_threshold_is_the_quantile_of_layer_k_max_prob(pretrained, skip_run) -> None:
    """Plain re-implementation: the pretrained weights, layers 1..k by hand, unembed, softmax max, torch.quantile,
    over the training batches (the default source since issue 14; a skipped phase 1 leaves them at epoch 0)."""
    data, weights = pretrained
    _, _, _, _, result = skip_run
    ref = make_model()
    ref.load_state_dict(weights)
    ref.eval()
    data.train.set_epoch(0)
    with torch.no_grad():
        confs = []
        for x, _ in data.train:
            h = ref.embed(x)
            for i in range(1, K + 1):
                h = ref.layer(i, h)
            confs.append(F.softmax(ref.unembed(h), -1).amax(-1).reshape(-1))
    conf = torch.cat(confs).double()
    assert result.threshold == pytest.approx(torch.quantile(conf, 0.5).item(), abs=1e-12)
    assert result.hard_examples.num_tokens == conf.numel()
    assert result.hard_examples.hard_ratio == pytest.approx((conf < result.threshold).double().mean().item())
    assert abs(result.hard_examples.hard_ratio - 0.5) <= 0.02
    assert result.final["shallow_ratio"] == pytest.approx(1 - result.val_examples.hard_ratio, abs=0.01)


def test_phase1_record_is_skipped_with_layer_k_metrics(pretrained, skip_run) -> None:
    data, weights = pretrained
    _, _, _, _, result = skip_run
    p1 = result.phase1
    assert p1["skipped"] is True
    assert (p1["history"], p1["epochs_run"], p1["best_epoch"]) == ([], 0, 0)
    ref = make_model()
    ref.load_state_dict(weights)
    ref.eval()
    with torch.no_grad():
        logits = torch.cat([ref(x, [K])[K].reshape(-1, V) for x, _ in data.val])
        targets = torch.cat([y.reshape(-1) for _, y in data.val])
    loss = F.cross_entropy(logits, targets).item()
    assert p1["metrics"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert p1["metrics"]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert p1["metrics"]["acc"] == pytest.approx((logits.argmax(-1) == targets).double().mean().item())
    assert p1["metrics"]["per_exit"][K]["loss"] == p1["metrics"]["loss"]
    # Only phase-2 positions are counted; the state holds no second copy of the model.
    assert result.trained_positions == result.phase2["num_positions_per_epoch"] * result.phase2["epochs_run"] > 0
    assert "phase1_model" not in result.state and result.state["phase1"]["skipped"] is True
    assert result.phase2["epochs_run"] == 3


def test_resume_from_each_phase2_epoch_matches_uninterrupted_run(skip_run) -> None:
    data, model, _, progress, result = skip_run
    assert [(phase, epoch) for phase, epoch, _ in progress] == [(2, 1), (2, 2), (2, 3)]
    for _, epoch, checkpoint in progress[:-1]:
        assert "phase1_model" not in checkpoint["train_state"]
        fresh = make_model(seed=7 + epoch)  # other weights: the checkpoint's replace them
        resumed = run_ashem(skip_config(), fresh, data.train, data.val, batch_size=8, verbose=False, resume=checkpoint)
        assert resumed.threshold == result.threshold
        assert without_timing(resumed.final) == without_timing(result.final), f"resumed after epoch {epoch}"
        assert without_timing(resumed.phase2) == without_timing(result.phase2)
        assert without_timing(resumed.phase1) == without_timing(result.phase1)
        assert resumed.trained_positions == result.trained_positions
        assert resumed.frozen_params_unchanged
        for name, value in resumed.model.state_dict().items():
            assert torch.equal(value, model.state_dict()[name]), name


# --- phase1="train" is unchanged -----------------------------------------------------------------------------------


def test_phase1_train_still_trains_and_grows_block1() -> None:
    data = tiny_data()
    torch.manual_seed(0)
    block1 = EarlyExitTransformer(V, DIM, K, num_heads=2)
    config = ASHEMConfig(phase1_layers=K, phase2_layers=L, max_epochs=1)
    assert config.phase1 == "train"
    result = run_ashem(config, block1, data.train, data.val, batch_size=8, verbose=False)
    assert result.phase1_model is block1 and block1.num_layers == K
    assert result.model is not block1 and result.model.num_layers == L
    assert result.phase1["epochs_run"] == 1 and "skipped" not in result.phase1
    assert "phase1_model" in result.state
    phase1_tokens = sum(row["train_tokens"] for row in result.phase1["history"])
    assert result.trained_positions == phase1_tokens + result.phase2["num_positions_per_epoch"]
