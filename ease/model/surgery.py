"""Model surgery over the backbone protocol: freezing the lower layers and checking they stayed frozen.

ASHEM (seed 002) grows a trained Block 1 with `Backbone.extended`, freezes the embedding, layers 1..k (and
by default the shared norm + head) with `freeze_lower_layers`, trains the rest, and proves with
`params_unchanged` that nothing frozen moved.
"""

import logging

import torch
from torch import nn

from ease.model.backbone import Backbone

log = logging.getLogger("ease.model")


def frozen_groups(num_lower_layers: int, freeze_head: bool = True) -> list[str]:
    """Names of the parameter groups (`Backbone.param_groups`) that `freeze_lower_layers` freezes."""
    names = ["embedding", *(f"layer_{i}" for i in range(1, num_lower_layers + 1))]
    return [*names, "head"] if freeze_head else names


def freeze_lower_layers(model: Backbone, num_lower_layers: int, freeze_head: bool = True) -> dict[str, torch.Tensor]:
    """Freeze the embedding and layers 1..num_lower_layers (and the shared norm + head if `freeze_head`).

    Returns a copy of every frozen parameter, by name, for `params_unchanged`.
    """
    names = set(frozen_groups(num_lower_layers, freeze_head))
    frozen = {id(p) for name, params in model.param_groups() if name in names for p in params}
    snapshot = {}
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            snapshot[name] = p.detach().clone()
    head = dict(model.param_groups())["head"]
    if not freeze_head and any(id(p) in frozen for p in head):
        log.warning("tie_weights: the output head is the frozen embedding, so the head stays frozen too")
    return snapshot


def params_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """True when every parameter in `snapshot` is bit-identical to its copy."""
    params = dict(model.named_parameters())
    return all(torch.equal(params[name].detach(), value) for name, value in snapshot.items())
