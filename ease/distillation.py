"""Distillation to the exits: each weighted exit also learns a teacher's distribution, by KL divergence.

    loss = Σ_l w_l · CE_l  +  weight · Σ_{students l} T² · KL(softmax(z_t / T) || softmax(z_l / T))

Self-distillation ("Be Your Own Teacher", Zhang et al., 2019; for early-exit LMs e.g. the layer-wise
self-distillation of Elbayad et al., 2020 and EE-LLM, Chen et al., 2023): the teacher z_t is the model's own
last layer L, DETACHED, and the students are the exits l < L with a loss weight w_l > 0, so their logits come
from the one head call `weighted_exit_loss` already makes. A frozen teacher (`DistillConfig.teacher`, an
EASE checkpoint): z_t is that model's last layer (eval mode, no_grad) and every weighted exit, L included,
is a student. T² keeps the gradient scale independent of T (Hinton et al., 2015). The KL is summed over the
vocabulary and averaged over tokens; exits are summed, not averaged (the weight is per exit).
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ease.losses import weighted_exit_terms
from ease.model.backbone import Backbone, LayerFn, hidden_states


@dataclass
class DistillConfig:
    """The `distill` group.

    Attributes:
        weight: weight of the distillation term (0 = off, the default: training is the weighted CE alone).
        temperature: T > 0; both distributions are softened by it and the term scaled by T².
        teacher: an EASE checkpoint.pt whose last layer is the frozen teacher; null = the model's own last layer.
    """

    weight: float = 0.0
    temperature: float = 1.0
    teacher: str | None = None

    def __post_init__(self) -> None:
        w, t = self.weight, self.temperature
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"distill.weight: must be a finite number >= 0 (0 = off), got {w!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"distill.temperature: must be a finite number > 0, got {t!r}")
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise ValueError(f"distill.teacher: file not found: {self.teacher}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @property
    def kind(self) -> str:
        """none | self | teacher: what the run does."""
        return "none" if not self.enabled else "self" if self.teacher is None else "teacher"


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) || softmax(student/T)) per student, averaged over tokens.

    student (k, ..., V), teacher (..., V), already detached by the caller if it must not learn -> (k,).
    """
    t = temperature
    log_q = F.log_softmax(student.float() / t, dim=-1)  # (k, ..., V)
    log_p = F.log_softmax(teacher.float() / t, dim=-1).expand_as(log_q)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (k, ...)
    return (t * t) * kl.reshape(kl.shape[0], -1).mean(dim=1)


def teacher_logits(teacher: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's last-layer logits (B, T, V), without a graph."""
    with torch.no_grad():
        h = hidden_states(teacher, x, [teacher.num_layers])[teacher.num_layers]
        return teacher.unembed(h)


@dataclass
class DistillLoss:
    """One batch's objective with distillation and what went into it."""

    loss: torch.Tensor  # Σ w_l CE_l + weight · Σ_students KL_l
    per_exit: dict[int, torch.Tensor]  # each weighted exit's CE
    kl: dict[int, float]  # each student's T²·KL (mean over the batch's tokens)
    tokens: int


def distilled_exit_loss(
    model: Backbone,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: dict[int, float],
    weight: float,
    temperature: float,
    teacher: Backbone | None = None,
    layer_fn: LayerFn | None = None,
) -> DistillLoss:
    """The weighted exit loss plus the distillation term, from one head call over the weighted exits.

    Self (teacher None): the last layer must be weighted (its logits are the teacher, detached); the students
    are the weighted exits below it. Frozen teacher: its last layer teaches every weighted exit. `layer_fn`
    runs the model's layers (layer dropout, `ease.losses.weighted_exit_loss`); the frozen teacher runs whole.
    """
    ce, per_exit, layers, logits = weighted_exit_terms(model, x, y, weights, layer_fn)  # logits (k, B, T, V)
    L = model.num_layers
    if teacher is None:
        if layers[-1] != L:
            raise ValueError(f"distill.weight: self-distillation teaches from layer {L}, which has no loss weight")
        target, students = logits[-1].detach(), list(range(len(layers) - 1))
    else:
        target, students = teacher_logits(teacher, x), list(range(len(layers)))
    if not students:  # final_only: nothing to distil into
        return DistillLoss(ce, per_exit, {}, y.numel())
    kl = distillation_kl(logits[students], target, temperature)  # (s,)
    loss = ce + weight * kl.sum()
    return DistillLoss(loss, per_exit, {layers[i]: v for i, v in zip(students, kl.detach().tolist())}, y.numel())


class Distiller:
    """What a Trainer needs to distil: the settings and, for the teacher mode, the frozen teacher model."""

    def __init__(self, weight: float, temperature: float, teacher: Backbone | None = None) -> None:
        self.weight, self.temperature, self.teacher = weight, temperature, teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    @property
    def kind(self) -> str:
        return "self" if self.teacher is None else "teacher"

    def loss(
        self,
        model: Backbone,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: dict[int, float],
        layer_fn: LayerFn | None = None,
    ) -> DistillLoss:
        return distilled_exit_loss(model, x, y, weights, self.weight, self.temperature, self.teacher, layer_fn)

    def summary(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        """An epoch's token-weighted mean KL per student exit, from the batches' reports."""
        tokens = sum(r["tokens"] for r in reports)
        sums: dict[int, float] = {}
        for r in reports:
            for layer, value in r["kl"].items():
                sums[int(layer)] = sums.get(int(layer), 0.0) + value * r["tokens"]
        return {"kl": {layer: s / max(tokens, 1) for layer, s in sorted(sums.items())}}

    @torch.no_grad()
    def evaluate(self, model: Backbone, batches: Any, weights: dict[int, float], device: Any) -> dict[int, float]:
        """Each student's T²·KL on `batches` (token-weighted), in eval mode: the gap left at the end."""
        was_training = model.training
        model.eval()
        reports = []
        try:
            for x, y in batches:
                out = self.loss(model, x.to(device), y.to(device), weights)
                reports.append({"kl": out.kl, "tokens": out.tokens})
        finally:
            model.train(was_training)
        return self.summary(reports)["kl"]


def load_teacher(path: str, vocab_size: int, device: Any = "cpu") -> Backbone:
    """The frozen teacher of `distill.teacher` (safe loading), on `device`; one-line error on a vocab mismatch."""
    from ease.checkpoint import model_from_args, read_checkpoint

    ckpt = read_checkpoint(path, "cpu", key="distill.teacher")
    teacher = model_from_args(ckpt["model_args"])
    teacher.load_state_dict(ckpt["model"])
    if teacher.vocab_size != vocab_size:
        raise ValueError(
            f"distill.teacher: {path} has vocab_size {teacher.vocab_size}, the model has {vocab_size} "
            "(teacher and student must share the vocabulary)"
        )
    return teacher.to(device).eval()
