"""Self-speculative decoding with per-row lengths: rows of one batch keep different numbers of tokens per round.

Each row is checked against plain full-depth decoding of that row alone (greedy: token for token; sampling: the
distribution, chi-square), with prompts of different lengths right-padded into one batch; the cache's per-row
semantics (`Backbone.crop_cache` with a (B,) length) against a plain forward of each row, with garbage in the
stale slots.
"""

import pytest
import torch
from conftest import peaky_model
from hf_models import tiny
from test_speculative import chi_square_p, full_depth_greedy

from ease.inference.speculative import SelfSpeculativeDecoder, _filtered
from ease.model import EarlyExitTransformer

V = 50


def padded(rows: list[torch.Tensor], pad: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, max length) ids and the lengths (B,)."""
    lengths = torch.tensor([r.shape[1] for r in rows])
    out = torch.full((len(rows), int(lengths.max())), pad)
    for b, r in enumerate(rows):
        out[b, : r.shape[1]] = r[0]
    return out, lengths


def ragged_prompts(count: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, 1 + i % 11), generator=g) for i in range(count)]  # lengths 1..11


def spy_crops(model) -> list:
    """Record the lengths every `crop_cache` call gets (an int, or a (B,) tensor of per-row lengths)."""
    seen, crop = [], model.crop_cache

    def recording(cache, length):
        seen.append(length.clone() if isinstance(length, torch.Tensor) else length)
        crop(cache, length)

    model.crop_cache = recording
    return seen


def check_batches_of_8(model, draft_exit: int, k: int, n: int, seed: int, adaptive: bool = False) -> list:
    crops = spy_crops(model)
    accepted = drafted = uneven = 0
    want = {}  # prompt -> full-depth greedy tokens (1, n), from one reference call per prompt length
    for length in range(1, 12):
        same = torch.cat([p for p in ragged_prompts(56, V, seed) if p.shape[1] == length])
        want.update({tuple(p.tolist()): w[None] for p, w in zip(same, full_depth_greedy(model, same, n))})
    for start in range(0, 56, 8):
        rows = ragged_prompts(56, V, seed)[start : start + 8]
        batch, lengths = padded(rows)
        got, st = SelfSpeculativeDecoder(model, draft_exit, k, adaptive=adaptive).generate(batch, n, lengths)
        for b, prompt in enumerate(rows):
            assert torch.equal(got[b : b + 1], want[tuple(prompt[0].tolist())]), (start, b)
        assert st.emitted == 8 * n and st.rounds == max(st.row_rounds)
        accepted, drafted = accepted + st.accepted, drafted + st.drafted
        uneven += min(st.row_rounds) < st.rounds  # some row was done before the others
    assert 0 < accepted < drafted and uneven
    return crops


@pytest.mark.parametrize(("draft_exit", "k", "adaptive"), [(1, 4, False), (2, 5, True)])
def test_batch8_greedy_equals_each_rows_full_depth_native(draft_exit: int, k: int, adaptive: bool) -> None:
    model = peaky_model(V, 32, 4, 4)
    crops = check_batches_of_8(model, draft_exit, k, 20, seed=4, adaptive=adaptive)
    assert any(isinstance(c, torch.Tensor) for c in crops)  # the batches did run with per-row lengths


def test_batch8_greedy_equals_each_rows_full_depth_hf_llama() -> None:
    model = tiny("llama", vocab=V, layers=4)
    with torch.no_grad():  # peaky outputs: no near-ties between the top tokens
        model.hf.lm_head.weight.mul_(40.0)
    crops = check_batches_of_8(model, 2, 4, 12, seed=5)
    assert any(isinstance(c, torch.Tensor) for c in crops)


def test_rows_advance_by_different_amounts_in_one_round() -> None:
    """After each round, row b's cache holds its prompt, its first token and what it kept: lengths differ between
    rows within a round (the old common-length decoding cropped every row to one int)."""
    model = peaky_model(V, 32, 4, 4)
    batch = torch.cat([p[:, :1].expand(1, 6) + i for i, p in enumerate(ragged_prompts(8, V - 8, seed=2))])  # (8, 6)
    crops = spy_crops(model)
    got, st = SelfSpeculativeDecoder(model, 1, 5).generate(batch, 30)
    assert torch.equal(got, full_depth_greedy(model, batch, 30))
    per_row = [c for c in crops if isinstance(c, torch.Tensor)]
    assert per_row and max(len(set(c.tolist())) for c in per_row) >= 3  # >= 3 different lengths after one round
    assert len(crops) == st.rounds and len(set(st.row_rounds)) > 1


@pytest.mark.parametrize("backbone", ["native", "llama", "llama_eager", "gpt2"])
@torch.inference_mode()
def test_stale_slots_are_overwritten_before_any_query_sees_them(backbone: str) -> None:
    """Crop rows to lengths 4, 7, 10, fill every stale slot with huge keys, then run 3 tokens per row at the row's
    own positions: the logits equal a plain forward of each row alone (the new tokens overwrite slots n_b..n_b+2
    and nothing at or past a query's own position is seen), so the garbage never mattered."""
    model = peaky_model(V, 32, 3, 4) if backbone == "native" else tiny(backbone.split("_")[0], vocab=V, layers=3)
    if backbone == "llama_eager":  # an additive float mask instead of SDPA's boolean one
        model.hf.config._attn_implementation = "eager"
    ids = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(3, 16)
    h = model.embed(ids[:, :10], 0)
    for i in range(1, model.num_layers + 1):
        h = model.layer(i, h, 0, cache)
    lengths = torch.tensor([4, 7, 10])
    model.crop_cache(cache, lengths)
    stores = [(c.k, c.v) for c in cache] if backbone == "native" else [(c.keys, c.values) for c in cache.layers]
    for keys, values in stores:
        for b, n in enumerate(lengths.tolist()):
            keys[b, :, n:] = 1e4
            values[b, :, n:] = -1e4
    new = torch.stack([ids[b, n : n + 3] for b, n in enumerate(lengths.tolist())])  # (3, 3)
    positions = lengths[:, None] + torch.arange(3)
    h = model.embed(new, lengths)
    for i in range(1, model.num_layers + 1):
        h = model.layer(i, h, 0, cache, positions=positions)
    got = model.unembed(h)
    for b, n in enumerate(lengths.tolist()):
        want = model(ids[b : b + 1, : n + 3])[0, n:]
        torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)


