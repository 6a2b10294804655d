"""Text generation with real early exit: greedy or sampled, timed against full depth with the same cache code.

    from ease.inference import generate

    result = generate(model, tokenizer, "The game", max_new_tokens=50, temperature=0.8, top_k=40, seed=0)
    result.text, result.exit_layers, result.tokens_per_s, result.speedup

`speedup` is tokens/s with early exit over tokens/s of the same decoder with routing off (every token
runs every layer), so it measures what exiting saves, not what the KV cache saves.
`theoretical_speedup` is 1 / compute_cost (the layer count), the figure early-exit papers report.

Inputs are bounded: `max_new_tokens` is at most `MAX_NEW_TOKENS` (4096); a prompt longer than the context
(`max_context`, default the backbone's position limit, else `DEFAULT_MAX_CONTEXT`) keeps its last tokens, with a
warning; and a prompt that is mostly the tokenizer's unknown id is warned about.
"""

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ease.data.tokenizers import UNK, Tokenizer, TokenizerMismatchError
from ease.inference.decoder import EarlyExitDecoder, check_kv_mode
from ease.inference.fused import FusedDecoder
from ease.model.backbone import Backbone
from ease.model.transformer import EarlyExitTransformer
from ease.routing import decayed_threshold, needs_hidden, normalize_routing

log = logging.getLogger("ease.inference")

DECODERS = ("auto", "fused", "reference")
# The most tokens one call generates per row: a fixed cap, so a typo (100000) cannot run for many minutes.
MAX_NEW_TOKENS = 4096
# Prompt tokens kept when neither `max_context` nor the backbone gives a limit (the native model uses RoPE and
# has none; `task=generate` passes the checkpoint's training data.seq_len).
DEFAULT_MAX_CONTEXT = 1024
# Of a prompt longer than this many characters per context token (and at least PROMPT_MIN_CHARS), only the
# tail is encoded: a huge prompt costs no more than a long one (a token rarely spans more characters).
PROMPT_CHARS_PER_TOKEN = 64
PROMPT_MIN_CHARS = 200_000


