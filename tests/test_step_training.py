"""Training by steps: LR schedules, gradient accumulation, step-indexed data, precision, and their bad values."""

import math

import numpy as np
import pytest
import torch

from ease.config import create_deep_supervision_config
from ease.data import TokenBatches
from ease.model import EarlyExitTransformer
from ease.training import Trainer
from ease.training.config import TrainConfig
from ease.training.lr_schedule import LrSchedule, lr_factor
from ease.training.precision import Precision, check_precision


def plain_factor(step: int, total: int, warmup: int, kind: str, floor: float) -> float:
    """The schedule written out again: warm-up line, then the decay from 1 to floor."""
    if step < warmup:
        return (step + 1) / warmup
    p = min((step - warmup) / (total - warmup), 1.0)
    shape = {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[kind]
    return 1.0 if kind == "constant" else floor + (1.0 - floor) * shape


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_factor_at_chosen_steps(kind: str) -> None:
    for step in (0, 4, 9, 10, 11, 55, 99, 100, 140):
        assert lr_factor(step, 100, 10, kind, 0.1) == pytest.approx(plain_factor(step, 100, 10, kind, 0.1))
    assert lr_factor(9, 100, 10, kind, 0.1) == 1.0  # warm-up reaches the base rate at its last step
    if kind != "constant":
        assert lr_factor(100, 100, 10, kind, 0.1) == pytest.approx(0.1)  # ends at min_lr / lr
        assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)  # half-way down the cosine


def test_lr_schedule_keeps_per_layer_ratios() -> None:
    model = EarlyExitTransformer(32, 16, 3, num_heads=2)
    config = create_deep_supervision_config(3)
    config.layer_lr_scales = {1: 1.0, 2: 0.5, 3: 0.25}
    optimizer = Trainer(config).create_optimizer(model, base_lr=1e-2)
    schedule = LrSchedule("cosine", warmup_steps=2, min_ratio=0.0, total_steps=10)
    schedule.apply(optimizer, 0)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["layer_1"] == pytest.approx(0.5e-2) and lrs["layer_3"] == pytest.approx(0.125e-2)
    schedule.apply(optimizer, 6)
    factor = plain_factor(6, 10, 2, "cosine", 0.0)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["layer_2"] == pytest.approx(0.5e-2 * factor)


def run(
    batch_size: int, grad_accum: int, steps: int, ids: torch.Tensor, precision: str = "fp32"
) -> EarlyExitTransformer:
    torch.manual_seed(0)
    model = EarlyExitTransformer(64, 16, 3, num_heads=2)
    trainer = Trainer(create_deep_supervision_config(3), 64, grad_accum=grad_accum, precision=precision)
    batches = TokenBatches(ids, seq_len=8, batch_size=batch_size, shuffle=True, seed=3)
    optimizer = trainer.create_optimizer(model, 1e-2)
    trainer.total_steps = steps
    trainer.train_steps(model, batches, optimizer, steps)
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (8 * 32 * 3 + 1,), generator=torch.Generator().manual_seed(0))


def test_grad_accum_2_of_16_equals_one_batch_of_32(ids: torch.Tensor) -> None:
    one = run(32, 1, 3, ids)
    two = run(16, 2, 3, ids)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    four = run(8, 4, 3, ids)
    torch.testing.assert_close(next(iter(one.parameters())), next(iter(four.parameters())), rtol=1e-5, atol=1e-6)


def test_steps_read_the_epochs_data_and_resume_at_any_step(ids: torch.Tensor) -> None:
    """6 steps by steps = 2 epochs of 3 batches; 6 steps cut as 4 + 2 (a resume) = 6 straight."""
    torch.manual_seed(0)
    by_epochs = EarlyExitTransformer(64, 16, 3, num_heads=2)
    trainer = Trainer(create_deep_supervision_config(3), 64)
    batches = TokenBatches(ids, seq_len=8, batch_size=32, shuffle=True, seed=3)
    optimizer = trainer.create_optimizer(by_epochs, 1e-2)
    for epoch in range(2):
        trainer.train_epoch(by_epochs, batches, optimizer, epoch)
    straight = run(32, 1, 6, ids)
    for a, b in zip(by_epochs.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    torch.manual_seed(0)
    model = EarlyExitTransformer(64, 16, 3, num_heads=2)
    first = Trainer(create_deep_supervision_config(3), 64)
    optimizer = first.create_optimizer(model, 1e-2)
    first.train_steps(model, batches, optimizer, 4)
    state = {"optimizer": optimizer.state_dict(), "step": first.step, "weights": model.state_dict()}
    second = Trainer(create_deep_supervision_config(3), 64)
    optimizer = second.create_optimizer(model, 1e-2)
    optimizer.load_state_dict(state["optimizer"])
    second.step = state["step"]
    second.train_steps(model, batches, optimizer, 6)
    for a, b in zip(model.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_autocast_trains_on_cpu(ids: torch.Tensor) -> None:
    model = run(32, 1, 3, ids, precision="bf16")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fp32 = run(32, 1, 3, ids)
    first = next(iter(model.parameters()))
    assert not torch.equal(first, next(iter(fp32.parameters())))  # autocast really ran in bf16
    torch.testing.assert_close(first, next(iter(fp32.parameters())), rtol=0.05, atol=0.05)


def test_precision_contexts() -> None:
    with Precision("bf16").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with Precision("fp32").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"^train.precision: fp16 needs a CUDA device.*bf16"):
        check_precision("fp16", "cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grad_accum": 0}, r"^train.grad_accum: must be an int >= 1, got 0$"),
        ({"max_epochs": None}, r"^train.max_steps: set train.max_steps or train.max_epochs"),
        ({"max_steps": 10, "warmup_steps": 10}, r"^train.warmup_steps: must be below train.max_steps \(10\)"),
        ({"lr_schedule": "step"}, r"^train.lr_schedule: must be one of constant, linear, cosine"),
        ({"precision": "fp8"}, r"^train.precision: must be one of fp32, bf16, fp16"),
        ({"distributed": "deepspeed"}, r"^train.distributed: must be one of ddp, fsdp"),
        ({"min_lr": 1.0}, r"^train.min_lr: must be a finite number in \[0, train.lr"),
        ({"eval_every": 0}, r"^train.eval_every: must be an int >= 1"),
    ],
)
def test_bad_step_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_numpy_token_store_gives_the_list_batches() -> None:
    ids = np.random.default_rng(0).integers(0, 60000, 5001).astype(np.uint16)
    a = TokenBatches(ids.tolist(), seq_len=16, batch_size=8, shuffle=True, seed=1)
    b = TokenBatches(ids, seq_len=16, batch_size=8, shuffle=True, seed=1)
    assert len(a) == len(b) and a.num_tokens == b.num_tokens
    for epoch in (0, 3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xb.dtype == torch.long and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(a.batch(3, 5)[1], b.batch(3, 5)[1])
    assert torch.equal(a.target_sample(), b.target_sample())
    # a shard is the rank's block of every batch; the blocks together are the batch
    x, _ = a.batch(2, 4)
    parts = [a.shard(r, 2).batch(2, 4)[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), x) and parts[0].shape[0] == 4
    assert next(iter(a.iter_from(2, 4)))[0].equal(x)
