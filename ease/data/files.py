"""`data=files`: your own corpus (text, JSON lines or parquet), tokenized once into memory-mapped token files.

    python train.py +preset=deed data=files 'data.paths=[corpus/*.jsonl]' data.text_field=text

Hugging Face `datasets` streams the files (`streaming=True`: read in chunks, no Arrow copy of the corpus on
disk, nothing held whole in memory). Batches of documents are tokenized by `data.num_proc` processes, in
order, and each batch's ids are appended to flat token files (uint16 when the vocabulary fits, else uint32)
under `data.cache_dir`, in a folder named by a key of: every file's name and SHA-256, the format, the text
field, the split settings and the tokenizer's own state (`to_dict()`). A changed file or another tokenizer is
another key, so a stale cache is never read; the folder is written under a temporary name and renamed, so a
killed run never leaves a half cache that looks complete. `TokenBatches` reads training windows from the
files through `np.memmap`.

Documents: one per row for JSON lines and parquet; for plain text, one per paragraph (blank-line separated),
so a gigabyte text file is never one string. Each is stripped of surrounding whitespace, skipped when blank,
and followed by the tokenizer's end-of-document id when it has one. The validation split is `data.val_paths`
when given, else the documents whose index hashes below `data.val_fraction` (spread over the whole corpus,
not its tail, and the same for every seed). A fitted tokenizer (word/char/bpe) learns from the first
`data.max_chars` characters of the training documents and is cached too, so a second run reads no text.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np

from ease.extras import require

from .tokenizers import Tokenizer, tokenizer_from_dict

logger = logging.getLogger("ease.data")

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CACHE_VERSION = 3  # 3: plain-text paragraphs also end at whitespace-only lines
HASH_CHUNK = 1 << 20  # bytes read at a time while hashing: a file is never read whole
DOCS_PER_BATCH = 1000  # documents per tokenization task: a few MB of text, so memory stays flat
IN_FLIGHT = 2  # tasks queued per process: enough to keep the workers busy, bounded so memory is too


@dataclass
class FileSet:
    """One list of input files (train, val or test): what the user gave, what it matched, and the hashes."""

    key: str  # the config key, for errors: "data.paths"
    files: list[Path]
    kind: str  # "text", "json" or "parquet"
    hashes: list[str]

    def describe(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files from {self.files[0]}"


def find_files(patterns: Sequence[str], key: str) -> list[Path]:
    """Every file the patterns (globs, `**` recursive) match, sorted and without repeats; one line per problem."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [p for p in matches if p.is_file()]
        if not matches:
            raise ValueError(f"{key}: {pattern!r} matches no file")
        found.extend(p for p in matches if p not in found)
    for path in found:
        if path.suffix.lower() not in FORMATS:
            raise ValueError(f"{key}: {path} has an unsupported extension (use {', '.join(sorted(FORMATS))})")
        if path.stat().st_size == 0:
            raise ValueError(f"{key}: {path} is empty")
    kinds = {FORMATS[p.suffix.lower()] for p in found}
    if len(kinds) > 1:
        raise ValueError(f"{key}: mixes formats ({', '.join(sorted(kinds))}); give one kind of file per list")
    return found


def sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def check_text_field(files: Sequence[Path], kind: str, field: str, key: str) -> None:
    """The text field exists in each JSON-lines / parquet file (its first record, or its schema)."""
    for path in files:
        if kind == "parquet":
            pq = require("pyarrow.parquet", "data=files (parquet)")
            try:
                names = pq.read_schema(path).names
            except Exception as err:
                raise ValueError(f"{key}: cannot read {path} as parquet ({type(err).__name__}: {err})") from None
        elif kind == "json":
            first = b""
            with path.open("rb") as f:
                for first in f:  # the first non-blank line (datasets skips blank ones too)
                    if first.strip():
                        break
            try:
                record = json.loads(first)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise ValueError(f"{key}: {path} line 1 is not a JSON object (JSON lines: one object per line)")
            names = list(record)
        else:
            continue
        if field not in names:
            raise ValueError(f"data.text_field: {field!r} is not in {path} (fields: {', '.join(map(str, names))})")


def file_set(patterns: Sequence[str], field: str, key: str) -> FileSet:
    """Find, check and hash one list of files, so every input error is raised before any tokenizing."""
    files = find_files(patterns, key)
    kind = FORMATS[files[0].suffix.lower()]
    check_text_field(files, kind, field, key)
    return FileSet(key, files, kind, [sha256(p) for p in files])


_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")  # WikiText's "paragraph breaks" are lines holding one space


