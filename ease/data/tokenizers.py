"""Tokenizers: fitted on the training text (word-level, character-level, byte-level BPE), synthetic ids, and
pretrained Hugging Face tokenizers loaded from a folder or hub name (``data.tokenizer=hf``).

Every tokenizer maps text to ids in ``[0, vocab_size)`` and back, and serialises to a JSON-friendly dict
(``to_dict`` / :func:`tokenizer_from_dict`) so a checkpoint can carry it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from .config import MIN_BPE_VOCAB, TOKENIZERS

UNK = "<unk>"
EOS = "<eos>"
# What a char-level <unk> decodes to: U+FFFD is the standard "unrepresentable character" mark.
CHAR_UNK = "\ufffd"

logger = logging.getLogger("ease.data")


class TokenizerMismatchError(ValueError):
    """Text a tokenizer cannot encode at all (a synthetic tokenizer given words): the text is not its kind.

    Attributes:
        kind: the tokenizer's kind ("synthetic").
        expected: what its tokens look like.
        got: the first piece of text it refused.
    """

    def __init__(self, kind: str, expected: str, got: str) -> None:
        self.kind, self.expected, self.got = kind, expected, got
        super().__init__(f"{kind} tokenizer: {expected}, got {got!r}")


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
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers, trainers

        _check_vocab_size(vocab_size, MIN_BPE_VOCAB)
        backend = Backend(models.BPE())
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
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(json.dumps(state["tokenizer"])))


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
            if not (word.startswith("t") and word[1:].isdigit() and int(word[1:]) < self._vocab_size):
                raise TokenizerMismatchError(self.kind, f"tokens look like t0 t1 ... t{self._vocab_size - 1}", word)
            ids.append(int(word[1:]))
        return ids

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


HF_PATH_FIELD = "data.tokenizer_path"
HF_NO_PATH = "data.tokenizer_path: tokenizer=hf needs data.tokenizer_path=DIR (or model=hf with model.name_or_path)"


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _looks_like_folder(path: str) -> bool:
    """A path rather than a hub name (``name`` or ``org/name``): absolute, ./ ../ ~, a backslash, or 2+ slashes."""
    if path in (".", "..") or path.startswith(("/", "./", "../", "~")):
        return True
    return "\\" in path or path.count("/") > 1


class HFTokenizer:
    """A pretrained Hugging Face tokenizer (``transformers.AutoTokenizer``), used as is: no fitting.

    ``vocab_size`` is ``len(tokenizer)``, added tokens included. ``encode`` adds no special tokens (corpus text
    is one stream, not one sequence per call) and ``decode`` keeps special tokens and spacing, so a round trip
    shows exactly what the ids hold. ``to_dict`` carries the tokenizer's own files as text, so a checkpoint
    restores it without the original folder or the hub.
    """

    kind = "hf"

    def __init__(self, tokenizer: Any, source: str | None = None) -> None:
        """Wrap a loaded ``transformers`` tokenizer; ``source`` is the folder or hub name it came from."""
        self.tokenizer = tokenizer
        self.source = source
        self._files: dict[str, str] | None = None  # cached to_dict payload (the tokenizer never changes)

    @classmethod
    def load(cls, path: str | Path | None) -> HFTokenizer:
        """``AutoTokenizer.from_pretrained(path)`` (never remote code), for a local folder or a hub name.

        Raises:
            ValueError: No path, a folder that does not exist, or a tokenizer that cannot be loaded.
            ImportError: ``transformers`` is not installed (names the ``hf`` extra).
        """
        if path is None:
            raise ValueError(HF_NO_PATH)
        path = str(path)
        if not path.strip():
            raise ValueError(f"{HF_PATH_FIELD}: must be a folder or hub name, got {path!r}")
        local = Path(path).expanduser()
        if local.is_file():
            raise ValueError(f"{HF_PATH_FIELD}: {path!r} is a file; give the folder that holds the tokenizer")
        if _looks_like_folder(path) and not local.is_dir():
            raise ValueError(f"{HF_PATH_FIELD}: no tokenizer folder at {str(local)!r}")
        return cls(_auto_tokenizer(str(local) if local.is_dir() else path), source=path)

    @property
    def vocab_size(self) -> int:
        """Number of ids: ``len(tokenizer)``, added tokens included."""
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's end-of-sequence id, or None when it defines none."""
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    def encode(self, text: str) -> list[int]:
        """Text to ids, without special tokens (no BOS/EOS per call)."""
        # verbose=False: a whole split is longer than model_max_length by design; it is cut into windows later.
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False, verbose=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text, special tokens kept and no spacing clean-up, so round trips are honest."""
        return str(
            self.tokenizer.decode(
                _check_ids(ids, self.vocab_size), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )

    def save_pretrained(self, folder: str | Path) -> tuple[str, ...]:
        """Write the tokenizer's files into ``folder`` (e.g. beside a saved model); returns the paths written."""
        return tuple(str(p) for p in self.tokenizer.save_pretrained(str(folder)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"kind": "hf", "files": {name: text}}`` from ``save_pretrained``.

        Raises:
            ValueError: A file ``save_pretrained`` wrote is not UTF-8 text and no ``tokenizer.json`` holds the
                vocabulary instead (a slow, sentencepiece-only tokenizer).
        """
        if self._files is None:
            self._files = self._saved_files()
        return {"kind": self.kind, "source": self.source, "files": dict(self._files)}

    def _saved_files(self) -> dict[str, str]:
        with tempfile.TemporaryDirectory(prefix="ease-hf-tokenizer-") as tmp:
            self.tokenizer.save_pretrained(tmp)
            root = Path(tmp)
            files: dict[str, str] = {}
            binary: list[str] = []
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                name = path.relative_to(root).as_posix()
                try:
                    files[name] = path.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    binary.append(name)
        if binary and "tokenizer.json" not in files:
            raise ValueError(
                f"data.tokenizer=hf: cannot store {self.source or 'the tokenizer'} in a checkpoint: "
                f"{', '.join(binary)} is not UTF-8 text and there is no tokenizer.json (use a fast tokenizer)"
            )
        if binary:
            logger.info("hf tokenizer: not storing %s (not text; tokenizer.json holds the vocabulary)", binary)
        return files

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> HFTokenizer:
        """Inverse of :meth:`to_dict`: write the files to a temporary folder and load it.

        Raises:
            ValueError: The state holds no files, or a file name that would leave the folder.
        """
        files = state.get("files")
        if not isinstance(files, dict) or not files:
            raise ValueError("hf tokenizer state: 'files' must be a non-empty {name: text} dict")
        with tempfile.TemporaryDirectory(prefix="ease-hf-tokenizer-") as tmp:
            root = Path(tmp)
            for name, text in files.items():
                parts = PurePosixPath(str(name)).parts
                if not parts or PurePosixPath(str(name)).is_absolute() or ".." in parts or not isinstance(text, str):
                    raise ValueError(f"hf tokenizer state: bad file entry {name!r}")
                target = root.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            tokenizer = cls(_auto_tokenizer(tmp), source=state.get("source"))
        tokenizer._files = {str(name): text for name, text in files.items()}
        return tokenizer


def _auto_tokenizer(path: str) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` with remote code refused; load errors become one-line ValueErrors."""
    from ease.extras import require

    transformers = require("transformers", "data.tokenizer=hf")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # OSError (missing/unknown), ValueError (no usable files), and friends
        message = f"{HF_PATH_FIELD}: cannot load a Hugging Face tokenizer from {path!r}: {_one_line(err)}"
        raise ValueError(message) from None


_FITTABLE = {"word": WordTokenizer, "char": CharTokenizer, "bpe": BPETokenizer}
_REGISTRY: dict[str, Any] = {**_FITTABLE, "synthetic": SyntheticTokenizer, "hf": HFTokenizer}


def build_tokenizer(kind: str, vocab_size: int, text: str, path: str | Path | None = None) -> Tokenizer:
    """Fit a tokenizer of ``kind`` (``"word"``, ``"char"`` or ``"bpe"``) on ``text``, or load ``"hf"`` from ``path``.

    A fitted tokenizer's ``vocab_size`` is at most the requested one: smaller when the text has fewer distinct
    words/characters/merges. For ``"hf"``, ``vocab_size`` and ``text`` are ignored: the pretrained tokenizer at
    ``path`` (``data.tokenizer_path``: a folder or hub name) is used with its own vocabulary.

    Raises:
        ValueError: Unknown kind, a vocab_size the kind cannot honour, or (``"hf"``) no path or no loadable
            tokenizer there.
    """
    if kind == "hf":
        return HFTokenizer.load(path)
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
