"""EASE data: WikiText-2 or synthetic token streams, tokenizers, and (input, target) batches.

Typical use::

    from ease.data import DataConfig, build_data

    data = build_data(DataConfig(), seed=0)
    model = Model(vocab_size=data.vocab_size)  # the fitted size, which may be below cfg.vocab_size
    for x, y in data.train:  # (batch, seq_len) LongTensors, y is x shifted by one token
        ...
"""

from .batching import TokenBatches, split_train_val
from .build import DataBundle, build_data, split_text
from .config import DataConfig
from .synthetic import SyntheticRules, make_synthetic_corpus, synthetic_rules
from .tokenizers import (
    BPETokenizer,
    CharTokenizer,
    SyntheticTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)
from .wikitext import find_wikitext_dir, load_wikitext_text

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "DataBundle",
    "DataConfig",
    "SyntheticRules",
    "SyntheticTokenizer",
    "TokenBatches",
    "Tokenizer",
    "WordTokenizer",
    "build_data",
    "build_tokenizer",
    "find_wikitext_dir",
    "load_wikitext_text",
    "make_synthetic_corpus",
    "split_text",
    "split_train_val",
    "synthetic_rules",
    "tokenizer_from_dict",
]
