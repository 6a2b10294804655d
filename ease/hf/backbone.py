"""`HFBackbone`: a Hugging Face causal LM (transformers 5.x) as an EASE early-exit backbone.

Every exit is LayerSkip's shared exit: the model's own final norm, then its own `lm_head`. A layer call runs the
model's own decoder layer with the arguments its `forward` would pass (rotary position embeddings from the
model's `rotary_emb`, the causal or sliding-window mask from `transformers.masking_utils`, the model's
`DynamicCache`), so exits compute only the layers they need and the last exit equals the model's own logits.

Active-token calls (`layer(..., active=)`, CALM propagation): when no token is active (every row of a decoding
step exited below this layer) only the layer's K/V are computed and cached (`architectures.write_kv`); when
some are, every token runs through the model's layer and the inactive ones keep their input states (their K/V
are still made from those states, as the protocol asks), so the per-token saving inside a layer is the native
backbone's alone.
"""

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ease.extras import require
from ease.hf import architectures
from ease.model.backbone import BackboneMethods
from ease.model.row_cache import RowLengths, row_lengths, row_mask, write_kv_rows
from ease.routing import normalize_routing

# The EASE settings stored in a saved model's config.json, so `ease.hf.from_pretrained` restores the routing.
EXIT_SETTINGS_KEY = "ease_exit"


