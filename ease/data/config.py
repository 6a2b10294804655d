"""The data section of an EASE config: which corpus, how it is tokenized and batched."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike

DATASETS = ("wikitext2", "synthetic", "files")
TOKENIZERS = ("word", "char", "bpe", "hf")
SPLITS = ("train", "valid", "test")
# A byte-level BPE always holds the 256 byte symbols, so a smaller vocabulary cannot be honoured.
MIN_BPE_VOCAB = 256


def _check_int(field: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `vocab_size: true` from YAML must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{field}: must be an int >= {minimum}, got {value!r}")


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{field}: must be one of {', '.join(allowed)}, got {value!r}")


def _check_fraction(field: str, value: object, low: float, high: float, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value < high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"data.{field}: must be a number in {bracket}{low:g}, {high:g}), got {value!r}")


def _as_splits(value: object) -> tuple[str, ...]:
    # Hydra hands lists (ListConfig) for YAML sequences; a lone string means one split.
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise ValueError(f"data.fallback_splits: must be a list of split names, got {value!r}")
    return tuple(value)


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into batches.

    For ``name="synthetic"`` the fields ``data_dir``, ``split``, ``fallback_splits``, ``max_chars``,
    ``tokenizer``, ``tokenizer_path`` and ``vocab_size`` are ignored; the ``synthetic_*`` fields apply instead.
    With ``tokenizer="hf"``, ``vocab_size`` is ignored: the pretrained tokenizer's own vocabulary is used.
    The random seed is not part of the config: it is passed to :func:`ease.data.build_data`.
    """

    name: str = "wikitext2"
    """Corpus: ``"wikitext2"`` (local WikiText-2 files), ``"synthetic"`` (generated, controlled difficulty) or
    ``"files"`` (your own text / JSON lines / parquet files, ``paths``, tokenized once into a memory-mapped cache)."""
    data_dir: str | None = None
    """Folder holding ``wiki.{train,valid,test}.tokens``; None falls back to $EASE_DATA_DIR, then default folders."""
    split: str = "train"
    """Which split file the training (and validation) text is taken from."""
    fallback_splits: tuple[str, ...] = ("valid", "test")
    """Splits tried in order when ``split`` is absent (e.g. no train file offline); a warning names the one used."""
    max_chars: int | None = 200_000
    """Characters of the split file to use, cut at a whitespace; None uses the whole file. For ``files``: the
    characters of the first training documents that word/char/bpe are fitted on (the whole corpus is used)."""
    tokenizer: str = "word"
    """``"word"`` (top words + ``<unk>`` + ``<eos>``), ``"char"``, ``"bpe"`` (byte-level, trained locally), or
    ``"hf"`` (a pretrained Hugging Face tokenizer from ``tokenizer_path``, not fitted)."""
    tokenizer_path: str | None = None
    """Folder (or hub name) of a Hugging Face tokenizer for tokenizer=hf; None = the model's own
    (model.name_or_path)."""
    vocab_size: int = 1000
    """Upper bound on the tokenizer's vocabulary; the fitted one may be smaller on tiny text. Ignored for hf."""
    seq_len: int = 64
    """Tokens per input sequence (each window holds ``seq_len + 1`` tokens for the shifted targets)."""
    batch_size: int = 32
    """Sequences per batch."""
    val_fraction: float = 0.1
    """Share held out for validation, never shuffled: the trailing text (wikitext2, synthetic), or for ``files``
    without ``val_paths`` the documents whose index hashes below it."""
    shuffle: bool = True
    """Shuffle the order of training windows each epoch (deterministic given seed and epoch)."""
    drop_last: bool = False
    """Drop the last, smaller training batch."""
    synthetic_tokens: int = 40_000
    """Length of the generated token stream (train + val)."""
    synthetic_vocab_size: int = 64
    """Vocabulary of the generated stream."""
    synthetic_deterministic_fraction: float = 0.5
    """Share of generated positions fully determined by the previous token (the "easy" ones)."""
    paths: list[str] | None = None
    """``files`` only: the training corpus, file paths or globs (``**`` recursive) of .txt / .jsonl / .parquet."""
    val_paths: list[str] | None = None
    """``files``: validation files; None holds out ``val_fraction`` of the training documents instead."""
    test_paths: list[str] | None = None
    """``files``: test files (optional)."""
    text_field: str = "text"
    """``files``: the column / JSON key holding each document's text (JSON lines and parquet)."""
    num_proc: int = 1
    """``files``: processes tokenizing the corpus."""
    cache_dir: str | None = None
    """``files``: where token files are cached (None: ~/.cache/ease/tokens; conf/data/files.yaml: outputs/cache)."""

    def __post_init__(self) -> None:
        """Normalise Hydra lists to tuples and reject values the data pipeline cannot honour."""
        _check_choice("name", self.name, DATASETS)
        _check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        _check_choice("split", self.split, SPLITS)
        self.fallback_splits = _as_splits(self.fallback_splits)
        for split in self.fallback_splits:
            _check_choice("fallback_splits", split, SPLITS)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            self.data_dir = str(self.data_dir)  # accept a Path
        if self.tokenizer_path is not None:
            if isinstance(self.tokenizer_path, PathLike):
                self.tokenizer_path = str(self.tokenizer_path)  # accept a Path
            if not isinstance(self.tokenizer_path, str) or not self.tokenizer_path.strip():
                raise ValueError(
                    f"data.tokenizer_path: must be a folder or hub name (str) or null, got {self.tokenizer_path!r}"
                )
        if self.max_chars is not None:
            _check_int("max_chars", self.max_chars, 1)
        _check_int("vocab_size", self.vocab_size, 2)
        if self.name in ("wikitext2", "files") and self.tokenizer == "bpe" and self.vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"data.vocab_size: must be >= {MIN_BPE_VOCAB} for tokenizer bpe, got {self.vocab_size}")
        _check_int("seq_len", self.seq_len, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_fraction("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True)
        _check_int("synthetic_tokens", self.synthetic_tokens, 2)
        _check_int("synthetic_vocab_size", self.synthetic_vocab_size, 4)
        _check_fraction(
            "synthetic_deterministic_fraction", self.synthetic_deterministic_fraction, 0.0, 1.0, low_open=False
        )
        for field in ("paths", "val_paths", "test_paths"):
            value = getattr(self, field)
            if value is None:
                continue
            value = [value] if isinstance(value, str) else list(value)
            if not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"data.{field}: must be a list of file paths or globs, got {value!r}")
            setattr(self, field, value)
        if self.name == "files" and not self.paths:
            raise ValueError("data.paths: data=files needs the corpus files, e.g. 'data.paths=[corpus/*.jsonl]'")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field: must be a column name, got {self.text_field!r}")
        _check_int("num_proc", self.num_proc, 1)
