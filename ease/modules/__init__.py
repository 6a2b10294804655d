"""Building blocks of the early-exit Transformer: norm, attention with RoPE, gated FFN, block."""

from ease.modules.attention import CausalSelfAttention, RotaryEmbedding, apply_rotary
from ease.modules.block import TransformerBlock
from ease.modules.ffn import GatedLinearUnit, SwiGLU
from ease.modules.norm import RMSNorm

__all__ = [
    "CausalSelfAttention",
    "GatedLinearUnit",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "apply_rotary",
]
