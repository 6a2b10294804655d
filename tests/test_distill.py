"""Distillation to the exits (ease/distillation.py): the loss against a plain loop, no gradient into the
teacher, a frozen teacher checkpoint, one-line errors, the preset through the app, a tiny HF Llama."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose, random_batches
from hf_models import tiny

from ease.app import build
from ease.app.runner import run, validate
from ease.checkpoint import save_checkpoint
from ease.config import TrainingConfig
from ease.distillation import DistillConfig, Distiller, distilled_exit_loss, load_teacher
from ease.losses import uniform, weighted_exit_loss
from ease.model import EarlyExitTransformer
from ease.model.backbone import exit_logits
from ease.training import Trainer

V, L = 50, 3


def native(seed: int = 0, vocab: int = V, layers: int = L) -> EarlyExitTransformer:
    torch.manual_seed(seed)
    return EarlyExitTransformer(vocab, 32, layers, num_heads=4)


def plain_loss(model, x, y, weights, weight, temperature, teacher=None) -> tuple[torch.Tensor, dict[int, float]]:
    """Σ_l w_l CE_l + weight · Σ_students T² KL, one layer at a time, the KL written out as a sum."""
    last = model.num_layers
    total = torch.zeros(())
    for layer, w in weights.items():
        if w > 0:
            z = exit_logits(model, x, [layer])[layer]
            total = total + w * F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
    if teacher is None:
        z_t = exit_logits(model, x, [last])[last].detach()
        students = [layer for layer, w in weights.items() if w > 0 and layer < last]
    else:
        with torch.no_grad():
            z_t = exit_logits(teacher, x, [teacher.num_layers])[teacher.num_layers]
        students = [layer for layer, w in weights.items() if w > 0]
    kls = {}
    for layer in students:
        z = exit_logits(model, x, [layer])[layer]
        p = torch.softmax(z_t / temperature, dim=-1)
        kl = (p * (torch.log(p) - torch.log_softmax(z / temperature, dim=-1))).sum(-1).mean()
        kls[layer] = temperature**2 * kl
        total = total + weight * kls[layer]
    return total, {layer: v.item() for layer, v in kls.items()}


@pytest.mark.parametrize("backbone", ["native", "hf_llama"])
@pytest.mark.parametrize("weights", [uniform(L), {1: 0.7, 2: 0.0, 3: 0.3}])
def test_loss_equals_plain_reimplementation(backbone: str, weights: dict[int, float]) -> None:
    model = native() if backbone == "native" else tiny("llama", vocab=V, layers=L)
    x, y = random_batches(V, n=1)[0]
    out = distilled_exit_loss(model, x, y, weights, 0.5, 2.0)
    ref, kls = plain_loss(model, x, y, weights, 0.5, 2.0)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert sorted(out.kl) == [layer for layer in (1, 2) if weights[layer] > 0]
    assert out.kl == pytest.approx(kls, rel=1e-4, abs=1e-7)
    assert all(v > 0 for v in out.kl.values())  # random exits disagree with the last layer


def grads(model, loss: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        name: {str(i): p.grad.clone() if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(ps)}
        for name, ps in model.param_groups()
    }


def test_no_gradient_flows_into_the_last_layer_teacher() -> None:
    """Self mode: the last layer's logits are detached, so layer L gets exactly the CE-only gradient; the
    lower layers and the shared head do get the KL's gradient."""
    model, (x, y) = native(), random_batches(V, n=1)[0]
    weights = uniform(L)
    with_kl = grads(model, distilled_exit_loss(model, x, y, weights, 1.0, 2.0).loss)
    ce_only = grads(model, weighted_exit_loss(model, x, y, weights)[0])
    for key, g in with_kl[f"layer_{L}"].items():
        torch.testing.assert_close(g, ce_only[f"layer_{L}"][key], rtol=0, atol=0)
    for name in ("layer_1", "head"):
        assert any(not torch.allclose(g, ce_only[name][k]) for k, g in with_kl[name].items()), name


def teacher_checkpoint(path: Path, vocab: int = V, layers: int = 4) -> Path:
    save_checkpoint(path, native(seed=7, vocab=vocab, layers=layers))
    return path


