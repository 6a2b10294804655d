"""Hugging Face causal LMs (transformers 5.x) as EASE backbones: Llama, Mistral, Qwen2, Qwen3 and GPT-2.

architectures.py  where each family keeps its embedding, layers, final norm, rotary table and head
backbone.py       `HFBackbone`: the backbone protocol over the model's own layers, masks and cache
loading.py        `from_pretrained`, `wrap`, `from_config` (random models, no download), `save_pretrained`

Needs the `hf` extra (`pip install -e '.[hf]'`); importing this package does not import transformers.
"""

from ease.hf.architectures import SUPPORTED_ARCHITECTURES
from ease.hf.backbone import HFBackbone
from ease.hf.loading import (
    from_config,
    from_config_dict,
    from_model_config,
    from_pretrained,
    load_config,
    save_pretrained,
    wrap,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFBackbone",
    "from_config",
    "from_config_dict",
    "from_model_config",
    "from_pretrained",
    "load_config",
    "save_pretrained",
    "wrap",
]
