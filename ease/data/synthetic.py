"""A generated token stream with a known share of "easy" positions, for testing early exits.

The vocabulary is split, by a seeded permutation, into *trigger* tokens and *free* tokens. Triggers form
``num_chains`` chains of ``chain_len`` tokens each; a trigger is ALWAYS followed by its fixed successor (the
next token of its chain, or, for the chain's last token, one fixed free token). After a free token the next
token is random: with probability ``head_prob`` a uniformly chosen chain head, else a uniformly chosen free
token. So:

* easy positions: those whose previous token is a trigger (``SyntheticRules.determined_mask``); a model can
  predict them with certainty, and their share of the stream is ``deterministic_fraction`` on average;
* hard positions: all others; no model can beat the uniform guess among heads/free tokens there.

``chain_len`` is 1 for fractions up to 1/3 and grows above that, so high fractions need a large vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK63 = (1 << 63) - 1
_SAMPLING_SALT = 0x5DEECE66D  # separates the stream's generator from the rules' generator of the same seed
# Cap on the chance of drawing a chain head, so random positions still mostly draw free tokens.
_MAX_HEAD_PROB = 0.5


@dataclass(frozen=True, eq=False)
class SyntheticRules:
    """The fixed successor table behind a synthetic stream.

    Attributes:
        vocab_size: Number of token ids.
        successor: ``(V,)`` long; the fixed next token of each trigger, -1 for free tokens.
        chains: ``(num_chains, chain_len + 1)`` long; each row is a chain head, its followers, and the free
            token that ends it (the tokens a random head draw emits in a row).
        free_tokens: ``(F,)`` long; tokens followed by a random draw.
        head_prob: Chance that a random draw picks a chain head rather than a free token.
        deterministic_fraction: Expected share of easy positions.
    """

    vocab_size: int
    successor: torch.Tensor
    chains: torch.Tensor
    free_tokens: torch.Tensor
    head_prob: float
    deterministic_fraction: float

    @property
    def trigger_mask(self) -> torch.Tensor:
        """``(V,)`` bool: True for tokens whose successor is fixed."""
        return self.successor >= 0

    def determined_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: True where ``ids[t]`` is fixed by ``ids[t-1]`` (the easy positions; t=0 is False)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        mask[1:] = self.trigger_mask[ids[:-1]]
        return mask


def synthetic_rules(vocab_size: int, deterministic_fraction: float, seed: int = 0) -> SyntheticRules:
    """Build the successor table for :func:`make_synthetic_corpus` (same arguments give the same table).

    Raises:
        ValueError: The fraction is out of [0, 1) or needs longer chains than the vocabulary allows.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"data.synthetic_vocab_size: must be an int >= 4, got {vocab_size!r}")
    f = deterministic_fraction
    if isinstance(f, bool) or not 0.0 <= f < 1.0:
        raise ValueError(f"data.synthetic_deterministic_fraction: must be in [0, 1), got {f!r}")
    generator = torch.Generator().manual_seed(seed & _MASK63)
    perm = torch.randperm(vocab_size, generator=generator)
    if f == 0.0:
        empty = torch.empty(0, 1, dtype=torch.long)
        return SyntheticRules(vocab_size, torch.full((vocab_size,), -1), empty, perm, 0.0, 0.0)
    # A random draw starts a run of 1 token (free) or 1 + chain_len tokens (head), so the easy share is
    # p*k / (1 + p*k) for head_prob p and chain_len k; pick the shortest k with p <= _MAX_HEAD_PROB.
    ratio = f / (1.0 - f)
    chain_len = max(1, math.ceil(ratio / _MAX_HEAD_PROB - 1e-9))
    head_prob = ratio / chain_len
    num_chains = max(1, (vocab_size // 2) // chain_len)
    num_triggers = num_chains * chain_len
    if vocab_size - num_triggers < 2:
        raise ValueError(
            f"data.synthetic_deterministic_fraction: {f} needs chains of {chain_len} tokens, "
            f"too long for synthetic_vocab_size {vocab_size}"
        )
    triggers = perm[:num_triggers].view(num_chains, chain_len)
    free = perm[num_triggers:]
    ends = free[torch.randint(len(free), (num_chains, 1), generator=generator)]
    chains = torch.cat([triggers, ends], dim=1)  # (num_chains, chain_len + 1)
    successor = torch.full((vocab_size,), -1, dtype=torch.long)
    successor[chains[:, :-1].reshape(-1)] = chains[:, 1:].reshape(-1)
    return SyntheticRules(vocab_size, successor, chains, free, head_prob, f)


def make_synthetic_corpus(
    num_tokens: int, vocab_size: int = 64, deterministic_fraction: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """Generate a token stream in which about ``deterministic_fraction`` of positions are easy.

    Args:
        num_tokens: Length of the stream.
        vocab_size: Number of token ids.
        deterministic_fraction: Expected share of positions fixed by their previous token, in [0, 1).
        seed: Seeds both the rules (:func:`synthetic_rules` with the same arguments rebuilds them) and the
            stream.

    Returns:
        ``(num_tokens,)`` long tensor of ids in ``[0, vocab_size)``.

    Raises:
        ValueError: Bad sizes or fraction.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"data.synthetic_tokens: must be an int >= 1, got {num_tokens!r}")
    rules = synthetic_rules(vocab_size, deterministic_fraction, seed)
    generator = torch.Generator().manual_seed((seed ^ _SAMPLING_SALT) & _MASK63)
    chunks: list[torch.Tensor] = []
    have = 0
    while have < num_tokens:  # usually one pass; the estimate below is padded for run-length noise
        num_runs = int((num_tokens - have) * (1.0 - deterministic_fraction) * 1.1) + 16
        chunk = _sample_runs(rules, num_runs, generator)
        chunks.append(chunk)
        have += len(chunk)
    return torch.cat(chunks)[:num_tokens]


def _sample_runs(rules: SyntheticRules, num_runs: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``num_runs`` runs (a free token, or a whole chain) and lay them end to end, without Python loops."""
    run_width = rules.chains.shape[1]
    is_head = torch.rand(num_runs, generator=generator) < rules.head_prob
    if len(rules.chains) == 0:
        is_head.zero_()
    head = torch.randint(max(len(rules.chains), 1), (num_runs,), generator=generator)
    free = rules.free_tokens[torch.randint(len(rules.free_tokens), (num_runs,), generator=generator)]
    run_len = torch.where(is_head, run_width, 1)  # (R,)
    run_of = torch.repeat_interleave(torch.arange(num_runs), run_len)  # (N,) run index of each position
    starts = torch.cumsum(run_len, 0) - run_len
    offset = torch.arange(len(run_of)) - starts[run_of]  # (N,) position inside its run
    if len(rules.chains) == 0:
        return free[run_of]
    from_chain = rules.chains[head[run_of], offset.clamp(max=run_width - 1)]
    return torch.where(is_head[run_of], from_chain, free[run_of])
