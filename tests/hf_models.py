"""Small Hugging Face models and tokenizers for tests, built from configs and saved locally (no hub).

`tiny(model_type)` is a random eval-mode backbone; `save_tiny(folder, model_type, text)` trains a byte-level
BPE tokenizer on `text`, builds a model with that vocabulary and saves both with `save_pretrained`, so tests
load them through the real loading path.
"""

from pathlib import Path
from typing import Any

import torch

from ease import hf

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def config_kwargs(model_type: str, vocab: int = 97, layers: int = 3, dim: int = 32) -> dict[str, Any]:
    if model_type == "gpt2":
        return {
            "vocab_size": vocab, "n_embd": dim, "n_layer": layers, "n_head": 4, "n_positions": 256,
            "bos_token_id": 0, "eos_token_id": 0,
        }  # fmt: skip
    kw = {
        "vocab_size": vocab, "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 2 * dim, "max_position_embeddings": 256,
        "bos_token_id": 0, "eos_token_id": 0,
    }  # fmt: skip
    if model_type == "qwen3":
        kw["head_dim"] = dim // 4
    if model_type == "mistral":
        kw["sliding_window"] = None
    return kw


def tiny(model_type: str, vocab: int = 97, layers: int = 3, dim: int = 32, seed: int = 0, **exit: Any) -> hf.HFBackbone:
    torch.manual_seed(seed)
    return hf.from_config(model_type, **exit, **config_kwargs(model_type, vocab, layers, dim)).eval()


def hf_tokenizer(text: str, vocab_size: int = 300) -> Any:
    """A byte-level BPE trained on `text`, as a transformers fast tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    backend.train_from_iterator(text.splitlines(), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(folder: Path, model_type: str, text: str, layers: int = 3, dim: int = 32, **exit: Any) -> Path:
    """A tokenizer trained on `text` and a random model of its vocabulary, saved together in `folder`."""
    tok = hf_tokenizer(text)
    model = tiny(model_type, vocab=len(tok), layers=layers, dim=dim, **exit)
    hf.save_pretrained(model, folder, tok)
    return folder
