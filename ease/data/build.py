"""Turning a :class:`DataConfig` into ready-to-iterate train/val/test batches and a fitted tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .batching import TokenBatches, split_train_val
from .config import DataConfig
from .synthetic import make_synthetic_corpus
from .tokenizers import SyntheticTokenizer, Tokenizer, build_tokenizer
from .wikitext import load_wikitext_text, read_text_file, split_file, truncate_at_whitespace

logger = logging.getLogger("ease.data")


@dataclass
class DataBundle:
    """Everything training needs from the data side.

    Attributes:
        train: Training batches (shuffled per epoch if the config says so).
        val: Validation batches, never shuffled.
        test: Test batches (WikiText-2's test file when it is not the source, or ``data.test_paths``), else None.
        tokenizer: The tokenizer fitted on the training text (or the pretrained one, for ``tokenizer=hf``).
        vocab_size: The tokenizer's actual vocabulary size: size the model's embedding with this.
        source: Path of the text file used, ``"synthetic"``, or for ``files`` ``"files: N KIND file(s) from FIRST,
            cache KEY"`` (the token cache folder under ``data.cache_dir``).
        num_train_tokens: Token ids in the train part (before cutting into windows).
        num_val_tokens: Token ids in the val part.
    """

    train: TokenBatches
    val: TokenBatches
    test: TokenBatches | None
    tokenizer: Tokenizer
    vocab_size: int
    source: str
    num_train_tokens: int
    num_val_tokens: int


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split text at the last whitespace at or before ``(1 - val_fraction)`` of its characters.

    The whitespace stays with the train part, so no word is cut and a line break still ends its line.

    Raises:
        ValueError: One part would hold no words.
    """
    cut = int(len(text) * (1.0 - val_fraction))
    while cut > 0 and not text[cut - 1].isspace():
        cut -= 1
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise ValueError(f"data.val_fraction: {val_fraction} of {len(text)} characters leaves train or val empty")
    return train, val


def build_data(cfg: DataConfig, seed: int = 0, tokenizer: Tokenizer | None = None) -> DataBundle:
    """Load or generate the corpus, fit the tokenizer on the train part only (or load ``hf``), and batch every split.

    Args:
        cfg: The data config.
        seed: Seeds the train shuffle and, for ``synthetic``, the generated stream.
        tokenizer: Use this tokenizer (e.g. a checkpoint's) instead of fitting one.

    Returns:
        The batches, tokenizer and sizes. ``vocab_size`` may be below ``cfg.vocab_size`` on small text.

    Raises:
        ValueError: Missing or unreadable data, or sizes the data cannot fill.
    """
    if cfg.name == "files":
        from .files import load_corpus

        corpus = load_corpus(
            cfg,
            lambda sample: build_tokenizer(cfg.tokenizer, cfg.vocab_size, sample, path=cfg.tokenizer_path),
            tokenizer,
        )
        tokenizer = corpus.tokenizer
        train_ids, val_ids, test_ids = corpus.ids["train"], corpus.ids["val"], corpus.ids.get("test")
        source = corpus.source
    elif cfg.name == "synthetic":
        ids = make_synthetic_corpus(
            cfg.synthetic_tokens, cfg.synthetic_vocab_size, cfg.synthetic_deterministic_fraction, seed
        )
        train_ids, val_ids = split_train_val(ids, cfg.val_fraction)
        tokenizer = tokenizer or SyntheticTokenizer(cfg.synthetic_vocab_size)
        source = "synthetic"
        test_ids = None
    else:
        text, path = load_wikitext_text(cfg.data_dir, cfg.split, cfg.fallback_splits, cfg.max_chars)
        train_text, val_text = split_text(text, cfg.val_fraction)
        tokenizer = tokenizer or build_tokenizer(cfg.tokenizer, cfg.vocab_size, train_text, path=cfg.tokenizer_path)
        train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
        source = str(path)
        test_ids = _test_ids(path, cfg.max_chars, tokenizer)
        if cfg.tokenizer != "hf" and tokenizer.vocab_size < cfg.vocab_size:  # hf: its own vocab, by design
            logger.warning(
                "%s tokenizer has %d ids, fewer than data.vocab_size=%d (the train text has fewer distinct symbols); "
                "size the model by DataBundle.vocab_size",
                cfg.tokenizer,
                tokenizer.vocab_size,
                cfg.vocab_size,
            )
    batches = {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size}
    train = TokenBatches(
        train_ids, **batches, shuffle=cfg.shuffle, seed=seed, drop_last=cfg.drop_last, label="train split"
    )
    val = TokenBatches(val_ids, **batches, label="val split")
    test = TokenBatches(test_ids, **batches, label="test split") if test_ids is not None else None
    logger.info(
        "data: %s, vocab %d, %d train / %d val tokens, %d train batches",
        source,
        tokenizer.vocab_size,
        len(train_ids),
        len(val_ids),
        len(train),
    )
    return DataBundle(train, val, test, tokenizer, tokenizer.vocab_size, source, len(train_ids), len(val_ids))


def _test_ids(source: Path, max_chars: int | None, tokenizer: Tokenizer) -> list[int] | None:
    """Encode the folder's test file, unless it is missing or is the text already used for train/val."""
    path = split_file(source.parent, "test")
    if not path.is_file() or path.resolve() == source.resolve():
        return None
    text = read_text_file(path)
    return tokenizer.encode(truncate_at_whitespace(text, max_chars) if max_chars is not None else text)
