"""The model side of EASE: the backbone protocol, the native early-exit transformer and its blocks.

backbone.py     the `Backbone` protocol everything else runs models through, and its compositions
transformer.py  `EarlyExitTransformer`, the native backbone (embedding, blocks, shared norm + head)
block.py        pre-norm block; attention.py (RoPE, KV cache), ffn.py (SwiGLU), norm.py (RMSNorm)
surgery.py      freezing lower layers and checking they stayed frozen (ASHEM)
"""

from ease.model.attention import CausalSelfAttention, KVCache, RotaryEmbedding, apply_rotary
from ease.model.backbone import Backbone, RoutedOutput, exit_logits, hidden_states, routed_forward, run_layers
from ease.model.block import TransformerBlock
from ease.model.ffn import GatedLinearUnit, SwiGLU, swiglu_hidden_dim
from ease.model.norm import RMSNorm
from ease.model.surgery import freeze_lower_layers, params_unchanged
from ease.model.transformer import (
    DEEDTransformer,
    DeepSupervisionTransformer,
    EarlyExitTransformer,
    StandardTransformer,
)

__all__ = [
    "Backbone",
    "CausalSelfAttention",
    "DEEDTransformer",
    "DeepSupervisionTransformer",
    "EarlyExitTransformer",
    "GatedLinearUnit",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "RoutedOutput",
    "StandardTransformer",
    "SwiGLU",
    "TransformerBlock",
    "apply_rotary",
    "exit_logits",
    "freeze_lower_layers",
    "hidden_states",
    "params_unchanged",
    "routed_forward",
    "run_layers",
    "swiglu_hidden_dim",
]