def make_decoder(
    model: Backbone,
    batch_size: int,
    max_len: int,
    exit_layer: int | Sequence[int] | None = None,
    routing_threshold: float | Sequence[float] | None = None,
    kv_mode: str = "propagate",
    confidence: str | None = None,
    decoder: str = "auto",
) -> EarlyExitDecoder | FusedDecoder:
    """The decoder for `model`: "reference" (any backbone, through the protocol), "fused" (the native model's
    fast path, tested equal to the reference) or "auto" (fused for the native model, else reference)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder: must be one of {', '.join(DECODERS)}, got {decoder!r}")
    native = isinstance(model, EarlyExitTransformer) and model.llama_style
    if decoder == "fused" and not native:
        got = type(model).__name__
        if isinstance(model, EarlyExitTransformer):
            got = f"model.norm={model.norm_kind} positions={model.positions} ffn={model.ffn_kind}"
        raise ValueError(
            "decoder: fused decodes the native EarlyExitTransformer of the default architecture (model.norm=rms, "
            f"positions=rotary, ffn=swiglu) only, got {got}"
        )
    if decoder == "auto" and needs_hidden(confidence or model.confidence):  # the fused path scores logits only
        native = False
    cls = FusedDecoder if decoder == "fused" or (decoder == "auto" and native) else EarlyExitDecoder
    return cls(model, batch_size, max_len, exit_layer, routing_threshold, kv_mode, confidence)


@dataclass
class SamplingConfig:
    """How tokens are picked and decoded.

    Attributes:
        max_new_tokens: tokens to generate per row (1 .. MAX_NEW_TOKENS = 4096).
        temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
        top_k: sample among the k most likely tokens only; None = all.
        batch_size: rows decoded together (a single prompt is repeated).
        kv_mode: "propagate" (CALM state copying) or "recompute" (exact K/V, filled later).
        decoder: "auto", "fused" or "reference" (see `make_decoder`).
    """

    max_new_tokens: int = 50
    temperature: float = 0.0
    top_k: int | None = None
    batch_size: int = 1
    kv_mode: str = "propagate"
    decoder: str = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.max_new_tokens > MAX_NEW_TOKENS:
            raise ValueError(
                f"max_new_tokens: must be <= {MAX_NEW_TOKENS} (the generation cap), got {self.max_new_tokens}"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1 or None, got {self.top_k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        check_kv_mode(self.kv_mode)
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder: must be one of {', '.join(DECODERS)}, got {self.decoder!r}")


class TokenSampler:
    """Picks each step's next tokens: argmax when temperature is 0, else sampling (optionally top-k).

    Sampling uses the Gumbel-max trick: argmax(logits + T * G) with G = -log(Exp(1)) noise is a draw from
    softmax(logits / T). The noise is drawn from the seeded generator in blocks of `block` steps, so a step
    costs a handful of tensor ops (about a third of `torch.multinomial`'s cost per call, which shows at
    batch 1 on CPU). The same generator state gives the same tokens.
    """

    def __init__(
        self, temperature: float, top_k: int | None, generator: torch.Generator | None, block: int = 64
    ) -> None:
        self.temperature = temperature
        self.top_k = top_k
        self.generator = generator
        self.block = block
        self._noise: list[torch.Tensor] = []  # block x (B, k) temperature-scaled Gumbel noise, as views
        self._used = 0

    def _next_noise(self, like: torch.Tensor) -> torch.Tensor:
        if self._used == len(self._noise) or self._noise[0].shape != like.shape:
            noise = torch.empty(self.block, *like.shape, dtype=like.dtype, device=like.device)
            noise.exponential_(generator=self.generator).log_().mul_(-self.temperature)
            self._noise = list(noise.unbind(0))  # views made once per block, not one indexing op per step
            self._used = 0
        self._used += 1
        return self._noise[self._used - 1]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> next token ids (B,)."""
        if self.temperature == 0:
            return logits.argmax(-1)
        if self.top_k is None or self.top_k >= logits.shape[-1]:
            return (logits + self._next_noise(logits)).argmax(-1)
        values, indices = logits.topk(self.top_k, dim=-1)  # (B, k), ours to overwrite
        choice = values.add_(self._next_noise(values)).argmax(-1)  # (B,)
        if logits.shape[0] == 1:  # one row: index the flat ids, one op instead of gather + squeeze
            return indices.take(choice)
        return indices.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from logits (B, V) with a fresh `TokenSampler` (one step). -> (B,)"""
    return TokenSampler(temperature, top_k, generator, block=1)(logits)


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads (None: leave torch's setting), then restore it.

    Decoding runs one token per row through matrices of a few dozen rows: far too little work to split
    across threads, and each split costs a thread hand-off, which is ruinous when the cores are shared.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DecodeRun:
    """One timed decoding run."""

    tokens: torch.Tensor  # (B, N) generated ids
    exit_layers: torch.Tensor  # (B, N) the layer each generated token came from
    seconds: float  # wall time of the N steps (the prefill is not included)
    layer_tokens: int  # full block computations during the steps (recompute mode counts recomputed ones)
    kv_tokens: int  # propagated K/V projections during the steps


@torch.inference_mode()
def decode(
    model: Backbone,
    prompt_ids: torch.Tensor,
    sampling: SamplingConfig,
    seed: int | None = 0,
    exit_layer: int | Sequence[int] | None = None,
    routing_threshold: float | Sequence[float] | None = None,
    confidence: str | None = None,
    threads: int | None = 1,
    threshold_decay: float | None = None,
) -> DecodeRun:
    """Prefill the prompt (B, T0) at full depth, then generate `max_new_tokens` per row with early exit.

    Generated token n comes from the step that feeds token n-1 (the last prompt token for n = 1), so each
    generated token has exactly one step and its exit layer is that step's depth. `threads`: intra-op
    threads while decoding (default 1, see `intra_op_threads`; None = torch's setting). `threshold_decay`:
    CALM's decaying threshold with that τ (`ease.routing.decayed_threshold`, t = the generated token's index).
    """
    B, T0 = prompt_ids.shape
    N = sampling.max_new_tokens
    decoder = make_decoder(
        model, B, T0 + N, exit_layer, routing_threshold, sampling.kv_mode, confidence, sampling.decoder
    )
    generator = None if seed is None else torch.Generator(device=prompt_ids.device).manual_seed(seed)
    if T0 > 1:
        decoder.prefill(prompt_ids[:, :-1])
    layer_tokens, kv_tokens = decoder.layer_tokens, decoder.kv_tokens
    token = prompt_ids[:, -1]
    sample = TokenSampler(sampling.temperature, sampling.top_k, generator)
    tokens, exits = [], []  # stacked once at the end: no tensor write per step
    with intra_op_threads(threads):
        start = time.perf_counter()
        for t in range(N):
            if threshold_decay is not None:
                decoder.set_thresholds(
                    [decayed_threshold(x, t, N, threshold_decay) for x in decoder.routing_thresholds]
                )
            out = decoder.step(token)
            token = sample(out.logits)
            tokens.append(token)
            exits.append(out.exit_layer)
        seconds = time.perf_counter() - start
    return DecodeRun(
        torch.stack(tokens, 1), torch.stack(exits, 1), seconds, decoder.layer_tokens - layer_tokens,
        decoder.kv_tokens - kv_tokens,
    )  # fmt: skip


@dataclass
class GenerationResult:
    """What `generate` returns; `to_dict()` is JSON-ready."""

    prompt: str
    texts: list[str]  # per row: prompt + continuation, decoded
    continuations: list[str]  # per row: the generated part only
    token_ids: list[list[int]]  # per row: generated ids
    exit_layers: list[list[int]]  # per row: the exit layer of each generated token
    num_layers: int
    tokens_per_s: float  # generated tokens (all rows) per second, with early exit
    mean_layers_per_token: float
    compute_cost: float  # mean_layers_per_token / num_layers (the counted cost)
    theoretical_speedup: float  # 1 / compute_cost
    full_depth_tokens_per_s: float | None = None  # same decoder, routing off
    speedup: float | None = None  # tokens_per_s / full_depth_tokens_per_s
    speedup_over_theoretical: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The first row's prompt + continuation."""
        return self.texts[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def position_limit(model: Backbone) -> int | None:
    """The most positions `model` can hold (a backbone's `max_positions`, e.g. a Hugging Face model's
    `max_position_embeddings`); None for a backbone without a limit (the native model's RoPE)."""
    return getattr(model, "max_positions", None)


def prompt_budget(model: Backbone, max_new_tokens: int, max_context: int | None = None) -> int:
    """Prompt tokens kept: `max_context` (None = the backbone's position limit, else DEFAULT_MAX_CONTEXT), and
    for a backbone with a position limit P, no more than P - max_new_tokens (prompt + new tokens fit P).

    Raises:
        ValueError: A bad max_context, or max_new_tokens that leave no room in the backbone's positions.
    """
    bad = isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1
    if max_context is not None and bad:
        raise ValueError(f"max_context: must be None or an int >= 1, got {max_context!r}")
    limit = position_limit(model)
    context = max_context if max_context is not None else (limit or DEFAULT_MAX_CONTEXT)
    if limit is None:
        return context
    if max_new_tokens >= limit:
        raise ValueError(
            f"max_new_tokens: must be <= {limit - 1} for this backbone ({limit} positions, prompt included), "
            f"got {max_new_tokens}"
        )
    return min(context, limit - max_new_tokens)


def _tail_text(text: str, max_chars: int) -> str:
    """The last `max_chars` characters of text, starting after a whitespace when one is near (no split word)."""
    if len(text) <= max_chars:
        return text
    start = len(text) - max_chars
    for i in range(start, min(start + 256, len(text))):
        if text[i].isspace():
            return text[i + 1 :]
    return text[start:]


def encode_prompt(tokenizer: Tokenizer, text: str, max_tokens: int | None = None) -> tuple[list[int], int, int]:
    """One prompt's ids, its last `max_tokens` only (None: all). -> (ids, tokens dropped, characters dropped).

    Only the text's tail (PROMPT_CHARS_PER_TOKEN characters per kept token, at least PROMPT_MIN_CHARS) is
    encoded; the characters before it are counted, not tokenized.

    Raises:
        ValueError: (naming `prompt`) text the tokenizer cannot encode, e.g. words for a synthetic tokenizer.
    """
    dropped_chars = 0
    if max_tokens is not None:
        tail = _tail_text(text, max(PROMPT_MIN_CHARS, PROMPT_CHARS_PER_TOKEN * max_tokens))
        dropped_chars, text = len(text) - len(tail), tail
    try:
        ids = tokenizer.encode(text)
    except TokenizerMismatchError as err:
        raise ValueError(f"prompt: the model's tokenizer is {err.kind} ({err.expected}), got {err.got!r}") from None
    dropped = 0
    if max_tokens is not None and len(ids) > max_tokens:
        dropped, ids = len(ids) - max_tokens, ids[-max_tokens:]
    return ids, dropped, dropped_chars


def encode_prompts(
    tokenizer: Tokenizer, prompt: str | Sequence[str], batch_size: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids (B, T0): one prompt repeated batch_size times, or a list of prompts of equal token length.

    A prompt longer than `max_tokens` keeps its last `max_tokens` tokens (logged as a warning); a prompt whose
    tokens are mostly the tokenizer's unknown id (`unk_id`, word and char tokenizers) is warned about.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not single and len(prompts) != batch_size:
        raise ValueError(f"prompt: got {len(prompts)} prompts for batch_size {batch_size}")
    kind = getattr(tokenizer, "kind", type(tokenizer).__name__)
    unk_id = getattr(tokenizer, "unk_id", None)
    ids = []
    for row, text in enumerate(prompts):
        kept, dropped, dropped_chars = encode_prompt(tokenizer, text, max_tokens)
        if not kept:
            raise ValueError("prompt: must encode to at least one token")
        which = "prompt" if single else f"prompt {row}"
        if dropped or dropped_chars:
            what = f"{dropped} tokens"
            if dropped_chars:
                what = f"{dropped_chars} characters (not encoded)" + (f" and {dropped} tokens" if dropped else "")
            log.warning(
                "%s: longer than the context allows (%d tokens); dropped its first %s, kept the last %d tokens",
                which, max_tokens, what, len(kept),
            )  # fmt: skip
        unknown = sum(1 for i in kept if i == unk_id) if unk_id is not None else 0
        if unknown * 2 > len(kept):
            log.warning(
                "%s: %d of its %d tokens are %s (unknown to the %s tokenizer); the model sees little of it",
                which, unknown, len(kept), UNK, kind,
            )  # fmt: skip
        ids.append(kept)
    ids = ids * batch_size if single else ids
    if len({len(i) for i in ids}) > 1:
        raise ValueError(
            f"prompt: prompts decoded together must have the same token length, got {[len(i) for i in ids]}"
        )
    return torch.tensor(ids, dtype=torch.long)


def _prompt_ids(
    model: Backbone,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    max_context: int | None,
) -> tuple[torch.Tensor, int]:
    """The prompt's ids (B, T0) on the model's device, cut to the context budget, and that budget."""
    budget = prompt_budget(model, max_new_tokens, max_context)
    device = next(model.parameters()).device
    return encode_prompts(tokenizer, prompt, batch_size, budget).to(device), budget


@contextmanager
def _eval_mode(model: Backbone) -> Iterator[None]:
    """Decode in eval mode; give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate(
    model: Backbone,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = 0,
    batch_size: int | None = None,
    kv_mode: str = "propagate",
    exit_layer: int | Sequence[int] | None = None,
    routing_threshold: float | Sequence[float] | None = None,
    compare_full_depth: bool = True,
    decoder: str = "auto",
    warmup_steps: int = 4,
    threads: int | None = 1,
    max_context: int | None = None,
    threshold_decay: float | None = None,
) -> GenerationResult:
    """Continue `prompt` with early exit and report speed.

    Args:
        model: the trained model; its routing (exit layers, thresholds, confidence) is used unless
            `exit_layer` / `routing_threshold` are given (threshold 0 = full depth).
        tokenizer: the tokenizer the model was trained with (a checkpoint carries it).
        prompt: one prompt (repeated `batch_size` times) or one per row, all of the same token length.
        max_new_tokens, temperature, top_k, kv_mode, decoder: see `SamplingConfig`.
        seed: seeds sampling (a private generator: the global RNG is untouched); same seed, same text.
        batch_size: rows; None = 1 for a string prompt, len(prompt) for a list.
        compare_full_depth: also time the same decoding with routing off, for `speedup`.
        warmup_steps: untimed steps run first, so the timings do not include first-call allocation.
        threads: intra-op threads while decoding (default 1; None = torch's current setting).
        threshold_decay: CALM's decaying threshold (τ >= 0; `ease.routing.decayed_threshold`); None = fixed.
        max_context: the most prompt tokens kept; a longer prompt keeps its last ones, with a warning. None =
            the backbone's position limit (a Hugging Face model's max_position_embeddings), else
            DEFAULT_MAX_CONTEXT (1024). A backbone with a position limit P also keeps prompt + new tokens <= P.

    Raises:
        ValueError: (naming the argument) bad settings, max_new_tokens above MAX_NEW_TOKENS (4096) or the
            backbone's positions, or a prompt the tokenizer cannot encode.
    """
    batch_size = batch_size if batch_size is not None else 1 if isinstance(prompt, str) else len(prompt)
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, batch_size, kv_mode, decoder)
    prompt_ids, budget = _prompt_ids(model, tokenizer, prompt, batch_size, max_new_tokens, max_context)
    exits, thresholds = normalize_routing(
        model.exit_layers if exit_layer is None else exit_layer,
        model.routing_thresholds if routing_threshold is None else routing_threshold,
        model.num_layers,
    )
    with _eval_mode(model):
        if warmup_steps > 0:
            warm = SamplingConfig(warmup_steps, temperature, top_k, batch_size, kv_mode, decoder)
            decode(model, prompt_ids, warm, seed, exit_layer, routing_threshold, threads=threads)
        run = decode(
            model, prompt_ids, sampling, seed, exit_layer, routing_threshold, threads=threads,
            threshold_decay=threshold_decay,
        )  # fmt: skip
        full = None
        if compare_full_depth:
            full = decode(model, prompt_ids, sampling, seed, exit_layer, 0.0, threads=threads)
    L = model.num_layers
    n_tokens = run.tokens.numel()
    mean_layers = run.exit_layers.double().mean().item()
    cost = mean_layers / L
    tokens_per_s = n_tokens / run.seconds
    full_tps = n_tokens / full.seconds if full is not None else None
    speedup = tokens_per_s / full_tps if full_tps else None
    ids = run.tokens.tolist()
    prompt_list = prompt_ids.tolist()
    return GenerationResult(
        prompt=prompt if isinstance(prompt, str) else "\n".join(prompt),
        texts=[tokenizer.decode(p + g) for p, g in zip(prompt_list, ids)],
        continuations=[tokenizer.decode(g) for g in ids],
        token_ids=ids,
        exit_layers=run.exit_layers.tolist(),
        num_layers=L,
        tokens_per_s=tokens_per_s,
        mean_layers_per_token=mean_layers,
        compute_cost=cost,
        theoretical_speedup=1.0 / cost,
        full_depth_tokens_per_s=full_tps,
        speedup=speedup,
        speedup_over_theoretical=speedup * cost if speedup is not None else None,
        settings={
            **asdict(sampling),
            "seed": seed,
            "exit_layers": list(exits),
            "routing_thresholds": list(thresholds),
            "threshold_decay": threshold_decay,
            "prompt_tokens": prompt_ids.shape[1],
            "max_prompt_tokens": budget,
            "layer_tokens": run.layer_tokens,
            "kv_tokens": run.kv_tokens,
            "seconds": run.seconds,
            "threads": threads or torch.get_num_threads(),
        },
    )


@torch.inference_mode()
def generate_speculative(
    model: Backbone,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = 0,
    batch_size: int | None = None,
    draft_exit: int = 1,
    num_speculations: int = 4,
    adaptive: bool = False,
    compare_full_depth: bool = True,
    warmup_tokens: int = 4,
    threads: int | None = 1,
    max_context: int | None = None,
) -> dict[str, Any]:
    """Continue `prompt` by self-speculative decoding (`ease.inference.speculative`) and report its speed.

    The full-depth baseline is the reference decoder with routing off (the same backbone layers and caches, one
    token at a time). With greedy decoding the result also says whether the text equals that baseline's.
    Rows of a batch keep their own lengths (each accepts its own drafts; see `ease.inference.speculative`).
    Returns JSON-ready metrics: texts, token ids, acceptance, tokens/s, speedup, predicted speedup (the batch's,
    limited by its slowest row, and each row's), settings.
    """
    from ease.inference.speculative import SelfSpeculativeDecoder, check_speculative

    check_speculative(model, draft_exit, num_speculations)
    batch_size = batch_size if batch_size is not None else 1 if isinstance(prompt, str) else len(prompt)
    sampling = SamplingConfig(max_new_tokens, temperature, top_k, batch_size, "propagate", "reference")
    prompt_ids, budget = _prompt_ids(model, tokenizer, prompt, batch_size, max_new_tokens, max_context)

    def speculate(n: int) -> tuple[torch.Tensor, Any]:
        generator = None if seed is None else torch.Generator(device=prompt_ids.device).manual_seed(seed)
        decoder = SelfSpeculativeDecoder(model, draft_exit, num_speculations, temperature, top_k, generator, adaptive)
        return decoder.generate(prompt_ids, n)

    with _eval_mode(model):
        with intra_op_threads(threads):
            if warmup_tokens > 0:
                speculate(warmup_tokens)
            tokens, stats = speculate(max_new_tokens)
        full = decode(model, prompt_ids, sampling, seed, None, 0.0, threads=threads) if compare_full_depth else None
    n_tokens = tokens.numel()
    tokens_per_s = n_tokens / stats.seconds
    full_tps = n_tokens / full.seconds if full is not None else None
    predicted = stats.predicted_speedup(model.num_layers, draft_exit, batch_size)
    speedup = tokens_per_s / full_tps if full_tps else None
    ids, prompt_list = tokens.tolist(), prompt_ids.tolist()
    return {
        "mode": "speculative",
        "texts": [tokenizer.decode(p + g) for p, g in zip(prompt_list, ids)],
        "continuations": [tokenizer.decode(g) for g in ids],
        "token_ids": ids,
        "acceptance": stats.acceptance,
        "rounds": stats.rounds,
        "tokens_per_round": n_tokens / batch_size / max(stats.rounds, 1),
        "tokens_per_s": tokens_per_s,
        "full_depth_tokens_per_s": full_tps,
        "speedup": speedup,
        "predicted_speedup": predicted,
        # each row's own prediction: rows keep their own lengths, so a row done early cost fewer rounds
        "row_predicted_speedups": stats.row_predicted_speedups(model.num_layers, draft_exit),
        "speedup_over_predicted": speedup / predicted if speedup is not None and predicted else None,
        # greedy: is the text the full model's greedy text (token for token)? None when sampling or not compared
        "exact_match": bool(torch.equal(tokens, full.tokens)) if full is not None and temperature == 0 else None,
        "settings": {
            **asdict(sampling),
            "seed": seed,
            "draft_exit": draft_exit,
            "num_speculations": num_speculations,
            "adaptive": adaptive,
            "draft_lengths": stats.draft_lengths,
            "prompt_tokens": prompt_ids.shape[1],
            "max_prompt_tokens": budget,
            "draft_layer_tokens": stats.draft_layer_tokens,
            "verify_layer_tokens": stats.verify_layer_tokens,
            "seconds": stats.seconds,
            "threads": threads or torch.get_num_threads(),
        },
    }