def _joint(model: EarlyExitTransformer, prompt: torch.Tensor, n: int, layer: int, temperature: float) -> torch.Tensor:
    """P(t_1..t_n | prompt) from `layer`'s logits, by enumeration. (V ** n,)"""

    def probs(ids: torch.Tensor) -> torch.Tensor:  # (R, T) -> (R, V)
        h = model.embed(ids, 0)
        for i in range(1, layer + 1):
            h = model.layer(i, h, 0)
        return _filtered(model.unembed(h[:, -1]), temperature, None)

    V = model.vocab_size
    seqs, joint = prompt, torch.ones(1, dtype=torch.float64)
    for _ in range(n):
        p = probs(seqs).double()  # (R, V)
        joint = (joint[:, None] * p).flatten()
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], dim=1)
    return joint


@torch.inference_mode()
def test_sampling_at_batch_with_rows_of_different_lengths_matches_the_full_model() -> None:
    """Two prompts of different lengths, 3000 rows each in one batch; every row's three sampled tokens follow the
    full model's joint distribution (token 1 from the prefill, tokens 2-3 from rounds in which rows kept 1 or 2)."""
    vocab, temperature = 6, 1.0
    torch.manual_seed(3)
    model = EarlyExitTransformer(vocab, 16, 3, num_heads=2).eval()
    with torch.no_grad():
        model.output_head.weight.mul_(8.0)
        for block in model.layers[1:]:  # the draft (layer 1) is often wrong
            for w in block.parameters():
                if w.dim() == 2:
                    w.mul_(3.0)
    prompts = [torch.tensor([[1, 4, 2]]), torch.tensor([[3, 5]])]
    rows = 3000
    batch, lengths = padded([prompts[0]] * rows + [prompts[1]] * rows, pad=0)
    crops = spy_crops(model)
    g = torch.Generator().manual_seed(0)
    tokens, st = SelfSpeculativeDecoder(model, 1, 2, temperature, generator=g).generate(batch, 3, lengths)
    assert 0 < st.accepted < st.drafted and any(isinstance(c, torch.Tensor) for c in crops)
    for j, prompt in enumerate(prompts):
        full, draft = (_joint(model, prompt, 3, layer, temperature) for layer in (3, 1))
        assert 0.5 * (full - draft).abs().sum() > 0.2  # the draft alone is far from the full model
        t = tokens[j * rows : (j + 1) * rows]
        observed = torch.bincount((t[:, 0] * vocab + t[:, 1]) * vocab + t[:, 2], minlength=vocab**3).double()
        assert chi_square_p(observed, full) > 1e-3
        assert chi_square_p(observed, draft) < 1e-6  # the test can see a wrong rule


@pytest.mark.parametrize("lengths", [[0, 3], [3, 4], [3]])
def test_bad_prompt_lengths_are_one_line(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match=r"^prompt_lengths: must be 2 lengths in 1\.\.3, got \[") as err:
        SelfSpeculativeDecoder(peaky_model(V, 32, 4, 4), 1, 2).generate(torch.zeros(2, 3, dtype=torch.long), 4,
                                                                        torch.tensor(lengths))  # fmt: skip
    assert "\n" not in str(err.value)


def test_per_row_lengths_on_sliding_window_layers_are_one_line() -> None:
    model = tiny("mistral", vocab=V, layers=2)
    model.hf.config.sliding_window = 4
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match=r"^task\.batch_size: rows of different lengths need full-attention") as err:
        model.crop_cache(cache, torch.tensor([1, 2]))
    assert "\n" not in str(err.value)


def test_batch8_greedy_equals_each_rows_full_depth_native_gpt_architecture() -> None:
    """Learned positions (`model.positions=learned`) come from `embed` with each row's own start."""
    torch.manual_seed(0)
    model = EarlyExitTransformer(V, 32, 4, num_heads=4, norm="layer", positions="learned", ffn="gelu").eval()
    with torch.no_grad():
        model.output_head.weight.mul_(60.0)
    crops = check_batches_of_8(model, 2, 3, 12, seed=6)
    assert any(isinstance(c, torch.Tensor) for c in crops)
