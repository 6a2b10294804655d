"""Mixed precision: autocast for forward passes, and a gradient scaler for fp16.

fp32 runs no autocast at all, so its numbers are those of a run without this module. bf16 autocasts on CPU
and GPU (same exponent range as fp32: no scaler needed); fp16 needs the scaler against underflowing
gradients and is refused on CPU, where PyTorch emulates fp16 matmuls slower than fp32 and bf16 is the
low-precision type that CPU autocast is built for.
"""

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str | torch.device) -> None:
    if precision not in DTYPES:
        raise ValueError(f"train.precision: must be one of {', '.join(DTYPES)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError(
            "train.precision: fp16 needs a CUDA device; on CPU PyTorch emulates fp16 matmuls (slower than fp32) "
            "and autocast is built for bf16: use train.precision=bf16"
        )


class Precision:
    """How forward passes and optimizer steps run at one precision on one device."""

    def __init__(self, precision: str = "fp32", device: str | torch.device = "cpu") -> None:
        check_precision(precision, device)
        self.name = precision
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grad_clip: float | None) -> None:
        """Clip the gradient norm (after unscaling) and step; fp16 skips a step whose gradients overflowed."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