def test_frozen_teacher_checkpoint(tmp_path: Path) -> None:
    """The teacher is a checkpoint's last layer (safe-loaded, eval mode, no grad); every weighted exit, L
    included, learns from it, and a training step leaves the teacher as it was."""
    teacher = load_teacher(str(teacher_checkpoint(tmp_path / "t.pt")), V)
    assert teacher.num_layers == 4 and not teacher.training
    model, batches = native(), random_batches(V, n=2)
    x, y = batches[0]
    weights = uniform(L)
    out = distilled_exit_loss(model, x, y, weights, 0.5, 2.0, teacher)
    ref, kls = plain_loss(model, x, y, weights, 0.5, 2.0, teacher)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert sorted(out.kl) == [1, 2, 3] and out.kl == pytest.approx(kls, rel=1e-4, abs=1e-7)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = Trainer(TrainingConfig(layer_weights=weights), V, distill=Distiller(0.5, 2.0, teacher))
    trainer.train_epoch(model, batches, trainer.create_optimizer(model))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_bad_inputs_one_line_each(tmp_path: Path) -> None:
    cases = [
        ({"weight": 0.5, "temperature": 0.0}, r"^distill\.temperature: must be a finite number > 0, got 0\.0$"),
        ({"weight": 0.5, "temperature": -1.0}, r"^distill\.temperature: must be a finite number > 0"),
        ({"weight": -0.1}, r"^distill\.weight: must be a finite number >= 0 \(0 = off\), got -0\.1$"),
        ({"weight": math.inf}, r"^distill\.weight: must be a finite number >= 0"),
        ({"weight": 0.5, "teacher": str(tmp_path / "nope.pt")}, r"^distill\.teacher: file not found: .*nope\.pt$"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            DistillConfig(**kwargs)
        assert "\n" not in str(err.value)
    other = teacher_checkpoint(tmp_path / "v60.pt", vocab=60)
    with pytest.raises(ValueError, match=r"^distill\.teacher: .*v60\.pt has vocab_size 60, the model has 50 \("):
        load_teacher(str(other), V)
    # Through the app, before any data is read: Hydra keys, one line.
    with pytest.raises(ValueError, match=r"^distill\.temperature: must be a finite number > 0"):
        validate(compose(["distill=self", "distill.temperature=0"]))
    with pytest.raises(ValueError, match=r"^distill\.weight: distillation trains .* got strategy=token_routed"):
        validate(compose(["+preset=token_routed", "distill=self"]))
    with pytest.raises(ValueError, match=r"^distill\.weight: self-distillation teaches from the last layer \(3\)"):
        validate(compose(["+preset=asymmetric", "loss_weights.alpha=1.0", "distill=self"]))


def test_off_by_default() -> None:
    cfg = compose(FAST)
    assert build.group(cfg, "distill").kind == "none" and build.distiller(cfg, V) is None
    assert build.group(compose(["+preset=self_distill"]), "distill").kind == "self"


def metrics(overrides: list[str], out: Path) -> dict:
    record = run(compose(overrides), out)
    assert record["status"] == "ok"
    return record["metrics"]


def test_preset_trains_and_records_what_it_did(tmp_path: Path) -> None:
    m = metrics(["+preset=self_distill", *FAST, "train.max_epochs=2"], tmp_path / "self")
    d = m["distill"]
    assert (d["kind"], d["weight"], d["temperature"], d["teacher_layer"], d["students"]) == (
        "self",
        0.5,
        2.0,
        3,
        [1, 2],
    )
    assert [e["epoch"] for e in d["epochs"]] == [1, 2] and all(v > 0 for v in d["epochs"][-1]["kl"].values())
    assert sorted(d["val_kl"]) == [1, 2] and {"epoch": 1, **m["history"][0]["distill"]} == d["epochs"][0]
    # The frozen-teacher mode through the app: the run above is the teacher.
    teacher = str(tmp_path / "self" / "checkpoint.pt")
    t = metrics([*FAST, "loss_weights=uniform", "distill=self", f"distill.teacher={teacher}"], tmp_path / "t")
    assert t["distill"]["kind"] == "teacher" and t["distill"]["students"] == [1, 2, 3]
    assert t["distill"]["teacher"] == teacher and sorted(t["distill"]["val_kl"]) == [1, 2, 3]


def test_one_step_on_a_tiny_hf_llama() -> None:
    model = tiny("llama", vocab=V, layers=L).train()
    trainer = Trainer(TrainingConfig(layer_weights=uniform(L)), V, distill=Distiller(0.5, 2.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.train_epoch(model, random_batches(V, n=1), trainer.create_optimizer(model))
    assert math.isfinite(result.loss) and sorted(result.stats["kl"]) == [1, 2]
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
