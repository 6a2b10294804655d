"""Token-routed training (seed 000): routes, the collapse guard, gradients only through each token's route."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batches
from torch.testing import assert_close

from ease import EarlyExitTransformer
from ease.losses import route_tokens, token_routed_loss
from ease.strategies.token_routed import TokenRoutedTrainer, TokenRoutedTransformer, token_routed_config

V = 40


def make_model(num_layers: int = 3, seed: int = 0, **kwargs) -> TokenRoutedTransformer:
    torch.manual_seed(seed)
    return TokenRoutedTransformer(V, 16, num_layers, num_heads=2, **kwargs)


def batch(seed: int = 0, b: int = 4, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    return random_batches(V, 1, b, t, seed)[0]


def sharpen(model: EarlyExitTransformer, scale: float = 30.0) -> None:
    """Large head weights so confidences spread over (0, 1) and some tokens pass a mid threshold."""
    with torch.no_grad():
        model.output_head.weight.mul_(scale)


def reference_mask(model: EarlyExitTransformer, x: torch.Tensor, exit_layer: int, threshold: float, f: float):
    """The route rule written out: threshold, then the guard by sorting (independent of route_tokens)."""
    with torch.no_grad():
        conf = F.softmax(model(x, [exit_layer])[exit_layer].float(), -1).amax(-1).reshape(-1)
    n = conf.numel()
    m = math.ceil(f * n) if f > 0 else 0
    mask = conf >= threshold
    order = conf.argsort(descending=True)
    if mask.sum() < m:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[:m]] = True
    elif (~mask).sum() < m:
        mask = torch.ones(n, dtype=torch.bool)
        mask[order[n - m :]] = False
    return mask


# --- the route rule -----------------------------------------------------------------------------------------


def test_route_by_threshold_without_guard() -> None:
    conf = torch.tensor([0.1, 0.7, 0.69, 0.95, 0.3])
    d = route_tokens(conf, 0.7, 0.0)
    assert d.exit_mask.tolist() == [False, True, False, True, False]
    assert d.forced_exit == d.forced_deep == 0


def test_guard_sends_the_most_confident_to_an_empty_exit() -> None:
    conf = torch.tensor([0.01, 0.05, 0.02, 0.04, 0.03, 0.06, 0.001, 0.002, 0.003, 0.004])
    d = route_tokens(conf, 0.7, 0.2)  # nobody reaches 0.7; ceil(0.2 * 10) = 2 must exit
    assert d.exit_mask.nonzero().squeeze(1).tolist() == [1, 5]
    assert d.forced_exit == 2 and d.forced_deep == 0


def test_guard_keeps_the_least_confident_on_the_deep_route() -> None:
    conf = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.5])
    d = route_tokens(conf, 0.7, 0.25)  # one token deep by threshold; ceil(2.5) = 3 must be deep
    assert (~d.exit_mask).nonzero().squeeze(1).tolist() == [7, 8, 9]
    assert d.forced_deep == 2 and d.forced_exit == 0


def test_guard_is_silent_when_both_routes_are_large_enough() -> None:
    conf = torch.linspace(0.0, 1.0, 20)
    d = route_tokens(conf, 0.5, 0.1)
    assert torch.equal(d.exit_mask, conf >= 0.5) and d.forced_exit == d.forced_deep == 0


# --- the loss and its gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "fraction"), [(0.3, 0.0), (0.3, 0.2), (0.99, 0.25)])
def test_loss_and_gradients_equal_the_masked_reference(threshold: float, fraction: float) -> None:
    """Parameter gradients equal those of where(route, CE at exit, CE at last layer).mean() over full logits."""
    model = make_model()
    sharpen(model)
    x, y = batch()
    mask = reference_mask(model, x, 1, threshold, fraction)
    assert 0 < mask.sum() < mask.numel()  # both routes in use, so the check means something

    result = token_routed_loss(model, x, y, 1, threshold, fraction)
    assert torch.equal(result.decision.exit_mask, mask)
    result.loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logits = model(x, [1, 3])
    ce = {layer: F.cross_entropy(logits[layer].reshape(-1, V), y.reshape(-1), reduction="none") for layer in (1, 3)}
    reference = torch.where(mask, ce[1], ce[3]).mean()
    reference.backward()
    assert result.loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert_close(got[name], p.grad, msg=name)


def test_gradients_reach_only_each_tokens_own_route() -> None:
    """Hooks: exit logits of deep tokens and last-layer states of exiting tokens get exactly zero gradient."""
    model = make_model()
    sharpen(model)
    x, y = batch(seed=1)
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output):
            if name not in captured:  # the first head call scores every token at the exit layer
                output.retain_grad()
                captured[name] = output
            if name == "last":
                output.retain_grad()
                captured[name] = output

        return hook

    handles = [
        model.output_head.register_forward_hook(keep("exit_logits")),
        model.layers[-1].register_forward_hook(keep("last")),
    ]
    result = token_routed_loss(model, x, y, 1, 0.3, 0.0)
    for h in handles:
        h.remove()
    result.loss.backward()
    on_exit = result.decision.exit_mask
    assert 0 < on_exit.sum() < on_exit.numel()
    exit_grad = captured["exit_logits"].grad  # (N, V)
    last_grad = captured["last"].grad.reshape(on_exit.numel(), -1)  # (N, C): last block output
    assert bool((exit_grad[~on_exit] == 0).all()) and bool((exit_grad[on_exit].abs().sum(-1) > 0).all())
    assert bool((last_grad[on_exit] == 0).all()) and bool((last_grad[~on_exit].abs().sum(-1) > 0).all())


def test_all_deep_is_the_standard_lm_and_all_exit_leaves_upper_layers_without_gradient() -> None:
    model = make_model()
    x, y = batch(seed=2)
    deep = token_routed_loss(model, x, y, 1, 1.0, 0.0)  # untrained: nobody reaches 1.0
    assert not deep.decision.exit_mask.any()
    assert deep.loss.item() == pytest.approx(F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).item(), rel=1e-6)

    model.zero_grad(set_to_none=True)
    shallow = token_routed_loss(model, x, y, 1, 1e-9, 0.0)  # everyone exits at layer 1
    shallow.loss.backward()
    assert shallow.decision.exit_mask.all()
    assert all(p.grad is None or not p.grad.any() for p in model.layers[1:].parameters())
    assert model.layers[0].attn.qkv.weight.grad.abs().sum() > 0


def test_collapse_guard_trains_an_exit_no_token_trusts() -> None:
    """Untrained, max softmax ~ 1/V < 0.7: without the guard the exit gets no loss, with it ceil(f·N) tokens."""
    model = make_model()
    x, y = batch(seed=3)
    off = token_routed_loss(model, x, y, 1, 0.7, 0.0)
    off.loss.backward()
    assert not off.decision.exit_mask.any()
    model.zero_grad(set_to_none=True)
    on = token_routed_loss(model, x, y, 1, 0.7, 0.1)
    assert int(on.decision.exit_mask.sum()) == math.ceil(0.1 * y.numel())
    assert on.decision.forced_exit == math.ceil(0.1 * y.numel())


# --- model, trainer, bad input ------------------------------------------------------------------------------


def test_trainer_records_routes_per_epoch_and_monitors_the_routed_loss() -> None:
    model = make_model(min_route_fraction=0.1)
    config = token_routed_config(3, exit_layer=1, routing_threshold=0.7)
    trainer = TokenRoutedTrainer(config, V, min_route_fraction=0.1)
    optimizer = trainer.create_optimizer(model, 3e-3)
    train = [batch(seed=s) for s in range(4)]
    val = [batch(seed=10 + s) for s in range(2)]
    result = trainer.train_with_early_stopping(model, train, val, optimizer, max_epochs=2, patience=5, verbose=False)
    assert len(result["history"]) == 2 and trainer.weight_history[0] == result["history"][0]["weights"]
    first = result["history"][0]
    # Untrained start: only the guard's tokens exit in the first epoch.
    assert first["route"]["exit_fraction"] == pytest.approx(math.ceil(0.1 * 48) / 48)
    assert first["weights"] == {1: first["route"]["exit_fraction"], 3: first["route"]["deep_fraction"]}
    ev = trainer.evaluate(model, val)
    assert ev["loss"] == ev["routed_loss"] and first["val_loss"] > 0
    assert model.token_routed_loss(*train[0]).loss.item() > 0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"exit_layer": [1, 2], "routing_threshold": 0.7}, r"^exit_layer: token-routed training takes one exit layer"),
        ({"routing_threshold": 0.0}, r"^routing_threshold: token-routed training needs a threshold in \(0, 1\]"),
        ({"min_route_fraction": 0.6}, r"^min_route_fraction: must be in \[0, 0.5\], got 0.6$"),
        ({"exit_layer": 3}, r"^exit_layer: must be in 1\.\.2 for a 3-layer model, got 3$"),
    ],
)
def test_bad_model_settings(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make_model(**kwargs)


def test_checkpoint_config_rebuilds_a_plain_early_exit_model() -> None:
    model = make_model(exit_layer=2, routing_threshold=0.6)
    plain = EarlyExitTransformer(**model.config_dict())
    plain.load_state_dict(model.state_dict())
    x, _ = batch()
    out_a, out_b = model.routed_forward(x), plain.routed_forward(x)
    assert torch.equal(out_a.exit_layer, out_b.exit_layer)
    assert_close(out_a.logits, out_b.logits)
