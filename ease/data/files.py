"""`data=files`: your own corpus (text, JSON lines or parquet), tokenized once into memory-mapped token files.

    python train.py +preset=deed data=files 'data.paths=[corpus/*.jsonl]' data.text_field=text

Hugging Face `datasets` reads the files (memory-mapped Arrow, never the whole corpus in Python objects) and
tokenizes them with `data.num_proc` processes, showing its progress bar. The token ids of every document,
each followed by the tokenizer's end-of-document id when it has one, are streamed into a flat `np.memmap`
(uint16 when the vocabulary fits, else uint32) under `data.cache_dir`, in a folder named by a key of: every
file's name and SHA-256, the format, the text field, the split settings and the tokenizer's own state. A
changed file or another tokenizer is another key, so a stale cache is never read; the files are written to
temporary names and renamed, so a killed run never leaves a half cache that looks complete.

Documents: one per row for JSON lines and parquet; for plain text, one per paragraph (blank-line separated),
so a gigabyte text file is never one string. The validation split is `data.val_paths` when given, else a
`data.val_fraction` share of the documents chosen by a hash of their index (spread over the whole corpus,
not its tail, and the same for every seed). `TokenBatches` reads training windows straight from the map.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ease.extras import require

from .tokenizers import Tokenizer

logger = logging.getLogger("ease.data")

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CACHE_VERSION = 1
CHUNK = 1 << 20


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


def file_format(files: Sequence[Path]) -> str:
    return FORMATS[files[0].suffix.lower()]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
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
            with path.open("rb") as f:
                first = f.readline()
            try:
                record = json.loads(first)
            except ValueError:
                raise ValueError(
                    f"{key}: {path} line 1 is not a JSON object (JSON lines: one object per line)"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{key}: {path} line 1 is not a JSON object (JSON lines: one object per line)")
            names = list(record)
        else:
            continue
        if field not in names:
            raise ValueError(f"data.text_field: {field!r} is not in {path} (fields: {', '.join(map(str, names))})")


def load_documents(files: Sequence[Path], kind: str, field: str, cache_dir: Path, key: str) -> Any:
    """The files as one `datasets.Dataset` with a `text` column, one document per row (Arrow, memory-mapped)."""
    datasets = require("datasets", "data=files")
    datasets.disable_caching()  # the token file is the cache; no Arrow copies of every map in ~/.cache
    options: dict[str, Any] = {"sample_by": "paragraph"} if kind == "text" else {}
    try:
        ds = datasets.load_dataset(
            kind, data_files=[str(p) for p in files], split="train", cache_dir=str(cache_dir), **options
        )
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        names = files[0] if len(files) == 1 else f"{len(files)} files from {files[0]}"
        raise ValueError(f"{key}: cannot read {names}: {type(err).__name__}: {first}") from None
    column = "text" if kind == "text" else field
    ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    if len(ds) == 0:
        raise ValueError(f"{key}: no documents in {files[0]}{' ...' if len(files) > 1 else ''}")
    return ds


def text_sample(ds: Any, max_chars: int | None, rows: Iterable[int] | None = None) -> str:
    """The first `max_chars` characters of the documents (whole documents, joined by blank lines)."""
    parts, total = [], 0
    indices = range(len(ds)) if rows is None else rows
    for i in indices:
        text = ds[int(i)]["text"] or ""
        parts.append(text)
        total += len(text) + 2
        if max_chars is not None and total >= max_chars:
            break
    return "\n\n".join(parts)[: max_chars if max_chars is not None else None]


def eos_id(tokenizer: Tokenizer) -> int | None:
    """The id that ends a document: the word tokenizer's `<eos>`, a Hugging Face tokenizer's eos token."""
    value = getattr(tokenizer, "eos_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    return int(value) if value is not None else None


def val_mask(num_docs: int, fraction: float) -> np.ndarray:
    """Which documents validate: those whose index hashes (splitmix64) below `fraction`."""
    z = np.arange(num_docs, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


@dataclass
class TokenFile:
    """One memory-mapped token file and what it holds."""

    path: Path
    dtype: str
    num_tokens: int
    num_docs: int

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def cache_key(files: Sequence[Path], kind: str, field: str, tokenizer: Tokenizer, split: dict[str, Any]) -> str:
    state = json.dumps(tokenizer.to_dict(), sort_keys=True, default=str)
    key = {
        "version": CACHE_VERSION,
        "files": [[p.name, sha256(p)] for p in files],
        "format": kind,
        "text_field": field if kind != "text" else None,
        "split": split,
        "tokenizer": hashlib.sha256(state.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer, eos: int | None) -> dict[str, list]:
    ids = [tokenizer.encode(text or "") + ([eos] if eos is not None else []) for text in batch["text"]]
    return {"ids": ids, "n": [len(x) for x in ids]}


def write_token_files(
    ds: Any, tokenizer: Tokenizer, folder: Path, parts: dict[str, np.ndarray | None], num_proc: int
) -> dict[str, TokenFile]:
    """Tokenize `ds` (in parallel) and stream each part's documents into `folder/<part>.bin` (+ meta.json).

    `parts` maps a part name to the boolean mask of its documents (None: all of them)."""
    datasets = require("datasets", "data=files")
    eos = eos_id(tokenizer)
    dtype = "uint16" if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    # Stored at the token file's width: the intermediate Arrow file is 4x smaller than int64 lists.
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype)), "n": datasets.Value("int64")})
    encoded = ds.map(
        _encode_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"], fn_kwargs={"tokenizer": tokenizer, "eos": eos}, desc="tokenizing",
        features=features,
    )  # fmt: skip
    lengths = np.asarray(encoded.with_format("numpy")["n"], dtype=np.int64)  # 8 bytes a document
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out: dict[str, TokenFile] = {}
    for name, mask in parts.items():
        chosen = np.ones(len(lengths), dtype=bool) if mask is None else mask
        total = int(lengths[chosen].sum())
        if total == 0:
            raise ValueError(f"data.val_fraction: the {name} part holds no tokens ({int(chosen.sum())} documents)")
        target = np.memmap(tmp / f"{name}.bin", dtype=dtype, mode="w+", shape=(total,))
        at = 0
        for start, batch in _batches(encoded.with_format("numpy"), 1024):
            for offset, ids in enumerate(batch["ids"]):
                if chosen[start + offset] and len(ids):
                    target[at : at + len(ids)] = ids
                    at += len(ids)
        target.flush()
        del target
        out[name] = TokenFile(folder / f"{name}.bin", dtype, total, int(chosen.sum()))
    meta = {name: {"dtype": f.dtype, "num_tokens": f.num_tokens, "num_docs": f.num_docs} for name, f in out.items()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)  # the folder appears complete or not at all
    return out


def _batches(ds: Any, size: int) -> Iterator[tuple[int, dict[str, list]]]:
    for start in range(0, len(ds), size):
        yield start, ds[start : start + size]


def read_token_files(folder: Path) -> dict[str, TokenFile] | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return {
        name: TokenFile(folder / f"{name}.bin", m["dtype"], m["num_tokens"], m["num_docs"]) for name, m in meta.items()
    }


def default_cache_dir() -> Path:
    return Path("~/.cache/ease/tokens").expanduser()


@dataclass
class Corpus:
    """What `load_corpus` returns: the memory-mapped ids of each part, the tokenizer, and a description."""

    ids: dict[str, np.memmap]
    tokenizer: Tokenizer
    source: str
    cache: Path


def load_corpus(cfg: Any, fit_tokenizer: Any, tokenizer: Tokenizer | None = None) -> Corpus:
    """train / val (/ test) token ids of `data=files`, from the cache or tokenized now.

    `fit_tokenizer(text)` builds the tokenizer from the sample of the training documents when none is given.
    """
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    train_files = find_files(cfg.paths, "data.paths")
    kind = file_format(train_files)
    check_text_field(train_files, kind, cfg.text_field, "data.paths")
    hf_cache = cache_root / "hf"
    train_ds = load_documents(train_files, kind, cfg.text_field, hf_cache, "data.paths")
    mask = None if cfg.val_paths else val_mask(len(train_ds), cfg.val_fraction)
    if tokenizer is None:
        rows = None if mask is None else np.flatnonzero(~mask)
        tokenizer = fit_tokenizer(text_sample(train_ds, cfg.max_chars, rows))
    sets: dict[str, tuple[list[Path], Any, dict[str, np.ndarray | None]]] = {}
    if mask is None:
        sets["train"] = (train_files, train_ds, {"train": None})
    else:
        if mask.all() or not mask.any():
            raise ValueError(
                f"data.val_fraction: {cfg.val_fraction} of {len(train_ds)} documents leaves the train or val part "
                "empty; give data.val_paths or more documents"
            )
        sets["train"] = (train_files, train_ds, {"train": ~mask, "val": mask})
    for key, name in (("val_paths", "val"), ("test_paths", "test")):
        patterns = getattr(cfg, key)
        if patterns:
            files = find_files(patterns, f"data.{key}")
            kind_i = file_format(files)
            check_text_field(files, kind_i, cfg.text_field, f"data.{key}")
            sets[name] = (files, load_documents(files, kind_i, cfg.text_field, hf_cache, f"data.{key}"), {name: None})
    ids: dict[str, np.memmap] = {}
    folders = []
    for files, ds, parts in sets.values():
        split = {"parts": sorted(parts), "val_fraction": cfg.val_fraction if len(parts) > 1 else None}
        folder = cache_root / cache_key(files, file_format(files), cfg.text_field, tokenizer, split)
        token_files = read_token_files(folder)
        if token_files is None:
            logger.info("tokenizing %d file(s) into %s", len(files), folder)
            token_files = write_token_files(ds, tokenizer, folder, parts, cfg.num_proc)
        else:
            logger.info("token cache %s", folder)
        folders.append(folder)
        ids.update({name: f.open() for name, f in token_files.items()})
    source = f"files: {len(train_files)} {kind} file(s) from {train_files[0]}"
    return Corpus(ids, tokenizer, source, folders[0])
