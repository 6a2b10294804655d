"""Self-speculative decoding against plain full-depth decoding written out in the test.

Greedy: every prompt's tokens equal full-depth greedy decoding (a plain loop over all layers with a KV cache), on
the native model and on Hugging Face backbones, batch 1 and batch > 1, fixed and adaptive draft lengths.
Sampling: the joint distribution of two speculatively sampled tokens equals the full model's (chi-square), while
the draft's own distribution is far from it.
"""

import math

import pytest
import torch
from conftest import peaky_model
from hf_models import tiny
from scipy import stats

from ease.inference.speculative import SelfSpeculativeDecoder, _filtered, check_speculative
from ease.model import EarlyExitTransformer

V = 50


@torch.inference_mode()
def full_depth_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The plain reference: prefill, then one token at a time through every layer, argmax of the last layer."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n)
    h, pos, out = model.embed(prompt, 0), 0, []
    for _ in range(n):
        for i in range(1, model.num_layers + 1):
            h = model.layer(i, h, pos, cache)
        pos += h.shape[1]
        out.append(model.unembed(h[:, -1]).argmax(-1))
        h = model.embed(out[-1][:, None], pos)
    return torch.stack(out, dim=1)


def prompts(count: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (1, int(torch.randint(1, 12, (1,), generator=g))), generator=g) for _ in range(count)
    ]


@pytest.mark.parametrize(("draft_exit", "k", "adaptive"), [(1, 4, False), (2, 3, False), (1, 6, True)])
def test_greedy_equals_full_depth_on_50_prompts_native(draft_exit: int, k: int, adaptive: bool) -> None:
    model = peaky_model(V, 32, 4, 4)
    accepted = drafted = 0
    for prompt in prompts(50, V):
        want = full_depth_greedy(model, prompt, 24)
        got, st = SelfSpeculativeDecoder(model, draft_exit, k, adaptive=adaptive).generate(prompt, 24)
        assert torch.equal(got, want)
        accepted, drafted = accepted + st.accepted, drafted + st.drafted
        assert st.emitted == 24 and st.draft_layer_tokens == sum(st.draft_lengths) * draft_exit
    assert 0 < accepted < drafted  # the drafts were sometimes right and sometimes wrong: both paths ran


def test_greedy_equals_full_depth_on_50_prompts_hf_llama() -> None:
    model = tiny("llama", vocab=V, layers=4)
    with torch.no_grad():  # peaky outputs: no near-ties between the top tokens
        model.hf.lm_head.weight.mul_(40.0)
    for prompt in prompts(50, V, seed=1):
        want = full_depth_greedy(model, prompt, 16)
        got, _ = SelfSpeculativeDecoder(model, 2, 4).generate(prompt, 16)
        assert torch.equal(got, want)


def test_greedy_batch_rows_accept_differently_and_stay_exact() -> None:
    model = peaky_model(V, 32, 4, 4)
    batch = torch.cat([p[:, :1].expand(1, 6) + i for i, p in enumerate(prompts(5, V - 8, seed=2))])  # (5, 6)
    want = full_depth_greedy(model, batch, 30)
    got, st = SelfSpeculativeDecoder(model, 1, 5).generate(batch, 30)
    assert torch.equal(got, want)
    assert st.emitted == 5 * 30


def test_cropping_restores_full_depth_caches() -> None:
    model = peaky_model(V, 32, 3, 4)
    cache = model.new_cache(1, 20)
    h = model.embed(torch.arange(10)[None] % V, 0)
    for i in range(1, 4):
        h = model.layer(i, h, 0, cache)
    kept = [(layer.k[:, :, :6].clone(), layer.v[:, :, :6].clone()) for layer in cache]
    model.crop_cache(cache, 6)
    assert all(layer.length == 6 and torch.equal(layer.k, k) and torch.equal(layer.v, v)
               for layer, (k, v) in zip(cache, kept))  # fmt: skip