class HFBackbone(BackboneMethods, nn.Module):
    """A wrapped `transformers` causal LM (`self.hf`) speaking the backbone protocol.

    Args:
        hf_model: an `AutoModelForCausalLM` of a supported architecture (`SUPPORTED_ARCHITECTURES`).
        exit_layer: routing exit(s), 1-indexed; None = the model config's saved EASE settings, else 1.
        routing_threshold: threshold(s) per exit; None = saved settings, else 0 (no early exit).
        confidence: routing confidence measure; None = saved settings, else "max_prob".
    """

    def __init__(
        self,
        hf_model: nn.Module,
        exit_layer: int | Sequence[int] | None = None,
        routing_threshold: float | Sequence[float] | None = None,
        confidence: str | None = None,
    ) -> None:
        super().__init__()
        architectures.check_supported(hf_model.config)
        self.hf = hf_model
        self._parts = architectures.parts_of(hf_model)
        config = hf_model.config
        self.model_type: str = config.model_type
        self.num_layers = int(config.num_hidden_layers)
        self.vocab_size = int(self._parts.lm_head.out_features)
        self.dim = int(config.hidden_size)
        saved = getattr(config, EXIT_SETTINGS_KEY, None) or {}
        self.exit_layers, self.routing_thresholds = normalize_routing(
            saved.get("exit_layers", 1) if exit_layer is None else exit_layer,
            saved.get("routing_thresholds", 0.0) if routing_threshold is None else routing_threshold,
            self.num_layers,
        )
        self.confidence = confidence or saved.get("confidence", "max_prob")
        masking = require("transformers.masking_utils", "model=hf")
        self._mask_fns = (masking.create_causal_mask, masking.create_sliding_window_causal_mask)

    @property
    def max_positions(self) -> int:
        """The most positions the model holds (`max_position_embeddings`; GPT-2 maps `n_positions` onto it)."""
        return int(self.hf.config.max_position_embeddings)

    @property
    def layers(self) -> nn.ModuleList:
        """The model's decoder layers (layer i is `layers[i - 1]`)."""
        return self._parts.layers

    # --- the backbone protocol --------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, pos: int | torch.Tensor = 0) -> torch.Tensor:
        parts = self._parts
        h = parts.embed_tokens(ids)  # (B, T, C)
        if parts.position_embedding is not None:  # GPT-2's learned absolute positions
            start = pos[:, None] if isinstance(pos, torch.Tensor) else pos  # (B, 1): each row's own start
            h = h + parts.position_embedding(start + torch.arange(ids.shape[1], device=ids.device))
        if parts.embed_dropout is not None:
            h = parts.embed_dropout(h)
        return h

    def layer(
        self,
        i: int,
        h: torch.Tensor,
        pos: int = 0,
        cache: Any = None,
        active: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder layer i (1-indexed) on h (B, T, C) at positions pos..pos+T-1 (or `positions`); see
        `Backbone.layer`."""
        position_ids = torch.arange(pos, pos + h.shape[1], device=h.device)[None]  # (1, T)
        rows = None if cache is None else getattr(cache, "rows", {}).get(i - 1)
        # Given positions go to the rotary table only: the mask stays causal in h's order, from contiguous ids
        # (gaps in position_ids would read as packed sequences to transformers' masking).
        rotary_ids = position_ids if positions is None else positions
        if active is not None and not bool(active.any()):  # every token skips: only its K/V for later tokens
            if cache is not None:
                architectures.write_kv(self._parts, i - 1, h, rotary_ids, cache)
            return h
        sliding = architectures.is_sliding(self.hf.config, i - 1)
        if rows is not None:  # each row's own causal mask over its own slots (`ease.model.row_cache`)
            mask = self._row_mask(rows, h)
        else:
            mask = self._mask_fns[sliding](
                config=self.hf.config,
                inputs_embeds=h,
                attention_mask=None,
                cache=cache,
                position_ids=position_ids,
                layer_idx=None if cache is None else i - 1,  # each layer's cache may hold its own length
            )
        out = architectures.call_layer(self._parts, i - 1, h, mask, rotary_ids, cache)
        if active is not None:  # inactive tokens keep their state; their K/V were made from it above
            out = torch.where(active[..., None], out, h)
        return out

    def _row_mask(self, rows: RowLengths, h: torch.Tensor) -> torch.Tensor:
        """`row_mask` in the form the model's attention takes: bool for SDPA, additive (0 or the dtype's minimum)
        for the others, as transformers' own masks are."""
        mask = row_mask(rows, h.shape[1])
        if self.hf.config._attn_implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(~mask, torch.finfo(h.dtype).min)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The shared exit: the model's final norm, then its lm_head. (..., C) -> (..., V)."""
        return self._parts.lm_head(self._parts.norm(h))

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        """The model's own `DynamicCache` (one layer per decoder layer, sliding ones where the config has them),
        which also holds per-row lengths once `crop_cache` gave them."""
        return _row_cache_class()(config=self.hf.config)

    def crop_cache(self, cache: Any, length: int | torch.Tensor) -> None:
        """Keep positions 0..length-1: the `DynamicCache`'s own `crop`, which takes the count to remove (negative).
        A sliding-window layer that has already dropped positions cannot give them back (transformers raises).
        A (B,) `length` keeps each row's own count (full-attention layers only: a sliding layer's slots are not
        its positions)."""
        longest, rows = row_lengths(length)
        cache.rows = {}
        if rows is None:
            extra = cache.get_seq_length() - longest
            if extra > 0:
                cache.crop(-extra)
            return
        sliding = [j + 1 for j in range(self.num_layers) if architectures.is_sliding(self.hf.config, j)]
        if sliding:
            raise ValueError(f"task.batch_size: rows of different lengths need full-attention layers; layers {sliding} "
                             "use a sliding window (decode one row at a time)")  # fmt: skip
        for j, layer in enumerate(cache.layers):
            if layer.is_initialized and layer.keys.shape[-2] > longest:
                layer.keys, layer.values = layer.keys[..., :longest, :], layer.values[..., :longest, :]
            cache.rows[j] = rows

    def param_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        parts = self._parts
        embedding = list(parts.embed_tokens.parameters())
        if parts.position_embedding is not None:
            embedding += list(parts.position_embedding.parameters())
        groups = [("embedding", embedding)]
        groups += [(f"layer_{i}", list(block.parameters())) for i, block in enumerate(parts.layers, start=1)]
        groups.append(("head", [*parts.norm.parameters(), *parts.lm_head.parameters()]))
        return groups

    def extended(self, num_layers: int) -> "HFBackbone":
        """A deeper copy (ASHEM's growth): every weight of this model copied, layers L+1..num_layers initialised
        by the model's own `_init_weights` (a `from_config` build)."""
        if num_layers <= self.num_layers:
            raise ValueError(f"phase2_layers: must be > the model's {self.num_layers} layers, got {num_layers}")
        transformers = require("transformers", "model=hf")
        config = copy.deepcopy(self.hf.config)
        architectures.set_depth(config, num_layers)
        param = next(self.hf.parameters())
        deeper = transformers.AutoModelForCausalLM.from_config(config, dtype=param.dtype).to(param.device)
        missing, unexpected = deeper.load_state_dict(self.hf.state_dict(), strict=False)
        new = {f".{i}." for i in range(self.num_layers, num_layers)}
        if unexpected or any(not any(tag in key for tag in new) for key in missing):
            raise RuntimeError(f"extended: weights did not carry over (missing {missing}, unexpected {unexpected})")
        deeper.train(self.training)
        return HFBackbone(deeper, self.exit_layers[0], 0.0, self.confidence)

    def with_routing(
        self,
        exit_layer: int | Sequence[int] | None,
        routing_threshold: float | Sequence[float] | None,
        confidence: str | None,
    ) -> "HFBackbone":
        """Set whichever routing settings are given (None keeps the current one); returns self."""
        self.set_routing(
            self.exit_layers if exit_layer is None else exit_layer,
            self.routing_thresholds if routing_threshold is None else routing_threshold,
        )
        self.confidence = confidence or self.confidence
        return self

    # --- what checkpoints and saved folders store ---------------------------------------------------------

    def exit_settings(self) -> dict[str, Any]:
        return {
            "exit_layers": list(self.exit_layers),
            "routing_thresholds": list(self.routing_thresholds),
            "confidence": self.confidence,
        }

    def config_dict(self) -> dict[str, Any]:
        """What rebuilds this architecture (`ease.hf.from_config_dict`): the HF config as plain data, the routing,
        and the architecture keys EASE compares on resume."""
        config = self.hf.config
        hf_config = config.to_dict()
        hf_config.pop(EXIT_SETTINGS_KEY, None)
        return {
            "backbone": "hf",
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "num_layers": self.num_layers,
            "num_heads": int(config.num_attention_heads),
            "hidden_dim": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None),
            "exit_layer": list(self.exit_layers),
            "routing_threshold": list(self.routing_thresholds),
            "confidence": self.confidence,
            "hf_config": hf_config,
        }


@functools.cache
def _row_cache_class() -> type:
    """transformers' `DynamicCache` with per-row lengths: a layer in `rows` writes each row's new K/V after that
    row's own length (`ease.model.row_cache.write_kv_rows`) instead of appending after the longest. Made on first use,
    as transformers is an optional dependency."""
    dynamic_cache = require("transformers", "model=hf").DynamicCache

    class RowDynamicCache(dynamic_cache):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.rows: dict[int, RowLengths] = {}  # layer index (0-based) -> its rows' lengths
            self.buffers: dict[int, tuple] = {}  # layer index -> what its keys and values are views of

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
        ):
            rows = self.rows.get(layer_idx)
            if rows is None:
                self.buffers.pop(layer_idx, None)  # the keys and values become new tensors
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            layer = self.layers[layer_idx]
            layer.keys, layer.values, self.buffers[layer_idx], self.rows[layer_idx] = write_kv_rows(
                layer.keys, layer.values, self.buffers.get(layer_idx), key_states, value_states, rows
            )
            return layer.keys, layer.values

    return RowDynamicCache
