"""Inference: KV-cached early-exit decoding, generation, and routed evaluation that really skips compute.

decoder.py      EarlyExitDecoder: the reference decoder over the backbone protocol (any backbone)
fused.py        FusedDecoder: the native model's fast path, tested equal to the reference
generation.py   generate(): prompts to text with early exit, timed against full depth
routed_eval.py  skip_routed_forward / evaluate_routed: full-sequence routing that skips layers
"""

from ease.inference.decoder import KV_MODES, EarlyExitDecoder, StepOutput
from ease.inference.fused import FusedDecoder
from ease.inference.generation import GenerationResult, SamplingConfig, TokenSampler, generate, make_decoder
from ease.inference.routed_eval import evaluate_routed, skip_routed_forward

__all__ = [
    "KV_MODES",
    "EarlyExitDecoder",
    "FusedDecoder",
    "GenerationResult",
    "SamplingConfig",
    "StepOutput",
    "TokenSampler",
    "evaluate_routed",
    "generate",
    "make_decoder",
    "skip_routed_forward",
]
