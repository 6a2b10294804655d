"""EarlyExitTransformer: what forward computes, what it skips, tied weights, aliases and routed_forward."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import between, peaky_model
from torch.testing import assert_close

from ease import (
    DEEDTransformer,
    DeepSupervisionTransformer,
    EarlyExitTransformer,
    StandardTransformer,
)
from ease.model.backbone import run_layers

V, D, L, H = 50, 16, 3, 2


@pytest.fixture
def model() -> EarlyExitTransformer:
    return peaky_model(V, D, L, H)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(1))


def manual_all_layers(model: EarlyExitTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Plain re-implementation: embed, each block in turn, shared norm + head after every block."""
    h = model.embedding(x)
    cos, sin = model.rope(0, x.shape[1])
    out = []
    for block in model.layers:
        h = block(h, cos, sin)
        out.append(model.output_head(model.norm(h)))
    return out


class CallCounter:
    """Counts forward calls of modules (and records the leading dims of their inputs)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.calls: Counter = Counter()
        self.shapes: dict[str, list[tuple]] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.calls[name] += 1
            self.shapes[name].append(tuple(inputs[0].shape))

        return hook

    def reset(self) -> None:
        self.calls.clear()
        for v in self.shapes.values():
            v.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_counter(model: EarlyExitTransformer) -> CallCounter:
    mods = {f"layer{i}": block for i, block in enumerate(model.layers, start=1)}
    mods["head"] = model.output_head
    return CallCounter(mods)


# --- forward ----------------------------------------------------------------------------------------------


def test_forward_returns_last_layer_logits(model, x):
    out = model(x)
    assert out.shape == (4, 12, V)
    assert_close(out, manual_all_layers(model, x)[-1])


def test_forward_with_exit_layers_returns_exactly_those(model, x):
    out = model(x, exit_layers=[1, 3])
    assert isinstance(out, dict)
    assert sorted(out) == [1, 3]
    all_layers = model.forward_all_layers(x)
    assert len(all_layers) == L
    assert_close(out[1], all_layers[0])
    assert_close(out[3], all_layers[2])
    manual = manual_all_layers(model, x)
    for got, want in zip(all_layers, manual):
        assert got.shape == (4, 12, V)
        assert_close(got, want)
    # The exits really differ (the test would not notice a swapped layer otherwise).
    assert (all_layers[0] - all_layers[2]).abs().max() > 1e-3


def test_forward_accepts_any_iterable_and_duplicates(model, x):
    out = model(x, exit_layers=(layer for layer in [2, 2, 1]))
    assert sorted(out) == [1, 2]
    assert_close(out[2], manual_all_layers(model, x)[1])


@pytest.mark.parametrize(
    ("exits", "expected_layers", "expected_heads"),
    [
        ([1], [1, 0, 0], 1),
        ([2], [1, 1, 0], 1),
        ([1, 2], [1, 1, 0], 2),
        ([1, 3], [1, 1, 1], 2),
        (None, [1, 1, 1], 1),
    ],
)
def test_forward_runs_only_needed_blocks_and_heads(model, x, exits, expected_layers, expected_heads):
    counter = layer_counter(model)
    model(x, exits)
    assert [counter.calls[f"layer{i}"] for i in range(1, L + 1)] == expected_layers
    assert counter.calls["head"] == expected_heads
    counter.remove()


def test_forward_all_layers_runs_each_block_once(model, x):
    counter = layer_counter(model)
    model.forward_all_layers(x)
    assert [counter.calls[f"layer{i}"] for i in range(1, L + 1)] == [1, 1, 1]
    assert counter.calls["head"] == L
    counter.remove()


@pytest.mark.parametrize("bad", [[0], [4], [1, 5], []])
def test_forward_rejects_layers_outside_the_model(model, x, bad):
    with pytest.raises(ValueError, match="exit_layers"):
        model(x, bad)


def test_hidden_states_and_run_layers_compose(model, x):
    hs = model.hidden_states(x, [1, 3])
    assert_close(run_layers(model, hs[1], 1, 3), hs[3])
    assert_close(model.unembed(hs[3]), model(x))


# --- tied weights ------------------------------------------------------------------------------------------


def test_tie_weights_shares_the_tensor():
    torch.manual_seed(0)
    tied = EarlyExitTransformer(V, D, L, num_heads=H, tie_weights=True)
    untied = EarlyExitTransformer(V, D, L, num_heads=H)
    assert tied.output_head.weight is tied.embedding.weight
    assert tied.output_head.weight.data_ptr() == tied.embedding.weight.data_ptr()
    assert untied.output_head.weight is not untied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == V * D
    # A training step moves the shared tensor in both roles.
    opt = torch.optim.SGD(tied.parameters(), lr=0.1)
    x = torch.randint(0, V, (2, 6))
    loss = F.cross_entropy(tied(x).reshape(-1, V), x.reshape(-1))
    loss.backward()
    opt.step()
    assert tied.output_head.weight is tied.embedding.weight
    assert_close(tied.output_head.weight, tied.embedding.weight)
    assert tied.embedding.weight.grad is not None


# --- the seeds' names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [StandardTransformer, DeepSupervisionTransformer, DEEDTransformer])
def test_aliases_accept_seed_signature(cls):
    torch.manual_seed(0)
    m = cls(vocab_size=V, dim=D, num_layers=L, num_heads=H, exit_layer=2, routing_threshold=0.8)
    assert isinstance(m, EarlyExitTransformer)
    assert (m.vocab_size, m.dim, m.num_layers, m.num_heads) == (V, D, L, H)
    assert m.exit_layer == 2
    assert m.routing_threshold == pytest.approx(0.8)
    assert m.exit_layers == (2,)
    assert len(m.layers) == L
    x = torch.randint(0, V, (2, 5))
    assert m(x).shape == (2, 5, V)


@pytest.mark.parametrize("cls", [StandardTransformer, DeepSupervisionTransformer, DEEDTransformer])
def test_aliases_with_seed_defaults(cls):
    m = cls(vocab_size=1000, dim=64, num_layers=3)
    assert m.num_heads == 4
    assert m.exit_layer == 1
    assert m.output_head.out_features == 1000
    assert len(m.layers) == 3


def test_standard_transformer_defaults_to_no_routing():
    m = StandardTransformer(V, D, L, num_heads=H)
    assert m.routing_threshold == 0.0


# --- routed_forward ---------------------------------------------------------------------------------------


def test_routed_forward_threshold_zero_is_the_last_layer(model, x):
    counter = layer_counter(model)
    out = model.routed_forward(x, exit_layer=1, routing_threshold=0.0)
    assert counter.calls["head"] == 1  # no exit is active: only the last head runs
    counter.remove()
    assert_close(out.logits, model(x))
    assert out.exit_layer.shape == (4, 12)
    assert out.exit_layer.dtype == torch.long
    assert (out.exit_layer == L).all()


def test_routed_forward_uses_model_routing_by_default(model, x):
    out = model.routed_forward(x)  # default threshold 0.0
    assert (out.exit_layer == L).all()
    conf = F.softmax(model(x, [1])[1], -1).amax(-1)
    model.set_routing(1, 1e-9)
    out = model.routed_forward(x)
    assert (out.exit_layer == 1).all()
    assert_close(out.logits, model(x, [1])[1])
    t = between(conf, 0.5)
    model.set_routing(1, t)
    assert_close(model.routed_forward(x).exit_layer, torch.where(conf >= t, 1, L))


def test_routed_forward_matches_per_token_choice(model, x):
    all_layers = manual_all_layers(model, x)
    conf = F.softmax(all_layers[0], -1).amax(-1)  # (B, T)
    t = between(conf, 0.5)
    out = model.routed_forward(x, exit_layer=1, routing_threshold=t)
    B, T = x.shape
    n_shallow = 0
    for b in range(B):
        for i in range(T):
            layer = 1 if conf[b, i] >= t else L
            n_shallow += layer == 1
            assert out.exit_layer[b, i].item() == layer
            assert_close(out.logits[b, i], all_layers[layer - 1][b, i])
    assert 0 < n_shallow < B * T  # both routes happen


def test_routed_forward_cascade(x):
    m = peaky_model(V, D, 4, H)
    all_layers = manual_all_layers(m, x)
    c1, c2 = (F.softmax(all_layers[i], -1).amax(-1) for i in (0, 1))
    t1, t2 = between(c1, 0.7), between(c2, 0.4)
    out = m.routed_forward(x, exit_layer=[1, 2], routing_threshold=[t1, t2])
    expected = torch.where(c1 >= t1, 1, torch.where(c2 >= t2, 2, 4))
    assert set(expected.unique().tolist()) == {1, 2, 4}
    assert_close(out.exit_layer, expected)
    for layer in (1, 2, 4):
        chosen = expected == layer
        assert_close(out.logits[chosen], all_layers[layer - 1][chosen])


# --- construction -----------------------------------------------------------------------------------------


def test_constructor_validates_routing():
    with pytest.raises(ValueError, match="exit_layer"):
        EarlyExitTransformer(V, D, L, num_heads=H, exit_layer=3, routing_threshold=0.5)  # active exit at last layer
    with pytest.raises(ValueError, match="num_heads"):
        EarlyExitTransformer(V, 18, L, num_heads=4)


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    m = EarlyExitTransformer(V, 32, 4, num_heads=2)
    std_proj = torch.cat([b.attn.proj.weight.flatten() for b in m.layers]).std().item()
    std_qkv = torch.cat([b.attn.qkv.weight.flatten() for b in m.layers]).std().item()
    assert std_proj == pytest.approx(0.02 / (2 * 4) ** 0.5, rel=0.1)
    assert std_qkv == pytest.approx(0.02, rel=0.1)