def iter_documents(fs: FileSet, field: str, cache_dir: Path) -> Iterator[list[str | None]]:
    """The documents' texts in file order, `DOCS_PER_BATCH` at a time, streamed by `datasets`."""
    datasets = require("datasets", "data=files")
    options: dict[str, Any] = {"sample_by": "paragraph"} if fs.kind == "text" else {}
    column = "text" if fs.kind == "text" else field
    try:
        ds = datasets.load_dataset(
            fs.kind, data_files=[str(p) for p in fs.files], split="train", streaming=True,
            cache_dir=str(cache_dir), **options,
        )  # fmt: skip
        for batch in ds.select_columns([column]).iter(batch_size=DOCS_PER_BATCH):
            texts = batch[column]
            if fs.kind == "text":  # datasets ends a paragraph at "\n\n" only; a line of spaces ends one too
                texts = [part for text in texts for part in _BLANK_LINE.split(text or "")]
            if any(t is not None and not isinstance(t, str) for t in texts):
                kinds = sorted({type(t).__name__ for t in texts if t is not None and not isinstance(t, str)})
                raise ValueError(
                    f"data.text_field: {field!r} holds {', '.join(kinds)} values, not text ({fs.describe()})"
                )
            yield texts
    except ValueError as err:
        if str(err).startswith("data.text_field:"):
            raise
        raise ValueError(_read_error(fs, field, cache_dir, err)) from None
    except Exception as err:
        raise ValueError(_read_error(fs, field, cache_dir, err)) from None


def _read_error(fs: FileSet, field: str, cache_dir: Path, err: BaseException) -> str:
    """One line naming the file `datasets` could not parse: read each file alone to find it (error path only)."""
    culprit = fs.describe()
    if len(fs.files) > 1:
        for path, digest in zip(fs.files, fs.hashes, strict=True):
            try:
                for _ in iter_documents(FileSet(fs.key, [path], fs.kind, [digest]), field, cache_dir):
                    pass
            except ValueError:
                culprit = str(path)
                break
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{fs.key}: cannot read {culprit}: {type(err).__name__}: {first}"


