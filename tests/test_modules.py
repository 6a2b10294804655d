"""Building blocks against plain re-implementations: RMSNorm, RoPE, causal attention, SwiGLU, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ease import EarlyExitTransformer
from ease.model import (
    CausalSelfAttention,
    GatedLinearUnit,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
    apply_rotary,
)
from ease.model.attention import KVCache, rotary_heads
from ease.model.ffn import _GatedSiLU
from ease.model.norm import _RMSNormFunction


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial value (norm weights are ones at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


# --- RMSNorm ---------------------------------------------------------------------------------------------


def test_rmsnorm_equals_manual_formula():
    torch.manual_seed(0)
    norm = _randomize(RMSNorm(16, eps=1e-6))
    x = torch.randn(2, 5, 16) * 3.0
    expected = x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + 1e-6) * norm.weight
    assert_close(norm(x), expected)


def test_rmsnorm_output_has_unit_rms_with_unit_weight():
    x = torch.randn(4, 7, 32) * 10.0 + 2.0
    out = RMSNorm(32)(x)
    assert_close(out.pow(2).mean(-1), torch.ones(4, 7), rtol=1e-4, atol=1e-4)
    # Scale invariance: RMSNorm(c x) == RMSNorm(x) for c > 0.
    assert_close(RMSNorm(32)(5.0 * x), out, rtol=1e-4, atol=1e-5)


# --- RoPE -------------------------------------------------------------------------------------------------


def test_rope_matches_complex_rotation():
    """Pairs (x_j, x_{j+hd/2}) rotate by angle pos * base^(-2j/hd), as a complex multiplication."""
    hd, T, start = 8, 6, 3
    rope = RotaryEmbedding(hd)
    x = torch.randn(2, 3, T, hd)
    out = apply_rotary(x, *rope(start, T))
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))  # (hd/2,)
    pos = torch.arange(start, start + T, dtype=torch.float32)
    angle = torch.outer(pos, freqs)  # (T, hd/2)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :]) * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat((z.real, z.imag), dim=-1)
    assert_close(out, expected)


def test_rope_preserves_norms():
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 4, 10, 16)
    for start in (0, 7, 300):  # 300 is past the initial table: the table grows
        out = apply_rotary(x, *rope(start, 10))
        assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(apply_rotary(x, *rope(7, 10)), x)  # it does rotate


def test_rope_scores_depend_only_on_relative_position():
    hd = 8
    rope = RotaryEmbedding(hd)
    q = torch.randn(1, 1, 1, hd)
    k = torch.randn(1, 1, 1, hd)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, *rope(m, 1))
        kn = apply_rotary(k, *rope(n, 1))
        return (qm * kn).sum().item()

    for m, n in [(5, 2), (2, 5), (0, 0), (9, 4)]:
        base = score(m, n)
        for shift in (1, 13, 200):
            assert score(m + shift, n + shift) == pytest.approx(base, rel=1e-5, abs=1e-5)
    # ...and they do depend on the relative position.
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_table_growth_matches_fresh_table():
    small = RotaryEmbedding(8, initial_len=4)
    big = RotaryEmbedding(8, initial_len=256)
    for a, b in zip(small(2, 20), big(2, 20)):
        assert a.shape == (20, 4)
        assert_close(a, b)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head dimension"):
        RotaryEmbedding(7)


# --- attention --------------------------------------------------------------------------------------------


def _manual_attention(attn: CausalSelfAttention, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    B, T, C = x.shape
    nh, hd = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split(C, dim=-1)
    q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))
    cos, sin = rope(0, T)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, nh, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (probs @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.proj.weight.T


def test_attention_equals_manual_causal_softmax_attention():
    torch.manual_seed(0)
    attn = _randomize(CausalSelfAttention(16, 2))
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 7, 16)
    assert_close(attn(x, *rope(0, 7)), _manual_attention(attn, x, rope), rtol=1e-4, atol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    attn = _randomize(CausalSelfAttention(16, 4))
    rope = RotaryEmbedding(4)
    x = torch.randn(2, 8, 16)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(2, 3, 16)
    out, out2 = attn(x, *rope(0, 8)), attn(x2, *rope(0, 8))
    assert_close(out[:, :5], out2[:, :5])
    assert (out[:, 5:] - out2[:, 5:]).abs().max() > 1e-3  # the changed positions do change


def test_model_is_causal_at_every_exit():
    torch.manual_seed(0)
    model = EarlyExitTransformer(50, 16, 3, num_heads=2).eval()
    x = torch.randint(0, 50, (2, 10))
    x2 = x.clone()
    x2[:, 6:] = (x2[:, 6:] + 1) % 50
    a, b = model.forward_all_layers(x), model.forward_all_layers(x2)
    for la, lb in zip(a, b):
        assert_close(la[:, :6], lb[:, :6])
        assert (la[:, 6:] - lb[:, 6:]).abs().max() > 1e-6


# --- SwiGLU -----------------------------------------------------------------------------------------------


def test_swiglu_equals_manual_formula():
    torch.manual_seed(0)
    ffn = _randomize(GatedLinearUnit(16, hidden_dim=24))  # the seeds' name for SwiGLU (seed 004's ffn.py)
    w1, w3 = ffn.w13.weight[:24], ffn.w13.weight[24:]
    x = torch.randn(3, 5, 16)
    expected = (F.silu(x @ w1.T) * (x @ w3.T)) @ ffn.w2.weight.T
    assert_close(ffn(x), expected)


def test_swiglu_default_hidden_dim_is_llama_sizing():
    ffn = SwiGLU(64)
    # int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 16 -> 176
    assert ffn.w2.in_features == 176
    assert ffn.w13.out_features == 2 * 176


def test_block_equals_pre_norm_residual_formula():
    torch.manual_seed(0)
    block = _randomize(TransformerBlock(16, 2, hidden_dim=32))
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 6, 16)
    cos, sin = rope(0, 6)
    h = x + _manual_attention(block.attn, block.attn_norm(x), rope)
    expected = h + block.ffn(block.ffn_norm(h))
    assert_close(block(x, cos, sin), expected, rtol=1e-4, atol=1e-5)


# --- KV cache ---------------------------------------------------------------------------------------------


def test_kv_cache_token_by_token_equals_full_causal_pass():
    torch.manual_seed(0)
    attn = _randomize(CausalSelfAttention(16, 2))
    rope = RotaryEmbedding(8)
    T = 9
    x = torch.randn(2, T, 16)
    full = attn(x, *rope(0, T))
    cache = KVCache()
    steps = []
    for t in range(T):
        steps.append(attn(x[:, t : t + 1], *rope(t, 1), cache=cache))
        assert cache.length == t + 1
    assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_kv_cache_in_chunks_equals_full_pass():
    """A prompt of several tokens, then more chunks: exercises the past > 0, T > 1 mask."""
    torch.manual_seed(1)
    attn = _randomize(CausalSelfAttention(16, 4))
    rope = RotaryEmbedding(4)
    x = torch.randn(1, 10, 16)
    full = attn(x, *rope(0, 10))
    cache = KVCache()
    outs, pos = [], 0
    for size in (4, 1, 3, 2):
        outs.append(attn(x[:, pos : pos + size], *rope(pos, size), cache=cache))
        pos += size
    assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)


def test_model_incremental_decoding_with_caches_equals_forward():
    """Every block with its own KV cache, fed one token at a time, gives the model's logits at each exit."""
    torch.manual_seed(0)
    model = EarlyExitTransformer(50, 32, 3, num_heads=4).eval()
    x = torch.randint(0, 50, (2, 8))
    full = model.forward_all_layers(x)
    caches = [KVCache() for _ in model.layers]
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.layers]
    with torch.no_grad():
        for t in range(x.shape[1]):
            h = model.embed(x[:, t : t + 1])
            cos, sin = model.rope(t, 1)
            for i, (block, cache) in enumerate(zip(model.layers, caches)):
                h = block(h, cos, sin, cache)
                per_layer[i].append(model.unembed(h))
    for i in range(3):
        assert_close(torch.cat(per_layer[i], dim=1), full[i], rtol=1e-4, atol=1e-5)


