"""Building, loading and saving Hugging Face backbones.

    from ease import hf
    model = hf.from_pretrained("path/to/folder", exit_layer=4, routing_threshold=0.9)  # or a hub name
    model = hf.wrap(AutoModelForCausalLM.from_pretrained(...), exit_layer=4)
    hf.save_pretrained(model, "out/hf")  # plain save_pretrained (safetensors) + EASE's exit settings in config.json

A saved folder loads with plain `AutoModelForCausalLM.from_pretrained`; `ease.hf.from_pretrained` also restores
the routing from its config. Nothing here runs code from a model folder (`trust_remote_code` stays off).
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ease.extras import require
from ease.hf import architectures
from ease.hf.backbone import EXIT_SETTINGS_KEY, HFBackbone

KEY = "model.name_or_path"


def _transformers() -> Any:
    return require("transformers", "model=hf")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def _source(name_or_path: str) -> str:
    """What transformers loads from: a local folder with `~` expanded, else the hub name as given."""
    return str(Path(name_or_path).expanduser()) if _looks_local(name_or_path) else name_or_path


def load_config(name_or_path: str) -> Any:
    """The model's `transformers` config (config.json only), checked to be a supported architecture."""
    if not name_or_path:
        raise ValueError(f"{KEY}: model=hf needs {KEY}=DIR (a local model folder) or a hub name")
    if _looks_local(name_or_path) and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise ValueError(f"{KEY}: no config.json in {name_or_path!r} (a save_pretrained folder is expected)")
    try:
        config = _transformers().AutoConfig.from_pretrained(_source(name_or_path))
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{KEY}: cannot load a config from {name_or_path!r}: {type(err).__name__}: {first}") from None
    architectures.check_supported(config)
    return config


def wrap(
    hf_model: nn.Module,
    exit_layer: int | list[int] | None = None,
    routing_threshold: float | list[float] | None = None,
    confidence: str | None = None,
) -> HFBackbone:
    """An existing `transformers` causal LM as an EASE backbone (it shares the model's parameters)."""
    return HFBackbone(hf_model, exit_layer, routing_threshold, confidence)


def from_pretrained(
    name_or_path: str,
    exit_layer: int | list[int] | None = None,
    routing_threshold: float | list[float] | None = None,
    confidence: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = "sdpa",
    num_layers: int | None = None,
    **hf_kwargs: Any,
) -> HFBackbone:
    """Load a causal LM folder (or hub name) as an EASE backbone; routing defaults to what the folder saved.

    `num_layers` (None = the model's own depth): fewer keeps the first num_layers layers, more adds freshly
    initialised layers on top (`HFBackbone.extended`).
    """
    config = load_config(name_or_path)
    model = _transformers().AutoModelForCausalLM.from_pretrained(
        _source(name_or_path), config=config, dtype=dtype, attn_implementation=attn_implementation, **hf_kwargs
    )
    depth = config.num_hidden_layers
    if num_layers is not None and num_layers < depth:
        parts = architectures.parts_of(model)
        del parts.layers[num_layers:]
        architectures.set_depth(model.config, num_layers)
    routing = (exit_layer, routing_threshold, confidence)
    if num_layers is not None and num_layers > depth:
        return HFBackbone(model, 1, 0.0, confidence).extended(num_layers).with_routing(*routing)
    if num_layers is not None and num_layers != depth and exit_layer is None:
        routing = (1, 0.0, confidence)  # the saved routing was for the full depth
    return HFBackbone(model, *routing)


def from_config(
    model_type: str,
    exit_layer: int | list[int] | None = None,
    routing_threshold: float | list[float] | None = None,
    confidence: str | None = None,
    attn_implementation: str | None = "sdpa",
    **config_kwargs: Any,
) -> HFBackbone:
    """A randomly initialised model of `model_type` built from config values (no download): tests and demos."""
    architectures.check_model_type(model_type, key="model.hf_config")
    transformers = _transformers()
    config = transformers.AutoConfig.for_model(model_type, **config_kwargs)
    architectures.check_supported(config, key="model.hf_config")
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return HFBackbone(model, exit_layer, routing_threshold, confidence)


def from_model_config(
    m: Any,
    vocab_size: int,
    num_layers: int | None = None,
    exit_layer: int | list[int] | None = None,
    routing_threshold: float | list[float] | None = None,
    confidence: str | None = None,
) -> HFBackbone:
    """The backbone of a `ModelConfig` with backbone=hf: loaded from `name_or_path`, or a random model from
    `hf_config` with the config's sizes and the data's vocabulary."""
    depth = num_layers or m.num_layers
    if m.name_or_path is not None:
        model = from_pretrained(
            m.name_or_path, exit_layer, routing_threshold, confidence, attn_implementation=m.attn_implementation,
            num_layers=depth,
        )  # fmt: skip
        if vocab_size > model.vocab_size:
            raise ValueError(
                f"data.tokenizer: its {vocab_size} ids do not fit the model's embedding of {model.vocab_size}; "
                "use the model's own tokenizer (data.tokenizer=hf)"
            )
        return model
    keys = dict(m.hf_config)
    model_type = keys.pop("model_type")
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": depth,
        "num_attention_heads": m.num_heads,
    }
    if m.hidden_dim is not None:
        sizes["n_inner" if model_type == "gpt2" else "intermediate_size"] = m.hidden_dim
    return from_config(
        model_type, exit_layer, routing_threshold, confidence, m.attn_implementation, **{**keys, **sizes}
    )


def from_config_dict(args: dict[str, Any]) -> HFBackbone:
    """Rebuild the architecture stored by `HFBackbone.config_dict` (a checkpoint's model_args); weights not loaded."""
    hf_config = dict(args["hf_config"])
    model_type = hf_config.pop("model_type", args.get("model_type"))
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        hf_config.pop(key, None)
    attn = hf_config.pop("_attn_implementation", None) or "sdpa"
    return from_config(
        model_type, args.get("exit_layer"), args.get("routing_threshold"), args.get("confidence"), attn, **hf_config
    )


def save_pretrained(model: HFBackbone, folder: str | Path, tokenizer: Any = None) -> Path:
    """`save_pretrained` (safetensors) of the wrapped model with the exit settings in config.json; the tokenizer
    too when it is a Hugging Face one. Returns the folder."""
    folder = Path(folder)
    setattr(model.hf.config, EXIT_SETTINGS_KEY, model.exit_settings())
    model.hf.save_pretrained(folder, safe_serialization=True)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    return folder
