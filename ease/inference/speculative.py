"""Lossless self-speculative decoding: draft with the early layers, verify with the rest in one pass.

LayerSkip (Elhoushi et al. 2024) and Draft & Verify (Zhang et al. 2023): the model's own layers 1..E and its shared
head draft `k` tokens one at a time; layers E+1..L then run once over the k drafted positions, starting from the
draft's own layer-E states, so the early layers' K/V are never recomputed. The verifier's tokens decide:

- greedy: the drafted tokens are kept while they equal the full model's argmax; the first that differs is
  replaced by the full model's token. Every emitted token is the full model's greedy choice, so the text equals
  full-depth greedy decoding token for token (up to float ties: the verifier scores k positions in one call);
- sampling (temperature > 0, optional top-k): Leviathan et al. 2023's rule. Draft token d_j ~ q_j is kept with
  probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from norm(max(0, p_j - q_j)).
  Each emitted token is then distributed as the full model's p, whatever the draft.

Rows of a batch keep their own lengths in one batch: row b has its own cache length n_b and its own count of
produced tokens. A round drafts k tokens for every row at that row's positions n_b..n_b+k-1 and verifies them in
one pass; row b keeps its a_b accepted drafts plus the verifier's token (k when all k were accepted: the last
draft is the next round's input) and its cache keeps positions 0..n_b+a_b (`Backbone.crop_cache` with per-row
lengths), so each row's next round starts from exactly the state full-depth decoding would have. The K/V of
rejected drafts stay in the cache as stale slots: the backbone never lets a query see a slot at or past its
row's length, and every call rewrites the slots from the row's length on before any query reaches them. A row
that has produced `max_new_tokens` stays in the batch (its draft work is wasted, its cache and output no longer
advance) until every row has; nothing loops over rows. Rows of equal lengths (batch 1 always) take the plain
cache path with an int position.

Prompts of different lengths are right-padded with per-row `prompt_lengths`: the padding's K/V are stale slots.

`adaptive=True` picks the draft length each round from the acceptance seen so far (as DEL does for the length):
k grows by one after a round in which every running row accepted all its drafts and shrinks by one after a round
in which none accepted any, within 1..`num_speculations`.
"""

import time
from dataclasses import dataclass, field

import torch

from ease.model.backbone import Backbone
from ease.model.row_cache import row_lengths as row_lengths_of


def check_speculative(model: Backbone, draft_exit: int, num_speculations: int) -> None:
    """One line naming the key for settings that cannot draft or verify."""
    L = model.num_layers
    if isinstance(draft_exit, bool) or not isinstance(draft_exit, int) or not 1 <= draft_exit < L:
        raise ValueError(f"task.draft_exit: must be an int in 1..{L - 1} (layers 1..E draft, E+1..{L} verify), "
                         f"got {draft_exit!r}")  # fmt: skip
    if isinstance(num_speculations, bool) or not isinstance(num_speculations, int) or num_speculations < 1:
        raise ValueError(
            f"task.num_speculations: must be an int >= 1 (tokens drafted per round), got {num_speculations!r}"
        )


@dataclass
class SpeculativeStats:
    """What the decoding did: rounds, drafts made and accepted, layer computations (token x layer).

    `drafted` and `accepted` count the rows still running in a round (a row that has finished drafts along, but
    its drafts are neither counted nor kept), so `acceptance` is the rate at which drafts were really kept."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed to running rows (k per running row per round)
    accepted: int = 0  # of those, the ones the verifier accepted: each is kept by its row
    emitted: int = 0  # tokens output after the prompt (rows x max_new_tokens)
    draft_layer_tokens: int = 0  # token x layer computations of layers 1..E while drafting (every row)
    verify_layer_tokens: int = 0  # token x layer computations of layers E+1..L while verifying (every row)
    seconds: float = 0.0
    draft_lengths: list[int] = field(default_factory=list)  # k of each round (adaptive mode changes it)
    row_rounds: list[int] = field(default_factory=list)  # per row: the rounds it ran until it had all its tokens

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def predicted_speedup(self, num_layers: int, draft_exit: int, rows: int = 1) -> float:
        """The speedup the acceptance and the layer counts predict, at batch 1 where decoding is bound by reading
        the weights: a layer costs the same for 1 or k positions. In units of one full-depth token step, a round
        costs k draft steps of E/L and one verify pass of (L - E)/L; the first token is one full step. Predicted =
        tokens per row / that cost (Leviathan et al. 2023's expected-speedup model, with LayerSkip's draft cost).
        The batch runs until its slowest row is done, so this is the batch's figure; `row_predicted_speedups`
        gives each row's own."""
        L, E = num_layers, draft_exit
        cost = 1.0 + sum(k * E + (L - E) for k in self.draft_lengths) / L
        return self.emitted / rows / cost if self.emitted else 0.0

    def row_predicted_speedups(self, num_layers: int, draft_exit: int) -> list[float]:
        """`predicted_speedup` of each row alone: its tokens over the cost of the rounds it ran (`row_rounds`)."""
        L, E = num_layers, draft_exit
        rows = len(self.row_rounds)
        tokens = self.emitted / rows if rows else 0.0
        costs = [1.0 + sum(k * E + (L - E) for k in self.draft_lengths[:r]) / L for r in self.row_rounds]
        return [tokens / cost for cost in costs]


