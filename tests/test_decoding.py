"""The decoders: cached decoding equals a full forward, matches plain reference decoders, batches rows.

Every behaviour test runs twice: on `EarlyExitDecoder` (the reference, over the backbone protocol) and on
`FusedDecoder` (the native fast path), so the two are held to the same plain references.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import between, peaky_model
from torch.testing import assert_close

from ease import EarlyExitTransformer
from ease.inference.decoder import EarlyExitDecoder
from ease.inference.fused import FusedDecoder, rotation_matrices
from ease.model import apply_rotary
from ease.routing import max_prob

V, D, L, H = 24, 32, 4, 4
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture
def model() -> EarlyExitTransformer:
    m = peaky_model(V, D, L, H)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norm weights: the decoder folds them into matmuls
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(params=[EarlyExitDecoder, FusedDecoder], ids=["reference", "fused"])
def decoder_cls(request: pytest.FixtureRequest) -> type:
    return request.param


@pytest.fixture
def seqs() -> torch.Tensor:
    return torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))


def cascade(model: EarlyExitTransformer, seqs: torch.Tensor) -> tuple[list[int], list[float]]:
    """Exits at layers 1 and 2 with median thresholds: some tokens stop at 1, some at 2, some go on."""
    with torch.no_grad():
        logits = model(seqs, [1, 2])
    return [1, 2], [between(max_prob(logits[1]), 0.6, gap=1e-4), between(max_prob(logits[2]), 0.5, gap=1e-4)]


def run_decoder(
    cls: type, model: EarlyExitTransformer, seqs: torch.Tensor, prompt_len: int, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, EarlyExitDecoder | FusedDecoder]:
    """Prefill seqs[:, :prompt_len], then feed the rest one token per step (teacher forcing)."""
    B, T = seqs.shape
    dec = cls(model, B, T, **kwargs)
    dec.prefill(seqs[:, :prompt_len])
    logits, exits = [], []
    for t in range(prompt_len, T):
        out = dec.step(seqs[:, t])
        logits.append(out.logits)
        exits.append(out.exit_layer)
    return torch.stack(logits, 1), torch.stack(exits, 1), dec


# --- a plain reference: token by token, the model's own modules, attention written out ---------------------


@torch.no_grad()
def reference_propagate(
    model: EarlyExitTransformer, seq: torch.Tensor, prompt_len: int, exits: list[int], thresholds: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """CALM decoding, slowly: per-layer lists of K/V; a stopped token's skipped layers get K/V from its exit state."""
    keys: list[list[torch.Tensor]] = [[] for _ in range(L)]
    values: list[list[torch.Tensor]] = [[] for _ in range(L)]
    route = dict(zip(exits, thresholds))
    out_logits, out_exits = [], []
    for p, token in enumerate(seq.tolist()):
        h = model.embedding(torch.tensor([[token]]))  # (1, 1, C)
        cos, sin = model.rope(p, 1)
        stopped_at = None
        for layer, block in enumerate(model.layers, start=1):
            if stopped_at is not None:
                k, v = block.attn.project_kv(block.attn_norm(h), cos, sin)  # h is the exit state
                keys[layer - 1].append(k)
                values[layer - 1].append(v)
                continue
            attn = block.attn
            q, k, v = attn.qkv(block.attn_norm(h)).split(D, dim=-1)
            q = apply_rotary(attn._heads(q), cos, sin)
            keys[layer - 1].append(apply_rotary(attn._heads(k), cos, sin))
            values[layer - 1].append(attn._heads(v))
            K, Vv = torch.cat(keys[layer - 1], 2), torch.cat(values[layer - 1], 2)  # (1, nh, p+1, hd)
            weights = torch.softmax(q @ K.transpose(-1, -2) / (D // H) ** 0.5, dim=-1)
            h = h + attn.proj((weights @ Vv).transpose(1, 2).reshape(1, 1, D))
            h = h + block.ffn(block.ffn_norm(h))
            if p >= prompt_len and (layer in route or layer == L):  # the prompt is prefilled at full depth
                logits = model.unembed(h)[0, 0]
                if layer == L or max_prob(logits) >= route[layer]:
                    stopped_at = layer
                    out_logits.append(logits)
                    out_exits.append(layer)
    return torch.stack(out_logits), torch.tensor(out_exits)


@torch.no_grad()
def reference_exact(
    model: EarlyExitTransformer, seq: torch.Tensor, prompt_len: int, exits: list[int], thresholds: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What recompute mode must give: a full forward of the prefix at every step, routed at the last token."""
    route = dict(zip(exits, thresholds))
    out_logits, out_exits = [], []
    for t in range(prompt_len, seq.numel()):
        logits = model(seq[None, : t + 1], range(1, L + 1))
        for layer in range(1, L + 1):
            last = logits[layer][0, -1]
            if layer == L or (layer in route and max_prob(last) >= route[layer]):
                out_logits.append(last)
                out_exits.append(layer)
                break
    return torch.stack(out_logits), torch.tensor(out_exits)


# --- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
def test_threshold_zero_equals_full_forward_at_every_layer(decoder_cls, model, seqs, kv_mode) -> None:
    B, T = seqs.shape
    with torch.no_grad():
        full = model(seqs, range(1, L + 1))
    dec = decoder_cls(model, B, T, routing_threshold=0.0, kv_mode=kv_mode)
    first = dec.prefill(seqs[:, :5], return_layers=True)
    second = dec.prefill(seqs[:, 5:8], return_layers=True)  # a prefill that starts mid-cache
    for layer in range(1, L + 1):
        assert_close(first[layer], full[layer][:, :5], **TOL)
        assert_close(second[layer], full[layer][:, 5:8], **TOL)
    for t in range(8, T):
        out = dec.step(seqs[:, t], return_layers=True)
        assert out.exit_layer.tolist() == [L] * B
        assert_close(out.logits, full[L][:, t], **TOL)
        for layer in range(1, L + 1):
            assert_close(out.layer_logits[layer], full[layer][:, t], **TOL)
    assert dec.layer_tokens == B * T * L and dec.kv_tokens == 0


def test_rotation_matrices_equal_apply_rotary(model) -> None:
    cos, sin = model.rope(0, 7)
    x = torch.randn(2, H, 7, D // H)
    rotated = torch.einsum("bhtd,tde->bhte", x, rotation_matrices(cos, sin))
    assert_close(rotated, apply_rotary(x, cos, sin))


def test_propagate_matches_plain_reference_decoder(decoder_cls, model, seqs) -> None:
    exits, thresholds = cascade(model, seqs)
    logits, exit_at, dec = run_decoder(decoder_cls, model, seqs, 6, exit_layer=exits, routing_threshold=thresholds)
    counts = torch.bincount(exit_at.flatten(), minlength=L + 1)
    assert counts[1] > 0 and counts[2] > 0 and counts[L] > 0, counts  # every path is exercised
    for b in range(seqs.shape[0]):
        ref_logits, ref_exits = reference_propagate(model, seqs[b], 6, exits, thresholds)
        assert exit_at[b].tolist() == ref_exits.tolist()
        assert_close(logits[b], ref_logits, **TOL)
    steps = seqs.shape[0] * (seqs.shape[1] - 6)
    # every (token, layer) pair of a step is either a full block or a propagated K/V, never both
    assert dec.layer_tokens - seqs.shape[0] * 6 * L + dec.kv_tokens == steps * L
    assert dec.kv_tokens == int(((L - exit_at).clamp(min=0)).sum())


def test_propagation_changes_later_tokens(decoder_cls, model, seqs) -> None:
    """The KV trade-off is real: with propagation, deep tokens after an early exit see different K/V."""
    exits, thresholds = cascade(model, seqs)
    prop, prop_exits, _ = run_decoder(decoder_cls, model, seqs, 6, exit_layer=exits, routing_threshold=thresholds)
    exact, _, _ = run_decoder(
        decoder_cls, model, seqs, 6, exit_layer=exits, routing_threshold=thresholds, kv_mode="recompute"
    )
    first_exit = (prop_exits < L).float().argmax(1)  # per row, the first step that stopped early
    deep_later = torch.zeros_like(prop_exits, dtype=torch.bool)
    for b, s in enumerate(first_exit.tolist()):
        deep_later[b, s + 1 :] = prop_exits[b, s + 1 :] == L
    assert deep_later.any()
    assert not torch.allclose(prop[deep_later], exact[deep_later], **TOL)


def test_recompute_matches_full_forward_routing(decoder_cls, model, seqs) -> None:
    exits, thresholds = cascade(model, seqs)
    logits, exit_at, dec = run_decoder(
        decoder_cls, model, seqs, 6, exit_layer=exits, routing_threshold=thresholds, kv_mode="recompute"
    )
    assert (exit_at < L).any() and (exit_at == L).any()
    for b in range(seqs.shape[0]):
        ref_logits, ref_exits = reference_exact(model, seqs[b], 6, exits, thresholds)
        assert exit_at[b].tolist() == ref_exits.tolist()
        assert_close(logits[b], ref_logits, **TOL)
    # pending positions after the last deep token are never computed: fewer block runs than full depth
    assert dec.layer_tokens < seqs.numel() * L and dec.kv_tokens == 0


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
def test_batch_rows_equal_each_row_alone(decoder_cls, model, seqs, kv_mode) -> None:
    exits, thresholds = cascade(model, seqs)
    kwargs = {"exit_layer": exits, "routing_threshold": thresholds, "kv_mode": kv_mode}
    logits, exit_at, _ = run_decoder(decoder_cls, model, seqs, 6, **kwargs)
    mixed = [len(set(col.tolist())) > 1 for col in exit_at.T]
    assert any(mixed), "no step where rows of the batch exit at different layers"
    for b in range(seqs.shape[0]):
        alone_logits, alone_exits, _ = run_decoder(decoder_cls, model, seqs[b : b + 1], 6, **kwargs)
        assert exit_at[b].tolist() == alone_exits[0].tolist()
        assert_close(logits[b], alone_logits[0], **TOL)


def test_step_output_is_the_exit_layers_logits(decoder_cls, model, seqs) -> None:
    """Each row's logits are those of its exit layer; layers above it are NaN (or absent) in layer_logits."""
    exits, thresholds = cascade(model, seqs)
    dec = decoder_cls(model, 3, 20, exit_layer=exits, routing_threshold=thresholds)
    dec.prefill(seqs[:, :6])
    for t in range(6, 20):
        out = dec.step(seqs[:, t], return_layers=True)
        for b, e in enumerate(out.exit_layer.tolist()):
            assert_close(out.logits[b], out.layer_logits[e][b])
            for layer in range(e + 1, L + 1):  # a layer no row ran is left out
                assert layer not in out.layer_logits or torch.isnan(out.layer_logits[layer][b]).all()


def test_errors(decoder_cls, model) -> None:
    with pytest.raises(ValueError, match="kv_mode"):
        decoder_cls(model, kv_mode="lazy")
    with pytest.raises(ValueError, match="batch_size"):
        decoder_cls(model, batch_size=0)
    dec = decoder_cls(model, 2, 4)
    with pytest.raises(ValueError, match="shape"):
        dec.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_len"):
        dec.prefill(torch.zeros(2, 5, dtype=torch.long))
    dec = decoder_cls(model, 1, 8, routing_threshold=1e-9, kv_mode="recompute")
    dec.step(torch.tensor([1]))  # stops at layer 1: layers 2..L pending
    with pytest.raises(ValueError, match="pending"):
        dec.prefill(torch.zeros(1, 2, dtype=torch.long))


def test_batched_sampling_path_uses_only_running_rows(model, seqs) -> None:
    """Fused: a layer that runs for a subset reads only those rows' caches; stopped rows are not touched."""
    exits, thresholds = cascade(model, seqs)
    dec = FusedDecoder(model, 3, 20, exit_layer=exits, routing_threshold=thresholds)
    dec.prefill(seqs[:, :6])
    before = dec._v.clone()
    out = dec.step(seqs[:, 6])
    t = 6
    changed = (dec._v[:, :, :, t] != before[:, :, :, t]).flatten(2).any(-1)  # (L, B): slot t written
    assert changed.all()  # a full block or a propagated K/V: every layer gets K/V at t for every row
    assert (dec._v[:, :, :, :t] == before[:, :, :, :t]).all()  # the past is left alone
    assert F.softmax(out.logits, -1).sum(-1).allclose(torch.ones(3))


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
def test_fused_equals_reference_decoder(model, seqs, kv_mode) -> None:
    """The fast path computes what the reference computes: the same exits, logits to rounding."""
    exits, thresholds = cascade(model, seqs)
    kwargs = {"exit_layer": exits, "routing_threshold": thresholds, "kv_mode": kv_mode}
    ref_logits, ref_exits, _ = run_decoder(EarlyExitDecoder, model, seqs, 6, **kwargs)
    fused_logits, fused_exits, _ = run_decoder(FusedDecoder, model, seqs, 6, **kwargs)
    assert (ref_exits < L).any() and (ref_exits == L).any()
    assert fused_exits.tolist() == ref_exits.tolist()
    assert_close(fused_logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("split_exit,kv_with_layers", [(True, True), (True, False), (False, None)])
def test_fused_split_exit_equals_reference_decoder_with_mixed_exits(model, split_exit, kv_with_layers, batch) -> None:
    """Batch 8 with rows stopping at different exits in one step (and batch 1's own path): the running rows'
    matmuls on their own, attention over every row's cache, the skipped K/V from the exit matmul (fused), a
    matmul of the stopping rows (split), or extra rows of each block's matmul above (kv_with_layers, with a
    cascade: rows pending from exit 1 when exit 2's matmul gave the running rows' projections): the same token
    ids, exit layers and logits as the reference decoder."""
    seqs = torch.randint(0, V, (batch, 20), generator=torch.Generator().manual_seed(2))
    exits, thresholds = cascade(model, seqs)
    kwargs = {"exit_layer": exits, "routing_threshold": thresholds}
    ref_logits, ref_exits, _ = run_decoder(EarlyExitDecoder, model, seqs, 6, **kwargs)
    dec = FusedDecoder(model, batch, 20, split_exit=split_exit, kv_with_layers=kv_with_layers, **kwargs)
    assert bool(dec._exit_kv) == split_exit
    assert dec._kv_with_layers == (bool(kv_with_layers) and batch > 1)
    dec.prefill(seqs[:, :6])
    logits, exit_layers = [], []
    for t in range(6, 20):
        out = dec.step(seqs[:, t])
        logits.append(out.logits)
        exit_layers.append(out.exit_layer.clone())
    fused_logits, fused_exits = torch.stack(logits, 1), torch.stack(exit_layers, 1)
    if batch > 1:  # steps where some rows stop early and others go on: the compacted path ran
        per_step = ref_exits.transpose(0, 1)
        assert any(len(set(step.tolist())) >= 2 and (step < L).any() for step in per_step)
    assert (ref_exits < L).any() and (ref_exits == L).any()
    assert fused_exits.tolist() == ref_exits.tolist()
    assert fused_logits.argmax(-1).tolist() == ref_logits.argmax(-1).tolist()
    assert_close(fused_logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_fused_split_exit_chosen_by_weight_size() -> None:
    """By default an exit splits when the skipped blocks' K/V weights pass 256 KiB: not at dim 32, yes at 256."""
    small, wide = peaky_model(V, 32, L, H), peaky_model(V, 256, L, H)
    assert FusedDecoder(small, 2, 8, exit_layer=1, routing_threshold=0.5)._exit_kv == {}
    dec = FusedDecoder(wide, 2, 8, exit_layer=1, routing_threshold=0.5)
    assert list(dec._exit_kv) == [0] and dec._exit_kv[0].shape == (256, 2 * (L - 1) * 256)
