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

After each round, every layer's cache keeps the positions whose tokens were emitted (`Backbone.crop_cache`), so
the next round starts from exactly the state full-depth decoding would have.

Rows of a batch stay in one batch with one cache length: a round emits, for every row, as many tokens as the row
that accepted fewest (its accepted drafts plus the verifier's token). Rows that accepted more drop their surplus,
which the next round drafts and verifies again (the emitted tokens are unchanged; only speed is lost). Per-row
lengths without this would need per-row positions and attention masks in the backbone protocol.

`adaptive=True` picks the draft length each round from the acceptance seen so far (as DEL does for the length):
k grows by one after a round whose drafts were all accepted and shrinks by one after a round that accepted none,
within 1..`num_speculations`.
"""

import time
from dataclasses import dataclass, field

import torch

from ease.model.backbone import Backbone


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
    """What the decoding did: rounds, drafts made and accepted, layer computations (token x layer)."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed (rows x k per round)
    accepted: int = 0  # draft tokens the verifier accepted (before the batch's common length is applied)
    emitted: int = 0  # tokens output after the prompt (rows x tokens)
    draft_layer_tokens: int = 0  # token x layer computations of layers 1..E while drafting
    verify_layer_tokens: int = 0  # token x layer computations of layers E+1..L while verifying
    seconds: float = 0.0
    draft_lengths: list[int] = field(default_factory=list)  # k of each round (adaptive mode changes it)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def predicted_speedup(self, num_layers: int, draft_exit: int, rows: int = 1) -> float:
        """The speedup the acceptance and the layer counts predict, at batch 1 where decoding is bound by reading
        the weights: a layer costs the same for 1 or k positions. In units of one full-depth token step, a round
        costs k draft steps of E/L and one verify pass of (L - E)/L; the first token is one full step. Predicted =
        tokens per row / that cost (Leviathan et al. 2023's expected-speedup model, with LayerSkip's draft cost)."""
        L, E = num_layers, draft_exit
        cost = 1.0 + sum(k * E + (L - E) for k in self.draft_lengths) / L
        return self.emitted / rows / cost if self.emitted else 0.0


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
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, SpeculativeStats]:
        """prompt (B, m) ids -> (generated ids (B, max_new_tokens), stats). The prompt is prefilled at full depth."""
        model, E, L = self.model, self.E, self.model.num_layers
        B, m = prompt.shape
        stats = SpeculativeStats()
        cache = model.new_cache(B, m + max_new_tokens + self.k_max)

        def full_depth(ids: torch.Tensor, pos: int) -> torch.Tensor:
            h = model.embed(ids, pos)
            for i in range(1, L + 1):
                h = model.layer(i, h, pos, cache)
            return model.unembed(h[:, -1]).float()

        if m > 1:  # untimed, as in `ease.inference.generation.decode`: the timed part starts at the last prompt token
            full_depth(prompt[:, :-1], 0)
        t0 = time.perf_counter()
        logits = full_depth(prompt[:, -1:], m - 1)
        out = [self._pick(self._probs(logits), logits)]  # the first token: the full model's
        n, produced, k = m, 1, self.k_max  # positions in the caches; tokens produced; this round's draft length
        while produced < max_new_tokens:
            k = min(k, max_new_tokens - produced)
            last = out[-1]
            # Draft: k tokens through layers 1..E, one position at a time, keeping the layer-E states.
            states, drafts, q = [], [], []
            token = last
            for j in range(k):
                h = model.embed(token[:, None], n + j)
                for i in range(1, E + 1):
                    h = model.layer(i, h, n + j, cache)
                states.append(h)
                draft_logits = model.unembed(h[:, 0]).float()
                probs = self._probs(draft_logits)
                token = self._pick(probs, draft_logits)
                drafts.append(token)
                q.append(probs)
            # Verify: layers E+1..L once over the k drafted positions, from the draft's own layer-E states.
            h = torch.cat(states, dim=1)  # (B, k, C): inputs last, d_1..d_{k-1} at positions n..n+k-1
            for i in range(E + 1, L + 1):
                h = model.layer(i, h, n, cache)
            verify_logits = model.unembed(h).float()  # (B, k, V): the full model's next-token logits
            d = torch.stack(drafts, dim=1)  # (B, k)
            emitted, accepted = self._accept(d, q, verify_logits)  # (B, n_new), (B,)
            n_new = emitted.shape[1]
            stats.rounds += 1
            stats.drafted += B * k
            stats.accepted += int(accepted.sum())
            stats.draft_layer_tokens += B * k * E
            stats.verify_layer_tokens += B * k * (L - E)
            stats.draft_lengths.append(k)
            # Keep the K/V of the positions whose inputs were right: last and the first n_new - 1 emitted tokens.
            n += n_new
            model.crop_cache(cache, n)
            out.extend(emitted.unbind(1))
            produced += n_new
            if self.adaptive:
                low = int(accepted.min())
                k = min(k + 1, self.k_max) if low == k else max(k - 1, 1) if low == 0 else k
        stats.seconds = time.perf_counter() - t0
        tokens = torch.stack(out, dim=1)[:, :max_new_tokens]
        stats.emitted = B * tokens.shape[1]
        return tokens, stats

    def _accept(
        self, d: torch.Tensor, q: list[torch.Tensor | None], verify_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens every row emits this round (B, n_new) and each row's accepted draft count (B,).

        Row b accepts a_b leading drafts; it would emit a_b + 1 tokens (a_b = k: k). The batch emits the fewest
        any row would, so every row's emitted tokens are its own valid ones.
        """
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
        would_emit = torch.where(accepted < k, accepted + 1, accepted)
        n_new = int(would_emit.min())
        return corrected[:, :n_new], accepted