def _filtered(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Probabilities of softmax(logits / T) over the top-k tokens (the others 0). (..., V) -> (..., V)."""
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.softmax(-1)


class SelfSpeculativeDecoder:
    """Self-speculative decoding of any backbone (through the protocol: `embed`, `layer`, `unembed`, caches).

    Args:
        model: the backbone, in eval mode.
        draft_exit: E; layers 1..E and the shared head draft.
        num_speculations: k, tokens drafted per round (the most, in adaptive mode).
        temperature: 0 = greedy; > 0 samples (with `top_k`), exactly from the full model's distribution.
        top_k: sample among the k most likely tokens (of the draft's and of the verifier's distribution).
        generator: the random source for sampling.
        adaptive: change the draft length with the acceptance (see the module docstring).
    """

    def __init__(
        self,
        model: Backbone,
        draft_exit: int,
        num_speculations: int = 4,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        adaptive: bool = False,
    ) -> None:
        check_speculative(model, draft_exit, num_speculations)
        self.model, self.E, self.k_max = model, draft_exit, num_speculations
        self.temperature, self.top_k, self.generator, self.adaptive = temperature, top_k, generator, adaptive

    def _pick(self, probs: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """Greedy argmax of logits, or a draw from probs. (B, V) -> (B,)"""
        if self.temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor | None:
        return None if self.temperature == 0 else _filtered(logits, self.temperature, self.top_k)

    @torch.inference_mode()
    def generate(
        self, prompt: torch.Tensor, max_new_tokens: int, prompt_lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, SpeculativeStats]:
        """prompt (B, m) ids -> (generated ids (B, max_new_tokens), stats). The prompt is prefilled at full depth.

        `prompt_lengths` (B,): row b's prompt is prompt[b, :prompt_lengths[b]] (right padding); default all m."""
        model, E, L = self.model, self.E, self.model.num_layers
        B, m = prompt.shape
        device = prompt.device
        if prompt_lengths is None:
            lengths = torch.full((B,), m, dtype=torch.long, device=device)
        else:
            lengths = prompt_lengths.to(device=device, dtype=torch.long)
            if lengths.shape != (B,) or not bool(((lengths >= 1) & (lengths <= m)).all()):
                raise ValueError(f"prompt_lengths: must be {B} lengths in 1..{m}, got {prompt_lengths.tolist()}")
        stats = SpeculativeStats()
        cache = model.new_cache(B, m + max_new_tokens + 2 * self.k_max)
        steps = torch.arange(self.k_max, device=device)

        def run(ids: torch.Tensor, start: int | torch.Tensor, first: int, last: int) -> torch.Tensor:
            """Layers first..last on ids (B, T) from position `start`: an int (every row alike) or (B,) per row."""
            h = model.embed(ids, start) if first == 1 else ids
            if isinstance(start, int):  # the plain call, as full-depth decoding makes it
                for i in range(first, last + 1):
                    h = model.layer(i, h, start, cache)
                return h
            positions = start[:, None] + steps[: ids.shape[1]]
            for i in range(first, last + 1):
                h = model.layer(i, h, 0, cache, positions=positions)
            return h

        if m > 1:  # untimed, as in `ease.inference.generation.decode`: the timed part starts at the last prompt token
            run(prompt[:, :-1], 0, 1, L)
        t0 = time.perf_counter()
        longest, ragged = row_lengths_of(lengths - 1)
        if longest == m - 1 and ragged is None:
            last_ids, start = prompt[:, -1:], m - 1
        else:  # each row's last prompt token, at its own position: the padding after it is stale
            model.crop_cache(cache, lengths - 1)
            last_ids = prompt.gather(1, (lengths - 1)[:, None])
            start = longest if ragged is None else lengths - 1
        logits = model.unembed(run(last_ids, start, 1, L)[:, -1]).float()
        out = torch.zeros(B, max_new_tokens + 2 * self.k_max, dtype=torch.long, device=device)
        out[:, 0] = self._pick(self._probs(logits), logits)  # the first token: the full model's
        n = lengths.clone()  # each row's cached positions after this token's K/V
        produced = torch.ones(B, dtype=torch.long, device=device)
        row_rounds = torch.zeros(B, dtype=torch.long, device=device)
        # Where each row's next token goes: an int while the rows are alike (the plain cache path), else n.
        at: int | torch.Tensor = longest + 1 if ragged is None else n
        fewest, most, k = 1, 1, self.k_max  # the fewest and most tokens of any row; this round's draft length
        while fewest < max_new_tokens:
            k = min(k, max_new_tokens - fewest)
            running = None if most < max_new_tokens else produced < max_new_tokens  # (B,); None: every row runs
            last = out.gather(1, (produced - 1)[:, None])  # (B, 1): each row's newest token
            # Draft: k tokens through layers 1..E, one position at a time, keeping the layer-E states.
            states, drafts, q = [], [], []
            token = last
            for j in range(k):
                h = run(token, at + j, 1, E)
                states.append(h)
                draft_logits = model.unembed(h[:, 0]).float()
                probs = self._probs(draft_logits)
                token = self._pick(probs, draft_logits)[:, None]
                drafts.append(token)
                q.append(probs)
            # Verify: layers E+1..L once over the k drafted positions, from the draft's own layer-E states.
            h = run(torch.cat(states, dim=1), at, E + 1, L)  # inputs last, d_1..d_{k-1} at each row's n..n+k-1
            verify_logits = model.unembed(h).float()  # (B, k, V): the full model's next-token logits
            d = torch.cat(drafts, dim=1)  # (B, k)
            corrected, accepted = self._accept(d, q, verify_logits)  # (B, k), (B,)
            # Row b keeps a_b drafts and the verifier's token (k when all were accepted); a finished row, none.
            kept = torch.where(accepted < k, accepted + 1, accepted)
            if running is None:  # the common case, with fewer operations (batch 1 always)
                row_rounds += 1
                counted, low_of, high_of = accepted, accepted, accepted
            else:
                kept, counted = kept * running, accepted * running
                row_rounds += running
                low_of, high_of = torch.where(running, accepted, k), counted
            out.scatter_(1, produced[:, None] + steps[:k], corrected)  # past a row's kept count: rewritten later
            produced += kept
            n = n + kept  # the K/V of `last` and of the first kept - 1 emitted tokens are right: keep them
            # One device sync a round: what the next round and the stats need.
            fewest, most, lo, hi, accepted_sum, low, high = torch.stack([
                produced.min(), produced.max(), n.min(), n.max(), counted.sum(), low_of.min(), high_of.max(),
            ]).tolist()  # fmt: skip
            rows_running = B if running is None else int(running.sum())
            stats.rounds += 1
            stats.drafted += rows_running * k
            stats.accepted += accepted_sum
            stats.draft_layer_tokens += B * k * E
            stats.verify_layer_tokens += B * k * (L - E)
            stats.draft_lengths.append(k)
            at = hi if lo == hi else n
            model.crop_cache(cache, at)
            if self.adaptive:
                k = min(k + 1, self.k_max) if low == k else max(k - 1, 1) if high == 0 else k
        stats.seconds = time.perf_counter() - t0
        tokens = out[:, :max_new_tokens]
        stats.emitted = B * max_new_tokens
        stats.row_rounds = row_rounds.tolist()
        return tokens, stats

    def _accept(
        self, d: torch.Tensor, q: list[torch.Tensor | None], verify_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's tokens this round (B, k) and its accepted draft count a_b (B,): row b emits the first
        a_b + 1 of its tokens (all k when a_b = k): its accepted drafts, then the verifier's correction."""
        B, k = d.shape
        if self.temperature == 0:
            v = verify_logits.argmax(-1)  # (B, k)
            ok = d == v
            corrected = v  # where ok, v equals d: the emitted tokens are the verifier's
        else:
            p = _filtered(verify_logits, self.temperature, self.top_k)  # (B, k, V)
            qd = torch.stack(q, dim=1)  # (B, k, V)
            p_d = p.gather(-1, d[..., None]).squeeze(-1)
            q_d = qd.gather(-1, d[..., None]).squeeze(-1)
            u = torch.rand(d.shape, generator=self.generator, device=d.device)
            ok = u * q_d < p_d  # accept with probability min(1, p/q)
            residual = (p - qd).clamp_min(0)
            empty = residual.sum(-1, keepdim=True) <= 0  # p == q: any draw from p is right
            residual = torch.where(empty, p, residual)
            redraw = torch.multinomial(residual.reshape(B * k, -1), 1, generator=self.generator).view(B, k)
            corrected = torch.where(ok, d, redraw)
        accepted = ok.long().cumprod(dim=1).sum(dim=1)  # (B,) leading accepted drafts
        return corrected, accepted
