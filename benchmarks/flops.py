"""Analytic FLOPs of the EASE Transformer, per token, for the time-vs-FLOP ratios of the benchmark.

Counted: matrix multiplications, at 2 FLOPs per multiply-add (the usual convention of Kaplan et al. 2020
and the PaLM appendix), which is where almost all arithmetic of a Transformer is:

    per block   qkv 2*C*3C + out-proj 2*C*C + attention 2*2*C*(T+1)/2 + SwiGLU 2*C*2H + 2*H*C
    per head    2*C*V   (one per exit whose loss weight is > 0; training computes only those)

Attention is causal, so query i attends to i+1 keys: (T+1)/2 on average for QK^T and again for AV.
Training = 3 x forward (the backward pass costs two matmuls per forward matmul: input and weight grads).
`check_against_torch` compares the matmul part with `torch.utils.flop_counter` on a real forward (the
benchmark records it as training.flop_check; they agree exactly).

Not counted (said plainly, as it matters for the time ratios): norms, RoPE, softmax, SiLU, the
cross-entropy's log-softmax over V classes per weighted exit, the embedding gather and the optimizer.
They are memory-bound and cost more time per FLOP than matmuls, so configs heavier in them (deep
supervision adds a cross-entropy per exit) run slower than their FLOP count says.
"""

from ease.model.ffn import swiglu_hidden_dim


def block_flops(dim: int, seq_len: int, hidden_dim: int | None = None) -> float:
    """Forward FLOPs of one Transformer block, per token."""
    H = hidden_dim or swiglu_hidden_dim(dim)
    C, T = dim, seq_len
    return 2 * C * 3 * C + 2 * C * C + 2 * 2 * C * (T + 1) / 2 + 2 * C * 2 * H + 2 * H * C


def head_flops(dim: int, vocab_size: int) -> float:
    """Forward FLOPs of one exit head (the shared norm is not counted), per token."""
    return 2 * dim * vocab_size


def forward_flops(
    dim: int, num_layers: int, vocab_size: int, seq_len: int, heads: int = 1, hidden_dim: int | None = None
) -> float:
    """Forward FLOPs per token: every block plus `heads` exit heads."""
    return num_layers * block_flops(dim, seq_len, hidden_dim) + heads * head_flops(dim, vocab_size)


def training_flops(
    dim: int, num_layers: int, vocab_size: int, seq_len: int, heads: int = 1, hidden_dim: int | None = None
) -> float:
    """Training FLOPs per token: 3 x forward."""
    return 3 * forward_flops(dim, num_layers, vocab_size, seq_len, heads, hidden_dim)


def decode_flops(
    dim: int, num_layers: int, vocab_size: int, context: int, exit_layer: int, exit_heads: int, propagated: int
) -> float:
    """FLOPs of one decoding step (batch 1) that stops at `exit_layer` after `exit_heads` exit heads, with
    `propagated` skipped layers given K/V projections (2*C*2C each); attention over `context` keys."""
    C = dim
    H = swiglu_hidden_dim(dim)
    block = 2 * C * 3 * C + 2 * C * C + 2 * 2 * C * context + 2 * C * 2 * H + 2 * H * C
    return exit_layer * block + exit_heads * head_flops(dim, vocab_size) + propagated * 2 * C * 2 * C


def check_against_torch(dim: int, num_layers: int, vocab_size: int, seq_len: int, heads: int) -> dict[str, float]:
    """The analytic matmul FLOPs (attention left out) against `torch.utils.flop_counter` on a real forward.

    PyTorch's counter sees the projections and heads (aten.mm) but not the CPU attention kernel, so the
    attention term is taken off the analytic figure before comparing.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ease.model import EarlyExitTransformer

    model = EarlyExitTransformer(vocab_size, dim, num_layers).eval()
    x = torch.zeros(1, seq_len, dtype=torch.long)
    layers = list(range(num_layers - heads + 1, num_layers + 1))  # the deepest `heads` exits
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, layers)
    attention = num_layers * 2 * 2 * dim * (seq_len + 1) / 2
    analytic = forward_flops(dim, num_layers, vocab_size, seq_len, heads) - attention
    counted = counter.get_total_flops() / seq_len
    return {"analytic_matmul_flops_per_token": analytic, "torch_counted_flops_per_token": counted}