def _two_token_probs(model: EarlyExitTransformer, prompt: torch.Tensor, temperature: float, layer: int) -> torch.Tensor:
    """P(t1, t2 | prompt) from `layer`'s logits (the full model at layer L), by enumerating t1. (V, V)"""

    def probs(ids: torch.Tensor) -> torch.Tensor:
        h = model.embed(ids, 0)
        for i in range(1, layer + 1):
            h = model.layer(i, h, 0)
        return _filtered(model.unembed(h[:, -1]), temperature, None)

    p1 = probs(prompt)[0]  # (V,)
    rows = [p1[t] * probs(torch.cat([prompt, torch.tensor([[t]])], dim=1))[0] for t in range(model.vocab_size)]
    return torch.stack(rows)


@torch.inference_mode()
def test_sampling_matches_the_full_models_distribution() -> None:
    vocab, temperature = 6, 1.0
    torch.manual_seed(3)
    model = EarlyExitTransformer(vocab, 16, 3, num_heads=2).eval()
    with torch.no_grad():
        model.output_head.weight.mul_(8.0)  # distributions neither uniform nor one-hot
        for block in model.layers[1:]:  # layers 2..3 change the distribution a lot: the draft is often wrong
            for w in block.parameters():
                if w.dim() == 2:
                    w.mul_(3.0)
    prompt = torch.tensor([[1, 4, 2]])
    full = _two_token_probs(model, prompt, temperature, 3).flatten()
    draft = _two_token_probs(model, prompt, temperature, 1).flatten()
    assert 0.5 * (full - draft).abs().sum() > 0.2  # the draft alone is far from the full model
    rows = 4000
    g = torch.Generator().manual_seed(0)
    # Token 1 is the prefill's (full model); token 2 is drafted by layer 1 and verified (k = 2, so some rounds also
    # draft past it); every row draws independently.
    tokens, st = SelfSpeculativeDecoder(model, 1, 2, temperature, generator=g).generate(prompt.expand(rows, 3), 3)
    assert 0 < st.accepted < st.drafted
    observed = torch.bincount(tokens[:, 0] * vocab + tokens[:, 1], minlength=vocab * vocab).double()
    assert chi_square_p(observed, full.double()) > 1e-3
    # The same counts against the draft's distribution are rejected: the test has the power to see a wrong rule.
    assert chi_square_p(observed, draft.double()) < 1e-6


def chi_square_p(observed: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of counts against probabilities; cells expecting < 5 are pooled into one."""
    expected = probs / probs.sum() * observed.sum()
    keep = expected >= 5
    obs, exp = [observed[keep]], [expected[keep]]
    if (~keep).any() and expected[~keep].sum() > 0:
        obs.append(observed[~keep].sum()[None])
        exp.append(expected[~keep].sum()[None])
    return float(stats.chisquare(torch.cat(obs).numpy(), torch.cat(exp).numpy()).pvalue)


def test_predicted_speedup_counts_layers() -> None:
    model = peaky_model(V, 32, 4, 4)
    _, st = SelfSpeculativeDecoder(model, 1, 4).generate(prompts(1, V)[0], 20)
    assert st.draft_layer_tokens == sum(st.draft_lengths) and st.verify_layer_tokens == 3 * sum(st.draft_lengths)
    # A round: k draft steps of 1/4 of a full step, one verify pass of 3/4; plus the first token's full step.
    cost = 1 + sum(k * 1 / 4 + 3 / 4 for k in st.draft_lengths)
    assert math.isclose(st.predicted_speedup(4, 1), 20 / cost)
    assert st.rounds == len(st.draft_lengths) and 1 + (st.rounds - 1) <= 20 <= 1 + 4 * st.rounds


@pytest.mark.parametrize(
    ("draft_exit", "k", "message"),
    [
        (0, 4, r"^task\.draft_exit: must be an int in 1\.\.3"),
        (4, 4, r"^task\.draft_exit: must be an int in 1\.\.3"),
        (1, 0, r"^task\.num_speculations: must be an int >= 1"),
    ],
)
def test_bad_settings_are_one_line(draft_exit: int, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_speculative(peaky_model(V, 32, 4, 4), draft_exit, k)
