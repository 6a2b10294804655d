"""(e) torch.compile on CPU: where does it win, in training and in decoding?

Training: every TransformerBlock compiled (`block.compile()`, what `compile=true` would do in train.py),
timed by the same worker as section (a), so eager and compiled differ only in that switch. The first
steps' time (the compilation) is reported separately.

Decoding: the decoder's per-block step (`FusedDecoder._block_one`, where nearly all its time goes)
wrapped in `torch.compile`, default settings and dynamic=True, timed on the same generation as eager. The
cache length changes every step, so Dynamo either recompiles per length or traces symbolic shapes; any
error is recorded, not hidden. To give the compiler its best case, a static-shape variant of the same block
(attention over the whole preallocated cache with an additive mask, the position as a tensor, so one graph
serves every step and layer) is timed per call, eager against compiled.
"""

import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import run_worker
from ease import EarlyExitTransformer
from ease.inference.fused import FusedDecoder
from ease.inference.generation import intra_op_threads


def run_training_compile(base: dict[str, Any], eager: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (method, dim), eager_row in eager.items():
        if method == "asymmetric":
            continue
        spec = {**base, "method": method, "dim": dim, "compile": True}
        try:
            compiled = run_worker("training", spec, env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})
        except RuntimeError as err:
            rows.append({"method": method, "dim": dim, "error": str(err).splitlines()[-1]})
            continue
        rows.append(
            {
                "method": method,
                "dim": dim,
                "eager_tokens_per_s": eager_row["tokens_per_s"],
                "compiled_tokens_per_s": compiled["tokens_per_s"],
                "speedup": compiled["tokens_per_s"] / eager_row["tokens_per_s"],
                "compile_warmup_s": compiled["warmup_s"],
                "eager_warmup_s": eager_row["warmup_s"],
            }
        )
    return rows


def _first_line(err: Exception) -> str:
    """The exception's type and the first line of its message (inductor errors run to many lines)."""
    text = traceback.format_exception_only(type(err), err)[-1].strip()
    return text.splitlines()[0][:200]


def _decode_tokens_per_s(decoder: FusedDecoder, tokens: int) -> float:
    token = torch.zeros(decoder.batch_size, dtype=torch.long)
    with torch.inference_mode(), intra_op_threads(1):
        start = time.perf_counter()
        for _ in range(tokens):
            token = decoder.step(token).logits.argmax(-1)
        return tokens * decoder.batch_size / (time.perf_counter() - start)


def run_decode_compile(model: EarlyExitTransformer, tokens: int) -> list[dict[str, Any]]:
    rows = []
    prompt = torch.zeros(1, 16, dtype=torch.long)
    for name, options in (("eager", None), ("compile", {}), ("compile dynamic", {"dynamic": True})):
        decoder = FusedDecoder(model, 1, 16 + 2 * tokens, routing_threshold=0.0)
        decoder.prefill(prompt)
        start = time.perf_counter()
        try:
            if options is not None:
                decoder._block_one = torch.compile(decoder._block_one, **options)
            first = _decode_tokens_per_s(decoder, tokens)  # includes compilation
            warm_s = time.perf_counter() - start
            tps = _decode_tokens_per_s(decoder, tokens)
            rows.append({"setting": name, "tokens_per_s": tps, "first_run_s": warm_s, "first_tokens_per_s": first})
        except Exception as err:  # an inductor failure is a finding, not a crash of the benchmark
            rows.append({"setting": name, "error": _first_line(err)})
        finally:
            torch._dynamo.reset()
    eager = rows[0]["tokens_per_s"]
    for row in rows:
        if "tokens_per_s" in row:
            row["speedup"] = row["tokens_per_s"] / eager
    return rows


def _static_block(h, qkv_w, proj_w, w13_w, w2_w, keys, values, rot, pos, mask, c_eps):
    """The decoder's block with static shapes: keys (nh, hd, T), values (nh, T, hd), pos (1,) long."""
    C = h.shape[-1]
    nh, hd = keys.shape[0], keys.shape[1]
    H = w2_w.shape[0]
    u = h * (h * h).sum(-1, keepdim=True).add(c_eps).rsqrt()
    qkv = u @ qkv_w
    qk = (qkv[:, : 2 * C].reshape(-1, hd) @ rot).view(2, nh, hd)
    keys.index_copy_(2, pos, qk[1].unsqueeze(-1))
    values.index_copy_(1, pos, qkv[:, 2 * C :].view(nh, 1, hd))
    y = torch.bmm((torch.bmm(qk[0].unsqueeze(1), keys) + mask).softmax(-1), values).view(1, C)
    h = h + y @ proj_w
    u = h * (h * h).sum(-1, keepdim=True).add(c_eps).rsqrt()
    gate_up = u @ w13_w
    return h + (F.silu(gate_up[:, :H]) * gate_up[:, H:]) @ w2_w


def _per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def run_static_block_compile(model: EarlyExitTransformer, context: int = 128) -> dict[str, Any]:
    """Microseconds per block call at batch 1: eager vs compiled, static shapes (the compiler's best case)."""
    T = 512
    decoder = FusedDecoder(model, 1, T, routing_threshold=0.0)
    w = decoder._blocks[0]
    mask = torch.full((1, T), float("-inf"))
    mask[:, : context + 1] = 0.0
    args = (
        torch.randn(1, model.dim), w.qkv, w.proj, w.w13, w.w2, decoder._k_rows[0].clone(), decoder._v_rows[0].clone(),
        decoder._rot[context], torch.tensor([context]), mask, decoder._c_eps,
    )  # fmt: skip
    row: dict[str, Any] = {"setting": "static-shape block, per call"}
    with torch.inference_mode(), intra_op_threads(1):
        row["eager_us"] = _per_call_us(lambda: _static_block(*args))
        row["decoder_eager_us"] = _per_call_us(
            lambda: decoder._block_one(0, args[0], *decoder._qkv(0, args[0]), None, context)
        )
        try:
            compiled = torch.compile(_static_block)
            start = time.perf_counter()
            compiled(*args)
            row["first_run_s"] = time.perf_counter() - start
            row["compiled_us"] = _per_call_us(lambda: compiled(*args))
            row["speedup"] = row["decoder_eager_us"] / row["compiled_us"]
        except Exception as err:
            row["error"] = _first_line(err)
        finally:
            torch._dynamo.reset()
    return row
