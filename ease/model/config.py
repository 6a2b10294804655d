"""ModelConfig: the `model` group, the backbone's architecture (the native transformer or a Hugging Face LM)."""

from dataclasses import dataclass
from typing import Any

from ease.model.ffn import FFNS
from ease.model.norm import NORMS
from ease.model.transformer import POSITIONS

BACKBONES = ("native", "hf")


@dataclass
class ModelConfig:
    """Which backbone, and its architecture (a random model's vocabulary comes from the data's tokenizer).

    Attributes:
        backbone: "native" (`EarlyExitTransformer`) or "hf" (a `transformers` causal LM, `ease.hf`).
        name_or_path: hf: a local model folder (save_pretrained format) or a hub name to load; its weights,
            vocabulary and architecture are the model's own (dim, num_heads, hidden_dim are not used).
        hf_config: hf without name_or_path: a random model built from a `transformers` config, no download:
            {model_type: llama|mistral|qwen2|qwen3|gpt2, ...any other config key}. num_layers, dim,
            num_heads and hidden_dim set its depth and sizes; the vocabulary is the data tokenizer's.
        attn_implementation: hf: the attention kernel `transformers` uses (sdpa, eager, ...).
        num_layers: decoder layers L. hf with name_or_path: null = the model's own depth; fewer keeps the
            first num_layers layers; more adds freshly initialised layers on top.
        dim: model width C.
        num_heads: attention heads; must divide dim into even head sizes (RoPE rotates pairs).
        hidden_dim: FFN width; None = native: 2/3 of 4*dim rounded up to 16; hf: the config class's default.
        dropout: native: dropout probability in [0, 1) (hf: set the model's own dropout keys in hf_config).
        tie_weights: native: share the embedding and output-head weights (hf: hf_config.tie_word_embeddings).
        norm: native: "rms" (RMSNorm, default) or "layer" (LayerNorm without bias, GPT-2's).
        positions: native: "rotary" (RoPE in every layer, default) or "learned" (a table added to the embedding).
        ffn: native: "swiglu" (default) or "gelu" (GPT-2's MLP, hidden 4·dim unless hidden_dim says).
        max_positions: native with positions=learned: the table's length, the longest sequence it can read.
    """

    num_layers: int | None = 3
    dim: int = 64
    num_heads: int = 4
    hidden_dim: int | None = None
    dropout: float = 0.0
    tie_weights: bool = False
    backbone: str = "native"
    name_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    attn_implementation: str = "sdpa"
    norm: str = "rms"
    positions: str = "rotary"
    ffn: str = "swiglu"
    max_positions: int = 1024

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone: must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.backbone == "hf" and self.name_or_path in (None, "???") and self.hf_config is None:
            raise ValueError(
                "model.name_or_path: model=hf needs model.name_or_path=DIR (a local model folder) or a hub name"
            )
        pretrained = self.backbone == "hf" and self.name_or_path is not None
        for name in ("num_layers", "dim", "num_heads"):
            value = getattr(self, name)
            if name == "num_layers" and value is None and pretrained:
                continue  # the pretrained model's own depth
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}: must be an int >= 1, got {value!r}")
        if not pretrained and (self.dim % self.num_heads or (self.dim // self.num_heads) % 2):
            raise ValueError(
                f"model.num_heads: must divide model.dim={self.dim} into even head sizes, got {self.num_heads}"
            )
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"model.hidden_dim: must be >= 1 or null, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        for name, choices in (("norm", NORMS), ("positions", POSITIONS), ("ffn", FFNS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"model.{name}: must be one of {', '.join(choices)}, got {value!r}")
            if self.backbone == "hf" and value != choices[0]:
                raise ValueError(f"model.{name}: only for model.backbone=native (hf: the model's own), got {value!r}")
        if isinstance(self.max_positions, bool) or not isinstance(self.max_positions, int) or self.max_positions < 1:
            raise ValueError(f"model.max_positions: must be an int >= 1, got {self.max_positions!r}")
        if self.backbone == "native":
            for name in ("name_or_path", "hf_config"):
                value = getattr(self, name)
                if value is not None:
                    raise ValueError(f"model.{name}: only for model.backbone=hf (model=hf), got {value!r}")
            return
        if (self.name_or_path is None) == (self.hf_config is None):
            raise ValueError(
                "model.name_or_path: model.backbone=hf needs exactly one of name_or_path (a model to load) and "
                "hf_config (a random model from a config)"
            )
        if self.name_or_path is not None and not (isinstance(self.name_or_path, str) and self.name_or_path):
            raise ValueError(f"model.name_or_path: must be a folder or hub name, got {self.name_or_path!r}")
        if self.hf_config is not None:
            self.hf_config = dict(self.hf_config)
            if not isinstance(self.hf_config.get("model_type"), str):
                raise ValueError(f"model.hf_config.model_type: needs the architecture's name, got {self.hf_config}")