def val_hash(index: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per document index (splitmix64): the split rule, independent of the seed."""
    z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def val_mask(num_docs: int, fraction: float) -> np.ndarray:
    """Which of the first `num_docs` documents validate: those whose index hashes below `fraction`."""
    return val_hash(np.arange(num_docs)) < fraction


def eos_id(tokenizer: Tokenizer) -> int | None:
    """The id that ends a document: the word tokenizer's `<eos>`, a Hugging Face tokenizer's eos token."""
    value = getattr(tokenizer, "eos_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    return int(value) if value is not None else None


def token_dtype(vocab_size: int) -> str:
    """uint16 while every id fits (ids < 65,536), else uint32: 2 or 4 bytes a token on disk."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def text_sample(fs: FileSet, field: str, cache_dir: Path, max_chars: int | None, fraction: float | None) -> str:
    """The first `max_chars` characters of the training documents (held-out ones skipped), blank-line joined."""
    parts: list[str] = []
    total, start = 0, 0
    for texts in iter_documents(fs, field, cache_dir):
        held = val_hash(np.arange(start, start + len(texts))) < fraction if fraction else np.zeros(len(texts), bool)
        start += len(texts)
        for text, is_val in zip(texts, held, strict=True):
            text = (text or "").strip()
            if is_val or not text:
                continue
            parts.append(text)
            total += len(text) + 2
            if max_chars is not None and total >= max_chars:
                return "\n\n".join(parts)[:max_chars]
    return "\n\n".join(parts)


# --- tokenizing: one task per batch of documents, run inline or in worker processes -------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _WORKER["tokenizer"] = tokenizer_from_dict(state)


def _encode(
    texts: list[str | None], start: int, eos: int | None, dtype: str, fraction: float | None, tokenizer: Any = None
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Ids of a batch of documents (`start` = index of the first), cut into the train and val parts.

    Returns `(train_ids, val_ids, train_docs, val_docs)`; blank documents count for the index but add nothing.
    """
    tokenizer = tokenizer or _WORKER["tokenizer"]
    held = val_hash(np.arange(start, start + len(texts))) < fraction if fraction else np.zeros(len(texts), bool)
    out: tuple[list[int], list[int]] = ([], [])
    docs = [0, 0]
    tail = [eos] if eos is not None else []
    for text, is_val in zip(texts, held, strict=True):
        text = (text or "").strip()
        if text:
            out[int(is_val)].extend(tokenizer.encode(text) + tail)
            docs[int(is_val)] += 1
    return np.asarray(out[0], dtype=dtype), np.asarray(out[1], dtype=dtype), docs[0], docs[1]


def _encoded_batches(
    batches: Iterator[list[str | None]], tokenizer: Tokenizer, num_proc: int, args: tuple
) -> Iterator[tuple[tuple[np.ndarray, np.ndarray, int, int], int]]:
    """`_encode` over every batch, in order; with `num_proc > 1` in worker processes, a bounded number queued."""
    start = 0
    if num_proc == 1:
        for texts in batches:
            yield _encode(texts, start, *args, tokenizer=tokenizer), sum(len(t or "") for t in texts)
            start += len(texts)
        return
    # fork where there is one, as datasets' own map does: spawn would re-run an unguarded __main__ script.
    # The pool starts between two reads, when pyarrow's and torch's threads hold no lock.
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(num_proc, get_context(method), _init_worker, (tokenizer.to_dict(),))
    queued: deque[tuple[Future, int]] = deque()
    try:
        for texts in batches:
            queued.append((pool.submit(_encode, texts, start, *args), sum(len(t or "") for t in texts)))
            start += len(texts)
            if len(queued) >= IN_FLIGHT * num_proc:
                future, size = queued.popleft()
                yield future.result(), size
        while queued:
            future, size = queued.popleft()
            yield future.result(), size
    finally:
        pool.shutdown(cancel_futures=True)


@dataclass
class TokenFile:
    """One token file and what it holds."""

    path: Path
    dtype: str
    num_tokens: int
    num_docs: int

    def open(self) -> np.memmap:
        """The ids, memory-mapped read-only: pages are read as windows touch them."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def write_token_files(
    fs: FileSet, field: str, tokenizer: Tokenizer, folder: Path, fraction: float | None, num_proc: int,
    inputs: dict[str, Any], work_dir: Path, part: str = "train",
) -> dict[str, TokenFile]:  # fmt: skip
    """Tokenize `fs` and append each part's ids to `folder/<part>.bin`, with `meta.json`; atomically.

    With `fraction`, documents hashing below it go to `val.bin`, the rest to `<part>.bin`.
    """
    tqdm = require("tqdm", "data=files").tqdm
    dtype = token_dtype(tokenizer.vocab_size)
    names = [part, "val"] if fraction else [part]
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {name: [0, 0] for name in names}  # tokens, documents
    try:
        outs = [(tmp / f"{name}.bin").open("wb") for name in names]
        bar = tqdm(total=sum(p.stat().st_size for p in fs.files), unit="B", unit_scale=True,
                   desc=f"tokenizing {fs.key}", disable=None)  # fmt: skip
        with bar:
            batches = iter_documents(fs, field, work_dir)
            args = (eos_id(tokenizer), dtype, fraction)
            for (train_ids, val_ids, train_docs, val_docs), size in _encoded_batches(
                batches, tokenizer, num_proc, args
            ):
                for name, ids, docs, out in zip(names, (train_ids, val_ids), (train_docs, val_docs), outs):
                    ids.tofile(out)  # plain writes: the page cache holds them, not this process
                    counts[name][0] += len(ids)
                    counts[name][1] += docs
                bar.update(size)
        for out in outs:
            out.close()
        if sum(c[0] for c in counts.values()) == 0:
            raise ValueError(f"{fs.key}: no text in {fs.describe()}")
        for name, (tokens, _) in counts.items():
            if tokens == 0:
                raise ValueError(
                    f"data.val_fraction: {fraction} of {sum(c[1] for c in counts.values())} documents leaves the "
                    f"{name} part empty; give data.val_paths or more documents"
                )
        meta = {
            "version": CACHE_VERSION,
            "dtype": dtype,
            "parts": {name: {"num_tokens": t, "num_docs": d} for name, (t, d) in counts.items()},
            "inputs": inputs,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():  # only a rename creates it, so it is complete: a concurrent run finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)  # the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_token_files(folder, inputs["tokenizer_sha256"]) or {}


def read_token_files(folder: Path, tokenizer_sha: str) -> dict[str, TokenFile] | None:
    """The cached parts in `folder`, or None when there is no complete cache there."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != CACHE_VERSION:
        return None
    if meta["inputs"]["tokenizer_sha256"] != tokenizer_sha:  # the key holds it: only a hand-edited cache gets here
        raise ValueError(f"data.cache_dir: {folder} holds tokens of another tokenizer; delete the folder")
    parts = {}
    for name, m in meta["parts"].items():
        path = folder / f"{name}.bin"
        if not path.is_file() or path.stat().st_size != m["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
            logger.warning("token cache %s is damaged (%s): tokenizing again", folder, path.name)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        parts[name] = TokenFile(path, meta["dtype"], m["num_tokens"], m["num_docs"])
    return parts


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path("~/.cache/ease/tokens").expanduser()


@dataclass
class Corpus:
    """What `load_corpus` returns: the memory-mapped ids of each part, the tokenizer, and a description."""

    ids: dict[str, np.memmap]
    tokenizer: Tokenizer
    source: str
    folders: list[Path]
    num_docs: dict[str, int]


def load_corpus(cfg: Any, fit_tokenizer: Callable[[str], Tokenizer], tokenizer: Tokenizer | None = None) -> Corpus:
    """train / val (/ test) token ids of `data=files`, from the cache or tokenized now.

    Args:
        cfg: The `DataConfig` (`name="files"`).
        fit_tokenizer: Builds the tokenizer from a text sample (`build_tokenizer` for `cfg.tokenizer`); called
            with "" for `hf`, which fits nothing.
        tokenizer: Use this one (a checkpoint's) instead.
    """
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    sets = {"train": file_set(cfg.paths, cfg.text_field, "data.paths")}
    for key, name in (("val_paths", "val"), ("test_paths", "test")):
        if getattr(cfg, key):
            sets[name] = file_set(getattr(cfg, key), cfg.text_field, f"data.{key}")
    fraction = None if cfg.val_paths else cfg.val_fraction
    # datasets' streaming builders keep only small metadata; a private folder, removed at the end.
    work_dir = cache_root / f".datasets-{os.getpid()}"
    try:
        if tokenizer is None:
            tokenizer = _tokenizer(cfg, sets["train"], fraction, cache_root, work_dir, fit_tokenizer)
        tok_sha = _sha(tokenizer.to_dict())
        ids: dict[str, np.memmap] = {}
        num_docs: dict[str, int] = {}
        folders = []
        for name, fs in sets.items():
            split = {"part": name, "val_fraction": fraction if name == "train" else None}
            inputs = {
                "files": [{"path": str(p), "sha256": h} for p, h in zip(fs.files, fs.hashes, strict=True)],
                "format": fs.kind,
                "text_field": cfg.text_field if fs.kind != "text" else None,
                "split": split,
                "tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__),
                "tokenizer_sha256": tok_sha,
            }
            # File names, not paths, in the key: a corpus moved elsewhere keeps its cache.
            key_inputs = {**inputs, "files": [[p.name, h] for p, h in zip(fs.files, fs.hashes, strict=True)]}
            folder = cache_root / _sha({"version": CACHE_VERSION, **key_inputs})[:24]
            token_files = read_token_files(folder, tok_sha)
            if token_files is None:
                logger.info("tokenizing %s (%s) into %s", fs.key, fs.describe(), folder)
                token_files = write_token_files(
                    fs, cfg.text_field, tokenizer, folder, split["val_fraction"], cfg.num_proc, inputs, work_dir, name
                )
            else:
                logger.info("%s: token cache %s", fs.key, folder)
            folders.append(folder)
            ids.update({part: f.open() for part, f in token_files.items()})
            num_docs.update({part: f.num_docs for part, f in token_files.items()})
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    train = sets["train"]
    source = f"files: {len(train.files)} {train.kind} file(s) from {train.files[0]}, cache {folders[0].name}"
    return Corpus(ids, tokenizer, source, folders, num_docs)


def _tokenizer(
    cfg: Any, train: FileSet, fraction: float | None, cache_root: Path, work_dir: Path,
    fit_tokenizer: Callable[[str], Tokenizer],
) -> Tokenizer:  # fmt: skip
    """The pretrained tokenizer, or one fitted on the training documents' first `max_chars` characters.

    A fitted tokenizer is a pure function of the files, the split and the settings, so it is cached under
    `tokenizers/` by their hash: a second run neither reads the text nor fits again.
    """
    if cfg.tokenizer == "hf":
        return fit_tokenizer("")
    settings = {
        "version": CACHE_VERSION,
        "files": [[p.name, h] for p, h in zip(train.files, train.hashes, strict=True)],
        "format": train.kind,
        "text_field": cfg.text_field,
        "val_fraction": fraction,
        "tokenizer": cfg.tokenizer,
        "vocab_size": cfg.vocab_size,
        "max_chars": cfg.max_chars,
    }
    path = cache_root / "tokenizers" / f"{_sha(settings)[:24]}.json"
    if path.is_file():
        return tokenizer_from_dict(json.loads(path.read_text()))
    sample = text_sample(train, cfg.text_field, work_dir, cfg.max_chars, fraction)
    if not sample:
        raise ValueError(f"data.paths: no text in {train.describe()}")
    tokenizer = fit_tokenizer(sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(tokenizer.to_dict()))
    os.replace(tmp, path)
    return tokenizer
