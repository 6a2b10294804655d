"""Finding and reading the WikiText-2 split files (``wiki.{train,valid,test}.tokens``) from a local folder."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("ease.data")

ENV_VAR = "EASE_DATA_DIR"
DEFAULT_DIRS = (Path("data/wikitext-2"), Path("~/.cache/ease/wikitext-2"))
SPLIT_NAMES = ("train", "valid", "test")
# Hugging Face names the valid split "validation".
_HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def split_file(directory: Path, split: str) -> Path:
    """Path of one split's file inside a WikiText-2 folder (whether or not it exists)."""
    return directory / f"wiki.{split}.tokens"


def _has_wikitext(directory: Path) -> bool:
    return any(split_file(directory, split).is_file() for split in SPLIT_NAMES)


def _candidate_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    # An explicit setting replaces the search instead of extending it, so a typo is reported, not skipped.
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    return [d.expanduser() for d in DEFAULT_DIRS]


def find_wikitext_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Locate the folder holding WikiText-2's ``wiki.*.tokens`` files.

    Looks in ``data_dir`` if given, else ``$EASE_DATA_DIR`` if set, else ``./data/wikitext-2`` and
    ``~/.cache/ease/wikitext-2``. When no folder was named (neither ``data_dir`` nor the variable), none of
    the defaults holds the files and the ``datasets`` package is installed, WikiText-2 is downloaded from the
    Hugging Face hub into the cache folder. A named folder is never replaced by a download.

    Args:
        data_dir: Explicit folder; overrides the environment variable and the defaults.

    Returns:
        The folder, holding at least one ``wiki.{train,valid,test}.tokens`` file.

    Raises:
        ValueError: No folder holds the files and they cannot be downloaded.
    """
    candidates = _candidate_dirs(data_dir)
    for directory in candidates:
        if _has_wikitext(directory):
            return directory
    looked = ", ".join(str(d) for d in candidates)
    missing = f"data.data_dir: WikiText-2 files wiki.{{train,valid,test}}.tokens not found in [{looked}]"
    named = data_dir is not None or os.environ.get(ENV_VAR)
    if not named and _datasets_available():
        try:
            return _download_wikitext(candidates[-1])
        except Exception as err:  # no network, hub errors: one line, not a traceback
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"{missing}, and downloading them failed ({type(err).__name__}: {first})") from None
    raise ValueError(
        f"{missing}; set {ENV_VAR} or data.data_dir to their folder, or (pip install -e '.[hf]') leave both "
        "unset to download them"
    )


def _datasets_available() -> bool:
    """Whether Hugging Face ``datasets`` is importable (the ``hf`` extra: ``pip install -e '.[hf]'``)."""
    return importlib.util.find_spec("datasets") is not None


def _download_wikitext(target: Path) -> Path:  # pragma: no cover - needs network
    """Fetch WikiText-2 (raw-tokenized v1) with ``datasets`` and write it as the usual split files."""
    import datasets

    logger.warning("WikiText-2 not found locally; downloading it with the datasets package into %s", target)
    target.mkdir(parents=True, exist_ok=True)
    dataset = datasets.load_dataset("wikitext", "wikitext-2-v1")
    for split, hf_split in _HF_SPLITS.items():
        # Each row is one line of the original file, newline included, so joining restores the file.
        text = "".join(dataset[hf_split]["text"])
        path = split_file(target, split)
        partial = path.with_suffix(".tokens.part")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)  # atomic: an interrupted download never leaves a truncated split file
    return target


def truncate_at_whitespace(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters without splitting a word.

    The cut falls on the last whitespace at or before ``max_chars`` (that whitespace is dropped). Text with
    no whitespace in range is cut hard at ``max_chars``.
    """
    if len(text) <= max_chars:
        return text
    for cut in range(max_chars, -1, -1):  # walks back at most one word
        if text[cut].isspace():
            return text[:cut]
    return text[:max_chars]


def has_text(text: str) -> bool:
    """Whether ``text`` holds anything but whitespace and NUL characters (NUL is not whitespace to ``str.strip``)."""
    return bool(text.replace("\x00", "").strip())


def read_text_file(path: Path) -> str:
    """Read a whole file as strict UTF-8, refusing undecodable or blank files.

    Raises:
        ValueError: The file is not UTF-8, holds only whitespace ("is empty"), or only NUL bytes and whitespace
            ("holds no text").
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data.data_dir: {path} is not valid UTF-8 (bad byte at offset {err.start})") from None
    if not text.strip():
        raise ValueError(f"data.data_dir: {path} is empty")
    if not has_text(text):
        raise ValueError(f"data.data_dir: {path} holds no text (only NUL bytes / whitespace)")
    return text


def resolve_split_file(directory: Path, split: str, fallback_splits: Sequence[str] = ("valid", "test")) -> Path:
    """Pick the file for ``split``, or for the first present fallback split (logged as a warning).

    Raises:
        ValueError: Neither the split nor any fallback exists in ``directory``.
    """
    for field, names in (("split", (split,)), ("fallback_splits", tuple(fallback_splits))):
        for name in names:
            if name not in SPLIT_NAMES:
                raise ValueError(f"data.{field}: must be one of {', '.join(SPLIT_NAMES)}, got {name!r}")
    wanted = split_file(directory, split)
    if wanted.is_file():
        return wanted
    for fallback in fallback_splits:
        path = split_file(directory, fallback)
        if path.is_file():
            logger.warning("%s not found; using the %s split %s instead (data.fallback_splits)", wanted, fallback, path)
            return path
    present = sorted(p.name for p in directory.glob("wiki.*.tokens")) or ["nothing"]
    tried = ", ".join((split, *fallback_splits))
    raise ValueError(f"data.split: no file for splits [{tried}] in {directory}; it holds {', '.join(present)}")


def load_wikitext_text(
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    fallback_splits: Sequence[str] = ("valid", "test"),
    max_chars: int | None = 200_000,
) -> tuple[str, Path]:
    """Read one WikiText-2 split as text.

    Args:
        data_dir: Folder with the split files; None searches as :func:`find_wikitext_dir` does.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        fallback_splits: Splits tried in order when ``split``'s file is absent.
        max_chars: Keep at most this many characters, cut at a whitespace; None keeps all.

    Returns:
        The text and the path of the file it came from.

    Raises:
        ValueError: The folder or split is missing, or the file is empty or not UTF-8.
    """
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"data.max_chars: must be None or an int >= 1, got {max_chars!r}")
    path = resolve_split_file(find_wikitext_dir(data_dir), split, fallback_splits)
    text = read_text_file(path)
    if max_chars is not None:
        text = truncate_at_whitespace(text, max_chars)
        if not has_text(text):
            raise ValueError(f"data.max_chars: {max_chars} keeps no words of {path}")
    return text, path
