"""Mixture-of-Depths: routing against a plain per-row loop, capacity, the causal predictor, decoding, compute
counting, the auxiliary loss, checkpoints, the preset through the app, and one-line errors."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose
from hf_models import tiny

from ease.app.runner import run
from ease.checkpoint import load_checkpoint, save_checkpoint
from ease.config import TrainingConfig
from ease.inference.decoder import EarlyExitDecoder
from ease.losses import final_only
from ease.model.backbone import Backbone
from ease.model.mod import MixtureOfDepths, MoDConfig, MoDTransformer, capacity_tokens, mod_metrics
from ease.model.transformer import EarlyExitTransformer
from ease.training import Trainer

CAPACITY = [None, 0.5, 0.25]  # layer 1 unrouted, layers 2 and 3 routed


def native(seed: int = 0) -> EarlyExitTransformer:
    torch.manual_seed(seed)
    return EarlyExitTransformer(vocab_size=61, dim=32, num_layers=3, num_heads=4)


def wrapped(inner: Backbone, capacity=CAPACITY, weight: str = "raw", seed: int = 1) -> MixtureOfDepths:
    model = MixtureOfDepths(inner, capacity, weight=weight)
    torch.manual_seed(seed)
    for i in model.routers:  # scores of order one: a routing that matters, and a weight far from zero
        torch.nn.init.normal_(model.routers[i].weight, std=1.0)
        for p in model.predictors[i].parameters():
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def hf_llama() -> Backbone:
    return tiny("llama", vocab=61)


def plain_block(inner: Backbone, i: int, sub: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Block i on a (1, n, C) sub-sequence at `positions` (n,), written against each backbone's own modules."""
    if isinstance(inner, EarlyExitTransformer):
        cos, sin = inner.rope(0, int(positions.max()) + 1)
        return inner.layers[i - 1](sub, cos[positions], sin[positions])
    n = sub.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]  # causal in the sub-sequence's own order
    emb = inner._parts.rotary(sub, positions[None])
    return inner.layers[i - 1](sub, attention_mask=mask, position_ids=positions[None], position_embeddings=emb)


def plain_forward(model: MixtureOfDepths, x: torch.Tensor, mode: str = "topk") -> tuple[torch.Tensor, list]:
    """The routing as a loop over layers and rows: each row's chosen tokens (top k of the router scores, or the
    predictor's positive ones) run the block alone at their positions; x + r·(f(x) - x) for them, x for the rest."""
    inner = model.inner
    h = inner.embed(x)
    chosen_per_layer = []
    for i in range(1, inner.num_layers + 1):
        c = model.capacity[i - 1]
        if c is None:
            h = inner.layer(i, h)
            continue
        new = h.clone()
        layer_chosen = []
        for b in range(h.shape[0]):
            r = h[b] @ model.routers[str(i)].weight[0]  # (T,)
            if mode == "topk":
                idx = r.topk(capacity_tokens(c, h.shape[1])).indices.sort().values
            else:
                idx = (model.predictors[str(i)](h[b]) > 0).nonzero().squeeze(1)
            layer_chosen.append(idx)
            if idx.numel():
                sub = h[b, idx][None]
                y = plain_block(inner, i, sub, idx)
                new[b, idx] = sub[0] + r[idx, None] * (y[0] - sub[0])
        chosen_per_layer.append(layer_chosen)
        h = new
    return inner.unembed(h), chosen_per_layer