def test_project_kv_matches_the_keys_and_values_attention_caches():
    torch.manual_seed(0)
    attn = _randomize(CausalSelfAttention(16, 2))
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 5, 16)
    cache = KVCache()
    attn(x, *rope(0, 5), cache=cache)
    k, v = attn.project_kv(x, *rope(0, 5))
    assert_close(k, cache.k)
    assert_close(v, cache.v)


# --- Hand-written backwards (RMSNorm, RoPE on q/k, SwiGLU's gate) against autograd on the plain formulas ---------
# The model's three autograd.Functions must give the plain formulas' values and gradients: bit for bit in float32
# (so that the seeds' presets keep their exact numbers), to bf16 rounding in bfloat16.


def _plain_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _plain_rotary_heads(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int) -> tuple:
    B, T, C3 = qkv.shape
    heads = [t.view(B, T, nh, C3 // 3 // nh).transpose(1, 2) for t in qkv.split(C3 // 3, dim=-1)]
    return apply_rotary(heads[0], cos, sin), apply_rotary(heads[1], cos, sin), heads[2]


def _plain_swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _grads(fn, inputs: list[torch.Tensor], seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of fn(*inputs) and the gradients of a random projection of them, with a residual path on input 0
    (as in a block, where the norm's input gradient adds to the residual's)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs) + leaves[0].float().sum() * 0.5
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_values_and_gradients_equal_autograd_on_the_formula(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = _randomize(RMSNorm(24, eps=1e-6))
    x, w = (torch.randn(3, 7, 24) * 2.0).to(dtype), norm.weight.detach().clone()
    got = _grads(lambda x, w: _RMSNormFunction.apply(x, x, w, 1e-6), [x, w])
    want = _grads(lambda x, w: _plain_rmsnorm(x, w, 1e-6), [x, w])
    _assert_same(got, want, dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
    assert torch.equal(norm(x.float()), _plain_rmsnorm(x.float(), w, 1e-6))  # the module uses the function


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_heads_values_and_gradients_equal_split_then_apply_rotary(dtype: torch.dtype) -> None:
    nh, hd, T = 3, 8, 6
    cos, sin = RotaryEmbedding(hd)(5, T)  # positions 5..10
    qkv = torch.randn(2, T, 3 * nh * hd).to(dtype)
    got = _grads(lambda t: rotary_heads(t, cos, sin, nh), [qkv])
    want = _grads(lambda t: _plain_rotary_heads(t, cos, sin, nh), [qkv])
    _assert_same(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gate_values_and_gradients_equal_autograd_on_the_formula(dtype: torch.dtype) -> None:
    h = (torch.randn(2, 5, 2 * 12) * 2.0).to(dtype)
    got = _grads(lambda t: _GatedSiLU.apply(t), [h])
    want = _grads(_plain_swiglu, [h])
    _assert_same(got, want, dtype)


def _assert_same(got: tuple, want: tuple, dtype: torch.dtype) -> None:
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float32:
            assert torch.equal(a, b), (a - b).abs().max()
        else:  # one bf16 rounding apart at most
            assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)
