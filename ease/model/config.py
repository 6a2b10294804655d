"""ModelConfig: the `model` group, the native early-exit transformer's architecture."""

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Architecture of `EarlyExitTransformer` (its vocabulary comes from the data's tokenizer).

    Attributes:
        num_layers: decoder blocks L.
        dim: model width C.
        num_heads: attention heads; must divide dim into even head sizes (RoPE rotates pairs).
        hidden_dim: SwiGLU width; None = 2/3 of 4*dim, rounded up to 16.
        dropout: dropout probability in [0, 1).
        tie_weights: share the embedding and output-head weights.
    """

    num_layers: int = 3
    dim: int = 64
    num_heads: int = 4
    hidden_dim: int | None = None
    dropout: float = 0.0
    tie_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "dim", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}: must be an int >= 1, got {value!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"model.num_heads: must divide model.dim={self.dim} into even head sizes, got {self.num_heads}"
            )
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"model.hidden_dim: must be >= 1 or null, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: must be in [0, 1), got {self.dropout}")
