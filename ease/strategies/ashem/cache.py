"""The hard examples: Block 1's exit states of every window, their confidences, and the threshold.

Phase 2 never re-runs the frozen block. `cache_exit_states` runs it once over the data and keeps the
layer-k hidden state of every position; phase 2 trains from those tensors. Because the frozen block is
deterministic (it is evaluated in eval mode, no dropout), this gives exactly the loss of re-running it.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ease.evaluation import Batch
from ease.model.backbone import Backbone, hidden_states
from ease.routing import confidence_fn


def compute_confidence(model: Backbone, hidden_state: torch.Tensor, confidence: str = "max_prob") -> torch.Tensor:
    """Confidence of the shared exit on a hidden state (seed: max softmax probability). (..., C) -> (...)."""
    return confidence_fn(confidence)(model.unembed(hidden_state))


def confidence_quantile(confidences: torch.Tensor, q: float) -> float:
    """The q-quantile with linear interpolation (as `torch.quantile`), for any number of values.

    `torch.quantile` refuses inputs above 2^24 elements; sorting does not.
    """
    values = confidences.detach().reshape(-1).double().sort().values
    if values.numel() == 0:
        raise ValueError("compute_confidence_threshold: no tokens to compute the threshold from")
    pos = q * (values.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, values.numel() - 1)
    return float(values[lo] + (pos - lo) * (values[hi] - values[lo]))


@dataclass
class HardExamples:
    """Layer-k hidden states of every window of one split, and which tokens are hard.

    Windows are kept whole so Block 2 can attend over every earlier position (see the module docstring).
    Item access (`hard["hidden_states"]`) gives the seed's per-token view: only the hard tokens.

    Attributes:
        inputs: (W, T) input ids.
        targets: (W, T) next-token ids.
        hidden_states: (W, T, C) output of layer `exit_layer`, before the shared norm.
        confidences: (W, T) exit confidence of each position.
        hard_mask: (W, T) True where confidence < threshold (the token routes past the exit).
        threshold: the routing threshold (NaN before one is set).
        exit_layer: k, the layer the states come from.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    hidden_states: torch.Tensor
    confidences: torch.Tensor
    exit_layer: int
    threshold: float = math.nan
    hard_mask: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.hard_mask is None:
            self.hard_mask = torch.zeros_like(self.targets, dtype=torch.bool)

    def with_threshold(self, threshold: float) -> "HardExamples":
        """The same cache with hard = confidence < threshold (tensors are shared, not copied)."""
        return HardExamples(
            self.inputs, self.targets, self.hidden_states, self.confidences, self.exit_layer, float(threshold),
            self.confidences < threshold,
        )  # fmt: skip

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()

    @property
    def num_hard_tokens(self) -> int:
        return int(self.hard_mask.sum().item())

    @property
    def hard_ratio(self) -> float:
        """Measured share of hard tokens."""
        return self.num_hard_tokens / max(self.num_tokens, 1)

    def __getitem__(self, key: str) -> torch.Tensor:
        """Seed 002's dict view: 'inputs', 'hidden_states', 'targets', 'confidences' of the hard tokens only."""
        if key not in ("inputs", "hidden_states", "targets", "confidences"):
            raise KeyError(key)
        return getattr(self, key)[self.hard_mask]


@torch.no_grad()
def cache_exit_states(
    model: Backbone,
    batches: Iterable[Batch],
    exit_layer: int | None = None,
    confidence: str = "max_prob",
    device: str | torch.device = "cpu",
) -> HardExamples:
    """Run layers 1..exit_layer once over `batches` (eval mode) and keep every position's state and confidence.

    The tensors are stored on the CPU: W·T·C floats for the hidden states.
    """
    exit_layer = exit_layer or model.num_layers
    parts: dict[str, list[torch.Tensor]] = {"inputs": [], "targets": [], "hidden_states": [], "confidences": []}
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x = x.to(device)
            h = hidden_states(model, x, [exit_layer])[exit_layer]  # (B, T, C)
            parts["inputs"].append(x.cpu())
            parts["targets"].append(y.cpu())
            parts["hidden_states"].append(h.float().cpu())
            parts["confidences"].append(compute_confidence(model, h, confidence).cpu())
    finally:
        model.train(was_training)
    if not parts["inputs"]:
        raise ValueError("collect_hard_examples: the batches are empty")
    if len({t.shape[1] for t in parts["inputs"]}) > 1:
        raise ValueError("collect_hard_examples: every batch must have the same sequence length")
    return HardExamples(**{name: torch.cat(chunks) for name, chunks in parts.items()}, exit_layer=exit_layer)


def compute_confidence_threshold(
    model: Backbone,
    val_batches: Iterable[Batch],
    target_ratio: float,
    device: str | torch.device = "cpu",
    exit_layer: int | None = None,
    confidence: str = "max_prob",
) -> float:
    """The confidence below which `target_ratio` of the tokens fall (seed: torch.quantile(conf, ratio)).

    `exit_layer` defaults to the model's last layer (the top of the phase-1 block).
    """
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"hard_example_ratio: must be in (0, 1), got {target_ratio}")
    cache = cache_exit_states(model, val_batches, exit_layer, confidence, device)
    return confidence_quantile(cache.confidences, target_ratio)


def collect_hard_examples(
    model: Backbone,
    batches: Iterable[Batch],
    threshold: float,
    device: str | torch.device = "cpu",
    exit_layer: int | None = None,
    confidence: str = "max_prob",
) -> HardExamples:
    """The tokens whose exit confidence is below `threshold`: inputs, layer-k hidden states, targets, confidences."""
    return cache_exit_states(model, batches, exit_layer, confidence, device).with_threshold(threshold)


# --- phase-2 batches and loss -------------------------------------------------------------------------------

HardBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # hidden (B, T, C), targets (B, T), hard mask (B, T)
