"""Everything runs through the backbone protocol: a backbone that offers nothing but the protocol trains,
evaluates, decodes, routes with skipping and goes through ASHEM exactly like the native model.

`ProtocolOnly` wraps an `EarlyExitTransformer` and exposes only the protocol's methods and attributes (no
`layers`, `embedding`, `rope`, `dim`, ...), so any code that reached past the protocol would fail here. Its
`layer(..., active=)` is the protocol's plain fallback, written in the test: compute every token, keep the
inactive ones' input state. The results must equal the native model's, which implements `active` itself.
"""

from collections.abc import Sequence

import pytest
import torch
from conftest import between, peaky_model, random_batches
from torch import nn
from torch.testing import assert_close

from ease import ASHEMConfig, EarlyExitDecoder, EarlyExitTransformer, Trainer, TrainingConfig, run_ashem
from ease.data import TokenBatches
from ease.inference.routed_eval import skip_routed_forward
from ease.losses import uniform
from ease.model import Backbone
from ease.routing import max_prob

V = 40


class ProtocolOnly(nn.Module):
    """The protocol, and nothing else, of a native model."""

    def __init__(self, inner: EarlyExitTransformer) -> None:
        super().__init__()
        self.inner = inner

    num_layers = property(lambda self: self.inner.num_layers)
    vocab_size = property(lambda self: self.inner.vocab_size)
    exit_layers = property(lambda self: self.inner.exit_layers)
    routing_thresholds = property(lambda self: self.inner.routing_thresholds)
    confidence = property(lambda self: self.inner.confidence)

    def embed(self, ids: torch.Tensor, pos: int = 0) -> torch.Tensor:
        return self.inner.embed(ids, pos)

    def layer(self, i: int, h: torch.Tensor, pos: int = 0, cache=None, active: torch.Tensor | None = None):
        out = self.inner.layer(i, h, pos, cache)  # every token; the cache gets every token's K/V from h
        return out if active is None else torch.where(active[..., None], out, h)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.unembed(h)

    def new_cache(self, batch_size: int, max_len: int):
        return self.inner.new_cache(batch_size, max_len)

    def crop_cache(self, cache, length: int) -> None:
        self.inner.crop_cache(cache, length)

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        return self.inner.param_groups()

    def extended(self, num_layers: int) -> "ProtocolOnly":
        return ProtocolOnly(self.inner.extended(num_layers))

    def set_routing(self, exit_layer: int | Sequence[int], routing_threshold: float | Sequence[float]) -> None:
        self.inner.set_routing(exit_layer, routing_threshold)

    def config_dict(self) -> dict:
        return self.inner.config_dict()


def native(layers: int = 3, seed: int = 0, **kwargs) -> EarlyExitTransformer:
    torch.manual_seed(seed)
    return EarlyExitTransformer(V, 16, layers, num_heads=2, **kwargs)


def test_the_wrapper_is_a_backbone_without_native_internals() -> None:
    view = ProtocolOnly(native())
    assert isinstance(view, Backbone)
    for internal in ("layers", "embedding", "rope", "norm", "output_head", "dim", "hidden_states"):
        assert not hasattr(view, internal)


def test_training_and_evaluation_match_the_native_model() -> None:
    config = TrainingConfig(layer_weights=uniform(3), exit_layer=1, routing_threshold=0.05)
    train, val = random_batches(V, n=4, seed=1), random_batches(V, n=2, seed=2)
    results = []
    for wrap in (False, True):
        model = native()
        model = ProtocolOnly(model) if wrap else model
        trainer = Trainer(config, V, total_epochs=2)
        optimizer = trainer.create_optimizer(model, 1e-2)
        assert [g["name"] for g in optimizer.param_groups] == ["embedding", "layer_1", "layer_2", "layer_3", "head"]
        fit = trainer.train_with_early_stopping(model, train, val, optimizer, max_epochs=2, patience=2, verbose=False)
        ev = trainer.evaluate(model, val, thresholds=[0.03, 0.05, 0.1])
        results.append((fit["history"], ev))
    (h_native, ev_native), (h_view, ev_view) = results
    for a, b in zip(h_native, h_view):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    assert ev_native["ppl"] == ev_view["ppl"] and ev_native["threshold_analysis"] == ev_view["threshold_analysis"]


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
def test_skip_routing_and_decoding_match_the_native_model(kv_mode: str) -> None:
    model = peaky_model(V, 16, 4, 2)
    view = ProtocolOnly(model)
    x = torch.randint(0, V, (3, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(x, [1, 2])
    exits = [1, 2]
    thresholds = [between(max_prob(logits[1]), 0.6, gap=1e-4), between(max_prob(logits[2]), 0.5, gap=1e-4)]
    a = skip_routed_forward(model, x, exits, thresholds, kv_mode)  # the native model's own `active` path
    b = skip_routed_forward(view, x, exits, thresholds, kv_mode)  # the protocol's plain fallback
    assert (a.exit_layer < 4).any() and (a.exit_layer == 4).any()
    assert torch.equal(a.exit_layer, b.exit_layer)
    assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)

    outs = []
    for m in (model, view):
        dec = EarlyExitDecoder(m, 3, 14, exits, thresholds, kv_mode)
        dec.prefill(x[:, :4])
        steps = [dec.step(x[:, t]) for t in range(4, 14)]
        outs.append((torch.stack([s.exit_layer for s in steps]), torch.stack([s.logits for s in steps])))
    assert torch.equal(outs[0][0], outs[1][0]) and (outs[0][0] < 4).any()
    assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_ashem_on_a_protocol_only_backbone_matches_the_native_model() -> None:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (3000,), generator=g)
    train = TokenBatches(ids[:2400], seq_len=16, batch_size=8, shuffle=True, seed=0)
    val = TokenBatches(ids[2400:], seq_len=16, batch_size=8)
    config = ASHEMConfig(phase1_layers=2, phase2_layers=4, hard_example_ratio=0.5, max_epochs=2, phase2_lr=1e-3)
    results = []
    for wrap in (False, True):
        block1 = native(2, exit_layer=2)
        block1 = ProtocolOnly(block1) if wrap else block1
        results.append(run_ashem(config, block1, train, val, batch_size=8, verbose=False))
    a, b = results
    assert isinstance(b.model, ProtocolOnly) and b.model.num_layers == 4
    assert a.frozen_params_unchanged and b.frozen_params_unchanged
    assert a.threshold == b.threshold and a.hard_examples.num_hard_tokens == b.hard_examples.num_hard_tokens
    assert a.phase2["history"][-1]["train_loss"] == pytest.approx(b.phase2["history"][-1]["train_loss"], rel=1e-6)
    assert a.final["ppl"] == pytest.approx(b.final["ppl"], rel=1e-6)
    assert a.final["shallow_ratio"] == b.final["shallow_ratio"]
