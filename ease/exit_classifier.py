"""CALM's learned exit classifier ("meta" confidence, Schuster et al. 2022, section 3.5).

One small head per routing exit reads the exit's hidden state (before the shared norm) and predicts whether the
exit's argmax agrees with the last layer's, CALM's consistency oracle; its confidence is the sigmoid of that
score. It is trained with BCE on targets computed without gradients, from detached hidden states, so it never
steers the backbone:

- jointly (`routing.classifier.train=joint`): `classifier_loss` is added to the training loss with a weight;
  it runs its own forward pass without gradients (the targets need the last layer's argmax anyway);
- after training (`train=after`): `train_after`, a short stage with the backbone frozen.

The heads live on the backbone as the submodule `exit_classifier`, so they are in `state_dict()` and in
checkpoint.pt; `ease.checkpoint` stores `ExitClassifier.config_dict()` in the model's arguments and rebuilds the
heads (`attach`) before loading the weights, for the native model and a Hugging Face backbone alike.
"""

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class ExitClassifier(nn.Module):
    """One head per exit layer: hidden state (..., C) -> the probability that the exit agrees with the last layer.

    Args:
        dim: the backbone's hidden size C.
        layers: the exit layers that get a head.
        kind: "linear" (Linear C->1) or "norm_linear" (LayerNorm, then Linear C->1).
    """

    def __init__(self, dim: int, layers: Sequence[int], kind: str = "norm_linear") -> None:
        super().__init__()
        if kind not in ("linear", "norm_linear"):
            raise ValueError(f"routing.classifier.kind: must be one of linear, norm_linear, got {kind!r}")
        self.dim, self.kind = int(dim), kind
        self.layers = tuple(sorted(int(layer) for layer in layers))

        def head() -> nn.Module:
            linear = nn.Linear(dim, 1)
            return nn.Sequential(nn.LayerNorm(dim), linear) if kind == "norm_linear" else linear

        self.heads = nn.ModuleDict({str(layer): head() for layer in self.layers})

    def score(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logit (before the sigmoid). (..., C) -> (...)."""
        if str(layer) not in self.heads:
            raise ValueError(f"routing.confidence: no exit classifier at layer {layer} (heads at {list(self.layers)})")
        head = self.heads[str(layer)]
        param = next(head.parameters())
        return head(hidden.to(param.dtype)).squeeze(-1).float()

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The confidence in [0, 1]: sigmoid of the head's score."""
        return torch.sigmoid(self.score(layer, hidden))

    def config_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "layers": list(self.layers), "kind": self.kind}


def classifier_of(model: nn.Module) -> ExitClassifier | None:
    return getattr(model, "exit_classifier", None)


def attach(model: nn.Module, layers: Sequence[int], kind: str = "norm_linear") -> ExitClassifier:
    """Give `model` (any backbone) an `exit_classifier` submodule with a head at each of `layers`."""
    param = next(model.parameters())
    clf = ExitClassifier(model.dim, layers, kind).to(device=param.device)
    model.exit_classifier = clf
    return clf


def check_confidence(model: nn.Module, confidence: str, exit_layers: Iterable[int], key: str = "checkpoint") -> None:
    """One-line ValueError when `confidence` is the learned one and `model` has no head at an exit layer."""
    if confidence != "classifier":
        return
    clf = classifier_of(model)
    wanted = sorted(set(exit_layers))
    if clf is None:
        raise ValueError(
            f"routing.confidence: classifier needs a model trained with exit classifiers "
            f"(routing.classifier.train=joint|after); this {key} has none"
        )
    missing = [layer for layer in wanted if layer not in clf.layers]
    if missing:
        raise ValueError(f"routing.confidence: the {key}'s exit classifiers are at layers {list(clf.layers)}, "
                         f"not at {missing}")  # fmt: skip


def consistency_targets(exit_logits: torch.Tensor, final_logits: torch.Tensor) -> torch.Tensor:
    """CALM's oracle: 1.0 where the exit's argmax equals the last layer's, else 0.0. (..., V) -> (...)."""
    return (exit_logits.argmax(-1) == final_logits.argmax(-1)).float()


def classifier_terms(model: nn.Module, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (score, target)} for every head: states and targets without gradients, the scores with them."""
    from ease.model.backbone import hidden_states

    clf = classifier_of(model)
    L = model.num_layers
    with torch.no_grad():
        states = hidden_states(model, x, [*clf.layers, L])
        final = model.unembed(states[L])
        targets = {layer: consistency_targets(model.unembed(states[layer]), final) for layer in clf.layers}
    return {layer: (clf.score(layer, states[layer].detach()), targets[layer]) for layer in clf.layers}


def classifier_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean over the heads of each head's BCE against the consistency targets."""
    terms = classifier_terms(model, x)
    losses = [F.binary_cross_entropy_with_logits(score, target) for score, target in terms.values()]
    return torch.stack(losses).mean()


def train_after(
    model: nn.Module, batches: Iterable[Batch], epochs: int, lr: float, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Train only the exit classifier, the backbone frozen and in eval mode (dropout off); returns a summary.

    Adam over the heads' parameters alone; each backbone parameter's `requires_grad` is restored afterwards.
    """
    clf = classifier_of(model)
    if clf is None:
        raise ValueError("routing.classifier.train: after needs the model's exit classifier (none attached)")
    backbone = [p for name, p in model.named_parameters() if not name.startswith("exit_classifier.")]
    flags = [p.requires_grad for p in backbone]
    was_training = model.training
    optimizer = torch.optim.Adam(clf.parameters(), lr=lr)
    history: list[float] = []
    steps = 0
    try:
        for p in backbone:
            p.requires_grad_(False)
        model.eval()
        for epoch in range(epochs):
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            total, count = 0.0, 0
            for x, _ in batches:
                loss = classifier_loss(model, x.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count, steps = total + loss.item(), count + 1, steps + 1
            history.append(total / max(count, 1))
    finally:
        for p, flag in zip(backbone, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return {"train": "after", "epochs": epochs, "steps": steps, "lr": lr, "bce_per_epoch": history}


@torch.no_grad()
def classifier_quality(model: nn.Module, batches: Iterable[Batch], device: str | torch.device = "cpu") -> dict:
    """Per head on `batches`: BCE, accuracy of (p >= 0.5) against the oracle, and the oracle's rate of agreement."""
    clf = classifier_of(model)
    sums: dict[int, list[float]] = {layer: [0.0, 0.0, 0.0] for layer in clf.layers}
    n = 0
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            terms = classifier_terms(model, x.to(device))
            n += x.numel()
            for layer, (score, target) in terms.items():
                s = sums[layer]
                s[0] += F.binary_cross_entropy_with_logits(score, target, reduction="sum").item()
                s[1] += ((score >= 0) == (target > 0.5)).sum().item()
                s[2] += target.sum().item()
    finally:
        model.train(was_training)
    n = max(n, 1)
    return {layer: {"bce": s[0] / n, "acc": s[1] / n, "agreement": s[2] / n} for layer, s in sums.items()}


def learning_rate(config_lr: float | None, train_lr: float) -> float:
    value = train_lr if config_lr is None else config_lr
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"routing.classifier.lr: must be a finite number > 0, got {value}")
    return float(value)
