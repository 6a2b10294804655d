"""Tokenizers fitted on the training text: word-level, character-level, byte-level BPE, and synthetic ids.

Every tokenizer maps text to ids in ``[0, vocab_size)`` and back, and serialises to a JSON-friendly dict
(``to_dict`` / :func:`tokenizer_from_dict`) so a checkpoint can carry it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from .config import MIN_BPE_VOCAB, TOKENIZERS

UNK = "<unk>"
EOS = "<eos>"
# What a char-level <unk> decodes to: U+FFFD is the standard "unrepresentable character" mark.
CHAR_UNK = "\ufffd"


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of EASE needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of ids; every id produced by ``encode`` is below it."""
        ...

    def encode(self, text: str) -> list[int]:
        """Text to ids."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; :func:`tokenizer_from_dict` restores it."""
        ...


def _check_vocab_size(vocab_size: int, minimum: int = 2) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(f"data.vocab_size: must be an int >= {minimum}, got {vocab_size!r}")


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} out of range [0, {vocab_size})")
    return ids


def _most_common(counts: Counter[str], limit: int) -> list[str]:
    # Counter keeps first-occurrence order and most_common sorts stably, so ties go to the earlier item.
    return [item for item, _ in counts.most_common(limit)]


class WordTokenizer:
    """Whitespace words; each newline-terminated, non-blank line ends with ``<eos>`` (WikiText LM practice).

    Id 0 is ``<unk>``: out-of-vocabulary words and WikiText's own literal ``<unk>`` both map to it. ``<eos>``
    is an ordinary vocabulary word (it is among the most frequent). Decoding joins words with single spaces
    and turns ``<eos>`` into a newline, so original spacing is not restored.
    """

    kind = "word"

    def __init__(self, vocab: Sequence[str]) -> None:
        """Build from a vocabulary list whose first entry is ``<unk>``."""
        if not vocab or vocab[0] != UNK:
            raise ValueError(f"word tokenizer vocab must start with {UNK!r}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("word tokenizer vocab has duplicate words")
        self.vocab = list(vocab)
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.unk_id = 0
        self.eos_id = self.ids.get(EOS)

    @classmethod
    def fit(cls, text: str, vocab_size: int) -> WordTokenizer:
        """Keep ``<unk>`` plus the ``vocab_size - 1`` most frequent words (ties: first occurrence wins)."""
        _check_vocab_size(vocab_size)
        counts = Counter(_words(text))
        counts.pop(UNK, None)  # already id 0
        return cls([UNK, *_most_common(counts, vocab_size - 1)])

    @property
    def vocab_size(self) -> int:
        """Number of ids (``<unk>`` included)."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Words to ids; unknown words become ``<unk>`` (0)."""
        get = self.ids.get
        return [get(word, 0) for word in _words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to words separated by spaces, ``<eos>`` as a line break."""
        pieces: list[str] = []
        at_line_start = True
        for i in _check_ids(ids, self.vocab_size):
            word = self.vocab[i]
            if word == EOS:
                pieces.append("\n")
                at_line_start = True
            else:
                pieces.append(word if at_line_start else " " + word)
                at_line_start = False
        return "".join(pieces)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"kind": self.kind, "vocab": list(self.vocab)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> WordTokenizer:
        """Inverse of :meth:`to_dict`."""
        return cls(state["vocab"])


def _words(text: str) -> list[str]:
    """Whitespace words with ``<eos>`` after each newline-terminated non-blank line.

    The last line gets no ``<eos>`` unless it ends in a newline, so encoding two halves of a text split at a
    whitespace gives the same ids as encoding the whole.
    """
    lines = text.split("\n")
    words: list[str] = []
    for line in lines[:-1]:
        line_words = line.split()
        if line_words:
            words.extend(line_words)
            words.append(EOS)
    words.extend(lines[-1].split())
    return words


class CharTokenizer:
    """Characters; id 0 is ``<unk>`` (decoded as U+FFFD) for characters outside the vocabulary."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        """Build from the known characters (id ``i + 1`` for ``chars[i]``)."""
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("char tokenizer vocab must be distinct single characters")
        self.chars = list(chars)
        self.ids = {c: i + 1 for i, c in enumerate(self.chars)}
        self.unk_id = 0

    @classmethod
    def fit(cls, text: str, vocab_size: int) -> CharTokenizer:
        """Keep the ``vocab_size - 1`` most frequent characters (ties: first occurrence wins)."""
        _check_vocab_size(vocab_size)
        return cls(_most_common(Counter(text), vocab_size - 1))

    @property
    def vocab_size(self) -> int:
        """Number of ids (``<unk>`` included)."""
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        """Characters to ids."""
        get = self.ids.get
        return [get(c, 0) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to characters."""
        table = [CHAR_UNK, *self.chars]
        return "".join(table[i] for i in _check_ids(ids, self.vocab_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"kind": self.kind, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> CharTokenizer:
        """Inverse of :meth:`to_dict`."""
        return cls(list(state["chars"]))


class BPETokenizer:
    """Byte-level BPE trained locally with Hugging Face ``tokenizers`` (no download).

    Byte-level means every string encodes losslessly (no ``<unk>``), and the 256 byte symbols are always in
    the vocabulary, hence ``vocab_size >= 256``.
    """

    kind = "bpe"

    def __init__(self, backend: Any) -> None:
        """Wrap a trained ``tokenizers.Tokenizer``."""
        self.backend = backend

    @classmethod
    def fit(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Train merges on ``text`` up to ``vocab_size`` tokens (fewer if the text runs out of pairs)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        _check_vocab_size(vocab_size, MIN_BPE_VOCAB)
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all bytes, so unseen text still encodes
            special_tokens=[],
            show_progress=False,
        )
        # Train line by line: one giant string would make the pre-tokenizer work on a single sequence.
        backend.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return int(self.backend.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Text to ids."""
        return list(self.backend.encode(text).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text (exact inverse of :meth:`encode`)."""
        return str(self.backend.decode(_check_ids(ids, self.vocab_size)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (the backend's own JSON, parsed)."""
        return {"kind": self.kind, "tokenizer": json.loads(self.backend.to_str())}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> BPETokenizer:
        """Inverse of :meth:`to_dict`."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(json.dumps(state["tokenizer"])))


class SyntheticTokenizer:
    """Names synthetic ids ``t0 t1 ...`` so generated sequences can be printed; encode parses them back."""

    kind = "synthetic"

    def __init__(self, vocab_size: int) -> None:
        """Cover ids ``0 .. vocab_size - 1``."""
        _check_vocab_size(vocab_size)
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """``"t3 t7"`` to ``[3, 7]``."""
        ids = []
        for word in text.split():
            if not (word.startswith("t") and word[1:].isdigit()):
                raise ValueError(f"synthetic token must look like t<id>, got {word!r}")
            ids.append(int(word[1:]))
        return _check_ids(ids, self._vocab_size)

    def decode(self, ids: Iterable[int]) -> str:
        """``[3, 7]`` to ``"t3 t7"``."""
        return " ".join(f"t{i}" for i in _check_ids(ids, self._vocab_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"kind": self.kind, "vocab_size": self._vocab_size}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SyntheticTokenizer:
        """Inverse of :meth:`to_dict`."""
        return cls(int(state["vocab_size"]))


_FITTABLE = {"word": WordTokenizer, "char": CharTokenizer, "bpe": BPETokenizer}
_REGISTRY: dict[str, Any] = {**_FITTABLE, "synthetic": SyntheticTokenizer}


def build_tokenizer(kind: str, vocab_size: int, text: str) -> Tokenizer:
    """Fit a tokenizer of ``kind`` (``"word"``, ``"char"`` or ``"bpe"``) on ``text``.

    The result's ``vocab_size`` is at most the requested one: smaller when the text has fewer distinct
    words/characters/merges.

    Raises:
        ValueError: Unknown kind, or a vocab_size the kind cannot honour.
    """
    if kind not in _FITTABLE:
        raise ValueError(f"data.tokenizer: must be one of {', '.join(TOKENIZERS)}, got {kind!r}")
    return _FITTABLE[kind].fit(text, vocab_size)


def tokenizer_from_dict(state: dict[str, Any]) -> Tokenizer:
    """Restore any tokenizer from its ``to_dict()`` output.

    Raises:
        ValueError: The dict names no known tokenizer kind.
    """
    kind = state.get("kind")
    if kind not in _REGISTRY:
        raise ValueError(f"tokenizer kind must be one of {', '.join(_REGISTRY)}, got {kind!r}")
    return _REGISTRY[kind].from_dict(state)
