"""Where each supported Hugging Face family keeps the parts the backbone protocol needs, and how its layers are called.

Two layouts cover the supported families. Llama, Mistral, Qwen2 and Qwen3 keep `model.embed_tokens`,
`model.layers`, `model.norm` and `model.rotary_emb` under the causal LM, whose decoder layers take the rotary
`position_embeddings` and a mask per layer type (full or sliding window). GPT-2 keeps `transformer.wte`,
`transformer.wpe` (learned absolute positions, added at the embedding), `transformer.drop`, `transformer.h`
and `transformer.ln_f`. Both end in `lm_head`. Nothing here re-implements a layer: these are only pointers
into the model and the keyword arguments its own `forward` passes to its own layers.
"""

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROTARY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ARCHITECTURES = (*ROTARY_FAMILIES, "gpt2")


@dataclass
class Parts:
    """Pointers into one Hugging Face causal LM (not a module: the model owns the parameters)."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module  # the final norm, shared by every exit
    lm_head: nn.Module
    rotary: nn.Module | None = None  # rotary families: cos/sin from position ids
    position_embedding: nn.Embedding | None = None  # GPT-2: learned absolute positions
    embed_dropout: nn.Module | None = None  # GPT-2: dropout after the embedding sum


def check_model_type(model_type: Any, key: str = "model.name_or_path") -> None:
    """One-line ValueError naming the architecture when EASE cannot run it as a backbone."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{key}: architecture {model_type!r} is not supported as an EASE backbone "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def check_supported(config: Any, key: str = "model.name_or_path") -> None:
    """`check_model_type` for a config, and the variants of a supported family EASE cannot run."""
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type, key)
    if model_type == "gpt2" and getattr(config, "add_cross_attention", False):
        raise ValueError(f"{key}: GPT-2 with cross-attention is an encoder-decoder, not a causal LM backbone")


def parts_of(model: nn.Module) -> Parts:
    """The parts of a supported causal LM (`check_supported` first)."""
    if model.config.model_type == "gpt2":
        t = model.transformer
        return Parts(t.wte, t.h, t.ln_f, model.lm_head, position_embedding=t.wpe, embed_dropout=t.drop)
    m = model.model
    return Parts(m.embed_tokens, m.layers, m.norm, model.lm_head, rotary=m.rotary_emb)


def is_sliding(config: Any, i: int) -> bool:
    """Whether decoder layer i (0-indexed) attends through a sliding window, as the model's own forward decides."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # Qwen2/Qwen3: per-layer types
        return layer_types[i] == "sliding_attention"
    return config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None


def call_layer(
    parts: Parts, i: int, h: torch.Tensor, mask: Any, position_ids: torch.Tensor, cache: Any
) -> torch.Tensor:
    """Decoder layer i (0-indexed) on h (B, T, C) with the arguments the model's own forward passes it."""
    block = parts.layers[i]
    use_cache = cache is not None
    if parts.rotary is None:  # GPT-2: positions were added at the embedding
        return block(h, cache=cache, attention_mask=mask, use_cache=use_cache, position_ids=position_ids)
    return block(
        h,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=parts.rotary(h, position_ids),
    )


def write_kv(parts: Parts, i: int, h: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> None:
    """Decoder layer i's (0-indexed) keys and values for h (B, T, C), appended to its cache, with no attention and
    no FFN: what a layer skipped by every row still gives later tokens (CALM's propagation). The model's own
    modules compute them (its input norm, K/V projections, Qwen3's k_norm, its rotary function), as its
    attention's forward does before attending."""
    block = parts.layers[i]
    if parts.rotary is None:  # GPT-2: one c_attn projection gives q, k, v
        attn = block.attn
        _, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
        shape = (*k.shape[:-1], -1, attn.head_dim)
        cache.update(k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2), attn.layer_idx)
        return
    attn = block.self_attn
    x = block.input_layernorm(h)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):  # Qwen3 normalises keys per head before the rotation
        k = attn.k_norm(k)
    k, v = k.transpose(1, 2), attn.v_proj(x).view(shape).transpose(1, 2)  # (B, n_kv, T, hd)
    cos, sin = parts.rotary(h, position_ids)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own RoPE
    _, k = rotate(k, k, cos, sin)
    cache.update(k, v, attn.layer_idx)


def set_depth(config: Any, num_layers: int) -> None:
    """Set a config's decoder depth in place, keeping per-layer types (the pattern continues with the last type)."""
    old = config.num_hidden_layers
    config.num_hidden_layers = num_layers  # GPT-2 maps it to n_layer
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [*layer_types[:num_layers], *[layer_types[-1]] * max(0, num_layers - old)]