@pytest.mark.parametrize("backbone", ["native", "hf_llama"])
@pytest.mark.parametrize("mode", ["topk", "predictor"])
def test_routing_equals_a_plain_loop_over_rows(backbone: str, mode: str) -> None:
    model = wrapped(native() if backbone == "native" else hf_llama())
    model.inference = mode
    x = torch.randint(0, 61, (3, 13))
    with torch.no_grad():
        expected, chosen = plain_forward(model, x, mode)
        got = model(x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    if mode == "predictor":  # a predictor that picked all or nothing would test little
        n = sum(idx.numel() for layer in chosen for idx in layer)
        assert 0 < n < 2 * x.numel()


def test_skipped_tokens_are_unchanged_and_capacity_is_exact() -> None:
    model = wrapped(native())
    x = torch.randint(0, 61, (4, 11))
    with torch.no_grad():
        h = model.layer(1, model.embed(x))
        for i, c in ((2, 0.5), (3, 0.25)):
            out = model.layer(i, h)
            same = (out == h).all(-1)  # (B, T): tokens that skipped, bit for bit
            assert ((~same).sum(1) == capacity_tokens(c, 11)).all()  # 5 and 2 per row
            h = out
    assert capacity_tokens(0.5, 11) == 5 and capacity_tokens(0.25, 11) == 2 and capacity_tokens(0.01, 11) == 1


def test_sigmoid_weight_scales_the_update_by_sigma_r() -> None:
    raw, sig = wrapped(native(), weight="raw"), wrapped(native(), weight="sigmoid")
    h = torch.randn(2, 9, 32)
    with torch.no_grad():
        a, b = raw.layer(2, h), sig.layer(2, h)
        r = raw.routers["2"](h).squeeze(-1)  # (B, T), the same router in both
    moved = (a != h).any(-1)
    assert torch.equal(moved, (b != h).any(-1))
    torch.testing.assert_close(
        (b - h)[moved], ((a - h) * (torch.sigmoid(r) / r)[..., None])[moved], atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("backbone", ["native", "hf_llama"])
def test_predictor_routing_is_causal_and_top_k_is_not(backbone: str) -> None:
    model = wrapped(native() if backbone == "native" else hf_llama())
    x = torch.randint(0, 61, (2, 12))
    t = 8
    changed = x.clone()
    changed[:, t:] = (x[:, t:] + 17) % 61
    with torch.no_grad():
        model.inference = "predictor"
        a, b = model(x), model(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
        _, chosen_a = plain_forward(model, x, "predictor")
        _, chosen_b = plain_forward(model, changed, "predictor")
        for la, lb in zip(chosen_a, chosen_b):  # every earlier decision is the same
            assert all(torch.equal(ia[ia < t], ib[ib < t]) for ia, ib in zip(la, lb))
        model.inference = "topk"  # the training routing looks ahead: some such change moves earlier tokens
        a = model(x)
        moved = [
            not torch.allclose(a[:, :t], model(torch.cat((x[:, :t], (x[:, t:] + s) % 61), 1))[:, :t])
            for s in range(1, 9)
        ]
    assert any(moved)


@pytest.mark.parametrize("backbone", ["native", "hf_llama"])
def test_decoding_token_by_token_equals_the_predictor_forward(backbone: str) -> None:
    model = wrapped(native() if backbone == "native" else hf_llama())
    model.inference = "predictor"
    x = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        full = model(x)
    dec = EarlyExitDecoder(model, batch_size=2, max_len=16)
    prefill = dec.prefill(x[:, :4], return_layers=True)[3]
    steps = [dec.step(x[:, t]).logits for t in range(4, 10)]
    torch.testing.assert_close(prefill, full[:, :4], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=2e-5, rtol=1e-4)


def test_compute_cost_counts_the_token_layers_run() -> None:
    model = wrapped(native())
    x = torch.randint(0, 61, (3, 12))
    with torch.no_grad():
        model.reset_counts()
        model(x)
        assert model.counts == [3 * 12 + 3 * 6 + 3 * 3, 3 * 3 * 12]
        assert model.compute_cost == pytest.approx((12 + 6 + 3) / 36)
        model.inference = "predictor"
        model.reset_counts()
        model(x)
        _, chosen = plain_forward(model, x, "predictor")
    assert model.counts == [3 * 12 + sum(idx.numel() for layer in chosen for idx in layer), 108]
    metrics = mod_metrics(model, [(x, x)])
    assert metrics["compute_cost_topk"] == pytest.approx(21 / 36)
    n_predicted = sum(idx.numel() for layer in chosen for idx in layer)
    assert metrics["compute_cost_predictor"] == pytest.approx((36 + n_predicted) / 108)
    assert metrics["inference"] == "predictor" and model.inference == "predictor"


def test_auxiliary_loss_is_the_predictor_bce_on_detached_inputs_and_enters_the_objective() -> None:
    model = wrapped(native()).train()
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    trainer = Trainer(TrainingConfig(layer_weights=final_only(3)), 61)
    loss = trainer.batch_loss(model, x, y, {3: 1.0}).loss
    # The same pass by hand: CE at the last layer, plus the mean over routed layers of the predictor's BCE.
    h, bce = model.embed(x), []
    for i in range(1, 4):
        if model.capacity[i - 1] is not None:
            r = model.routers[str(i)](h).squeeze(-1)
            target = torch.zeros_like(r).scatter_(1, r.topk(capacity_tokens(model.capacity[i - 1], 10)).indices, 1.0)
            bce.append(F.binary_cross_entropy_with_logits(model.predictors[str(i)](h), target))
        h = model.layer(i, h)
    ce = F.cross_entropy(model.unembed(h).flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, ce + torch.stack(bce).mean(), atol=1e-6, rtol=1e-6)
    model.zero_grad()
    loss.backward()
    assert model.routers["2"].weight.grad.abs().sum() > 0  # the router learns through r·(f(x) - x)
    model.zero_grad()
    model(x).sum().backward()  # without the auxiliary term, the predictor gets no gradient (inputs detached)
    assert all(p.grad is None for p in model.predictors.parameters())
    assert model.inner.embedding.weight.grad is not None


def test_without_mod_the_objective_is_unchanged() -> None:
    model = native().train()
    x, y = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    trainer = Trainer(TrainingConfig(layer_weights=final_only(3)), 61)
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert torch.equal(trainer.batch_loss(model, x, y, {3: 1.0}).loss, expected)


def test_param_groups_hold_routers_and_checkpoint_round_trips(tmp_path: Path) -> None:
    model = wrapped(native())
    assert MoDTransformer is MixtureOfDepths and isinstance(model, Backbone)
    groups = dict(model.param_groups())
    assert all(any(p is q for q in groups["layer_2"]) for p in model.routers["2"].parameters())
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    save_checkpoint(tmp_path / "c.pt", model)
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    assert isinstance(loaded, MixtureOfDepths) and loaded.capacity == model.capacity
    x = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_preset_trains_and_evaluates_with_both_routings(tmp_path: Path) -> None:
    small = [*FAST, "data.synthetic_tokens=3000", "data.seq_len=16"]
    record = run(compose([*small, "+preset=mod"]), tmp_path / "train")
    assert record["status"] == "ok", record["error"]
    mod = record["metrics"]["mod"]
    assert mod["routed_layers"] == [2] and mod["compute_cost_topk"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert math.isfinite(mod["ppl_topk"]) and math.isfinite(mod["ppl_predictor"])
    assert mod["ppl_topk"] == pytest.approx(record["metrics"]["ppl"])
    evaluated = run(
        compose([*small, "task=eval", f"checkpoint={tmp_path / 'train'}", "mod.inference=predictor"]), tmp_path / "e"
    )
    assert evaluated["status"] == "ok", evaluated["error"]
    assert evaluated["metrics"]["ppl"] == pytest.approx(mod["ppl_predictor"])
    assert evaluated["metrics"]["mod"]["inference"] == "predictor"
    generated = run(
        compose([*small, "task=generate", f"checkpoint={tmp_path / 'train'}", "prompt=t1 t2 t3", "task.batch_size=2"]),
        tmp_path / "g",
    )
    assert generated["status"] == "ok", generated["error"]
    assert len(generated["metrics"]["token_ids"][0]) == 50 and 0 < generated["metrics"]["mod"]["compute_cost"] <= 1


def test_the_methods_grid_places_mod_at_its_causal_cost(tmp_path: Path, wikitext_dir: Path) -> None:
    # compare=grid (ease.comparison): MoD's cost is set by its capacity, not a threshold, so its one test evaluation,
    # with the causal predictor (top-k looks ahead), lands at the level nearest that cost and the others are marked.
    over = ["model=tiny", "data=wikitext2", "data.max_chars=20000", "train.max_epochs=1", "progress=false"]
    record = run(compose([*over, "+preset=mod", "compare=grid", "compare.decode_repeats=1"]), tmp_path / "run")
    assert record["status"] == "ok", record["error"]
    grid = record["metrics"]["compute_grid"]
    placed = [row for row in grid["levels"] if row["reachable"]]
    assert grid["fixed_cost"] and len(placed) == 1 and placed[0]["test"]["mod_inference"] == "predictor"
    cost = placed[0]["test"]["compute_cost"]
    levels = [row["target"] for row in grid["levels"]]
    assert placed[0]["target"] == min(levels, key=lambda level: (abs(level - cost), level))
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert isinstance(model, MixtureOfDepths) and 0 < cost <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0.0}, "mod.capacity: must be in (0, 1]"),
        ({"capacity": 1.5}, "mod.capacity: must be in (0, 1]"),
        ({"capacity": [1.0, 0.0, 0.5]}, "mod.capacity: every entry must be in (0, 1]"),
        ({"capacity": 0.5, "every": 0}, "mod.every: must be an int >= 1"),
        ({"capacity": 0.5, "aux_weight": -1.0}, "mod.aux_weight: must be a finite number >= 0"),
        ({"capacity": 0.5, "inference": "lookahead"}, "mod.inference: must be one of topk, predictor"),
        ({"capacity": 0.5, "weight": "tanh"}, "mod.weight: must be one of raw, sigmoid"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace("]", r"\]")) as err:
        MoDConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_settings_for_the_model_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^mod.capacity: needs one entry per layer \(3\), got 2"):
        MoDConfig(capacity=[0.5, 0.5]).capacities(3)
    with pytest.raises(ValueError, match=r"^mod.every: routes no layer of the model's 3, got 4"):
        MoDConfig(capacity=0.5, every=4).capacities(3)
    assert MoDConfig(capacity=0.5).capacities(4) == [None, 0.5, None, 0.5]
    assert MoDConfig(capacity=[1.0, 0.5, 0.25]).capacities(3) == [None, 0.5, 0.25]
    with pytest.raises(ValueError, match=r"^mod.capacity: must be in \(0, 1\]"):  # through the app, before data
        run(compose([*FAST, "mod.capacity=1.5"]), tmp_path / "bad")
    with pytest.raises(ValueError, match=r"^mod.capacity: needs one entry per layer \(3\), got 2"):
        run(compose([*FAST, "model.num_layers=3", "mod.capacity=[0.5,0.5]"]), tmp_path / "bad_list")
    with pytest.raises(ValueError, match=r"^mod.capacity: Mixture-of-Depths trains with strategy=standard"):
        run(compose([*FAST, "+preset=token_routed", "mod.capacity=0.5"]), tmp_path / "run")
    with pytest.raises(ValueError, match=r"^task.mode: self-speculative decoding does not support"):
        wrapped(native()).crop_cache(None, 3)
