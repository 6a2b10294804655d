"""data=files: globbed text / JSON lines / parquet corpora, tokenized once into memory-mapped token files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose, train_py

from ease.app.runner import run
from ease.data import CharTokenizer, DataConfig, TokenBatches, build_data
from ease.data import files as files_module
from ease.data.files import val_mask

WORDS = [f"w{i}" for i in range(50)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs)))


def docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) for _ in range(n)]


def cfg(tmp_path: Path, **kw) -> DataConfig:
    base = {"name": "files", "cache_dir": str(tmp_path / "cache"), "seq_len": 8, "batch_size": 4, "vocab_size": 100}
    return DataConfig(**{**base, **kw})


def stream(tokenizer, texts: list[str]) -> list[int]:
    """The token stream written by hand: each document's ids, then <eos>."""
    return [t for d in texts for t in [*tokenizer.encode(d), tokenizer.eos_id]]


def token_folders(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file())


def test_memmap_windows_equal_in_memory_windows_and_cache_is_reused(tmp_path: Path, monkeypatch) -> None:
    corpus = docs(120, 0)
    write_jsonl(tmp_path / "a.jsonl", corpus[:70])
    write_jsonl(tmp_path / "b.jsonl", corpus[70:])
    config = cfg(tmp_path, paths=[str(tmp_path / "*.jsonl")], val_fraction=0.2)
    data = build_data(config, seed=1)
    assert isinstance(data.train.tokens, np.memmap) and data.train.tokens.dtype == np.uint16
    held_out = val_mask(len(corpus), 0.2)
    expected = stream(data.tokenizer, [d for d, val in zip(corpus, held_out) if not val])
    assert data.train.tokens.tolist() == expected and 0 < held_out.sum() < len(corpus)
    assert data.val.tokens.tolist() == stream(data.tokenizer, [d for d, val in zip(corpus, held_out) if val])
    assert (data.num_train_tokens, data.num_val_tokens) == (len(expected), len(data.val.tokens))
    plain = TokenBatches(expected, seq_len=8, batch_size=4, shuffle=True, seed=1)
    for epoch in (0, 2):
        data.train.set_epoch(epoch)
        plain.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(data.train, plain, strict=True):
            assert xa.dtype == torch.long and torch.equal(xa, xb) and torch.equal(ya, yb)
    # the sidecar says what the token files hold and what they were made from
    (folder,) = token_folders(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["parts"]["train"]["num_tokens"] == len(expected)
    assert meta["parts"]["val"]["num_docs"] == held_out.sum() and meta["inputs"]["format"] == "json"
    assert [f["path"] for f in meta["inputs"]["files"]] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert (folder / "train.bin").stat().st_size == 2 * len(expected)
    assert not list((tmp_path / "cache").glob(".datasets-*")) and not list((tmp_path / "cache").glob("*.tmp-*"))
    # a second build reads the cache: no text is read, nothing fitted or tokenized
    calls = []
    real_write, real_sample = files_module.write_token_files, files_module.text_sample
    monkeypatch.setattr(files_module, "write_token_files", lambda *a, **k: calls.append("write") or real_write(*a, **k))
    monkeypatch.setattr(files_module, "text_sample", lambda *a, **k: calls.append("sample") or real_sample(*a, **k))
    again = build_data(config, seed=1)
    assert calls == [] and again.train.tokens.tolist() == expected
    assert again.tokenizer.to_dict() == data.tokenizer.to_dict()
    # a changed file is another key: fitted and tokenized again, the old cache left as it is
    write_jsonl(tmp_path / "b.jsonl", [*corpus[70:], "w1 w2 w3"])
    changed = build_data(config, seed=1)
    assert calls == ["sample", "write"] and len(token_folders(tmp_path)) == 2
    assert changed.num_train_tokens + changed.num_val_tokens == len(expected) + len(data.val.tokens) + 4


def test_another_tokenizer_is_another_cache(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", docs(40, 3))
    word = build_data(cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], val_fraction=0.2))
    char = build_data(cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], val_fraction=0.2, tokenizer="char"))
    assert len(token_folders(tmp_path)) == 2 and char.num_train_tokens > 2 * word.num_train_tokens
    # a checkpoint's tokenizer equal to the fitted one finds the same cache
    given = build_data(cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], val_fraction=0.2), tokenizer=char.tokenizer)
    assert len(token_folders(tmp_path)) == 2 and given.train.tokens.tolist() == char.train.tokens.tolist()
    # a hand-edited sidecar naming another tokenizer is refused, not trusted
    folder = Path(str(char.train.tokens.filename)).parent
    meta = json.loads((folder / "meta.json").read_text())
    meta["inputs"]["tokenizer_sha256"] = "0" * 64
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"^data.cache_dir: .* holds tokens of another tokenizer"):
        build_data(cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], val_fraction=0.2, tokenizer="char"))


def test_text_paragraphs_parquet_val_and_test_paths(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    corpus = docs(30, 1)
    (tmp_path / "train.txt").write_text("\n\n".join(corpus[:20]) + "\n")
    (tmp_path / "val.txt").write_text("\n\n\n".join(corpus[20:25]) + "\n\n")
    (tmp_path / "test.txt").write_text("  " + "\n\n".join(corpus[25:]))
    paths = {"paths": [str(tmp_path / "train.txt")], "val_paths": [str(tmp_path / "val.txt")]}
    data = build_data(cfg(tmp_path, **paths, test_paths=[str(tmp_path / "test.txt")]))
    # one document per paragraph, surrounding whitespace stripped, so each ends in exactly one <eos>
    assert data.train.tokens.tolist() == stream(data.tokenizer, corpus[:20])
    assert data.val.tokens.tolist() == stream(data.tokenizer, corpus[20:25])
    assert data.test.tokens.tolist() == stream(data.tokenizer, corpus[25:])
    pq.write_table(pa.table({"body": corpus, "k": list(range(30))}), tmp_path / "c.parquet")
    p = build_data(cfg(tmp_path, paths=[str(tmp_path / "c.parquet")], text_field="body", val_fraction=0.3))
    held = val_mask(30, 0.3)
    assert p.train.tokens.tolist() == stream(p.tokenizer, [d for d, v in zip(corpus, held) if not v])
    assert p.test is None and p.source.startswith(f"files: 1 parquet file(s) from {tmp_path / 'c.parquet'}")


def test_split_by_documents_is_deterministic_and_spread(tmp_path: Path) -> None:
    held = val_mask(4000, 0.1)
    assert np.array_equal(held, val_mask(4000, 0.1)) and abs(held.mean() - 0.1) < 0.015
    assert abs(held[:2000].mean() - held[2000:].mean()) < 0.03  # not the tail: both halves give val documents
    assert np.array_equal(val_mask(1000, 0.1), held[:1000])  # a document's side does not depend on the others
    corpus = docs(200, 4)
    write_jsonl(tmp_path / "a.jsonl", corpus)
    one = build_data(cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], val_fraction=0.1), seed=0)
    two = build_data(cfg(tmp_path / "other", paths=[str(tmp_path / "a.jsonl")], val_fraction=0.1), seed=5)
    assert one.val.tokens.tolist() == two.val.tokens.tolist() and one.train.tokens.tolist() == two.train.tokens.tolist()
    # the tokenizer is fitted on the train documents only: a word only in the val documents is unknown
    corpus[int(np.flatnonzero(val_mask(200, 0.1))[0])] += " onlyinval"
    write_jsonl(tmp_path / "b.jsonl", corpus)
    fitted = build_data(cfg(tmp_path, paths=[str(tmp_path / "b.jsonl")], val_fraction=0.1))
    assert "onlyinval" not in fitted.tokenizer.to_dict()["vocab"]


def test_parallel_tokenizing_and_uint32_ids(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(files_module, "DOCS_PER_BATCH", 100)  # 25 batches: more than the 4 queued at a time
    corpus = docs(2500, 5)
    write_jsonl(tmp_path / "a.jsonl", corpus)
    one = build_data(cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], val_fraction=0.1))
    two = build_data(cfg(tmp_path / "p", paths=[str(tmp_path / "a.jsonl")], val_fraction=0.1, num_proc=2))
    assert one.train.tokens.tolist() == two.train.tokens.tolist() and one.val.tokens.tolist() == two.val.tokens.tolist()
    # more than 65,536 ids: 4 bytes a token, ids above 65,535 intact
    alphabet = "".join(chr(0x10000 + i) for i in range(70_000))
    write_jsonl(tmp_path / "wide.jsonl", [alphabet, alphabet[::-1]])
    wide = build_data(cfg(tmp_path, paths=[str(tmp_path / "wide.jsonl")], val_paths=[str(tmp_path / "wide.jsonl")],
                          tokenizer="char", vocab_size=80_000, max_chars=None))  # fmt: skip
    assert wide.train.tokens.dtype == np.uint32 and wide.tokenizer.vocab_size > 65_536
    assert wide.train.tokens.tolist() == [*wide.tokenizer.encode(alphabet), *wide.tokenizer.encode(alphabet[::-1])]
    assert isinstance(wide.tokenizer, CharTokenizer) and int(wide.train.tokens.max()) > 65_535


def test_a_killed_tokenization_leaves_no_cache_and_a_damaged_one_is_redone(tmp_path: Path, monkeypatch) -> None:
    write_jsonl(tmp_path / "a.jsonl", docs(2500, 6))
    config = cfg(tmp_path, paths=[str(tmp_path / "a.jsonl")], val_fraction=0.1)
    real = files_module._encode
    seen = []

    def dies_on_the_second_batch(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(files_module, "_encode", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        build_data(config)
    assert token_folders(tmp_path) == [] and not list((tmp_path / "cache").glob("*.tmp-*"))
    monkeypatch.setattr(files_module, "_encode", real)
    data = build_data(config)
    expected = data.train.tokens.tolist()
    (folder,) = token_folders(tmp_path)
    with (folder / "train.bin").open("r+b") as f:
        f.truncate(100)
    again = build_data(config)
    assert again.train.tokens.tolist() == expected


@pytest.mark.parametrize(
    ("setup", "kw", "message"),
    [
        (None, {"paths": ["nothing/*.jsonl"]}, r"^data.paths: 'nothing/\*.jsonl' matches no file$"),
        (None, {"val_paths": ["nothing.txt"]}, r"^data.val_paths: 'nothing.txt' matches no file$"),
        ("empty", {}, r"^data.paths: .*x.jsonl is empty$"),
        ("garbage", {}, r"^data.paths: .*x.jsonl line 1 is not a JSON object"),
        ("field", {}, r"^data.text_field: 'text' is not in .*x.jsonl \(fields: body\)$"),
        ("numbers", {"text_field": "n"}, r"^data.text_field: 'n' holds int values, not text \(.*x.jsonl\)$"),
        ("csv", {"paths": ["{tmp}/x.csv"]}, r"^data.paths: .*x.csv has an unsupported extension"),
        ("mixed", {"paths": ["{tmp}/*"]}, r"^data.paths: mixes formats \(json, text\)"),
        ("bad line", {"paths": ["{tmp}/*.jsonl"]}, r"^data.paths: cannot read .*y.jsonl: "),
        ("parquet", {"paths": ["{tmp}/x.parquet"]}, r"^data.paths: cannot read .*x.parquet as parquet"),
        ("blank", {"paths": ["{tmp}/x.txt"]}, r"^data.paths: no text in .*x.txt$"),
        ("few", {"val_fraction": 0.01}, r"^data.val_fraction: 0.01 of 3 documents leaves the val part empty"),
    ],
)
def test_bad_corpora_are_one_line(tmp_path: Path, setup, kw, message) -> None:
    target = tmp_path / "x.jsonl"
    write_jsonl(target, docs(3, 0))
    if setup == "empty":
        target.write_text("")
    elif setup == "garbage":
        target.write_bytes(b"\x00\x01not json\n")
    elif setup == "field":
        target.write_text('{"body": "a b"}\n')
    elif setup == "csv":
        (tmp_path / "x.csv").write_text("a,b\n")
    elif setup == "mixed":
        (tmp_path / "x.txt").write_text("a b\n")
    elif setup == "bad line":
        write_jsonl(tmp_path / "y.jsonl", docs(50, 0))
        with (tmp_path / "y.jsonl").open("a") as f:
            f.write('{"text": "unterminated\n')
    elif setup == "parquet":
        (tmp_path / "x.parquet").write_bytes(b"PAR1 not really parquet")
    elif setup == "blank":
        (tmp_path / "x.txt").write_text("\n\n   \n\n\n")
    paths = [p.replace("{tmp}", str(tmp_path)) for p in kw.pop("paths", [str(target)])]
    with pytest.raises(ValueError, match=message) as err:
        build_data(cfg(tmp_path, paths=paths, **kw))
    assert "\n" not in str(err.value)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match=r"^data.paths: data=files needs the corpus files"):
        DataConfig(name="files")
    with pytest.raises(ValueError, match=r"^data.num_proc: must be an int >= 1"):
        DataConfig(name="files", paths=["a.txt"], num_proc=0)
    with pytest.raises(ValueError, match=r"^data.val_paths: must be a list of file paths or globs"):
        DataConfig(name="files", paths=["a.txt"], val_paths=[""])
    assert DataConfig(name="files", paths="a.txt").paths == ["a.txt"]  # one path on the command line
    composed = compose(["data=files", "data.paths=[a.jsonl,b/*.jsonl]"]).data
    assert composed.cache_dir == str(REPO / "outputs" / "cache" / "tokens") and list(composed.paths) == [
        "a.jsonl",
        "b/*.jsonl",
    ]


def test_training_on_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", docs(200, 2))
    overrides = ["+preset=deed", "data=files", f"data.paths=[{tmp_path}/*.jsonl]", "data.val_fraction=0.1",
                 f"data.cache_dir={tmp_path / 'cache'}", "model=tiny", "train.max_steps=6", "train.eval_every=3",
                 "progress=false"]  # fmt: skip
    record = run(compose(overrides), tmp_path / "run", overrides)
    metrics = record["metrics"]
    assert record["status"] == "ok" and metrics["training"]["steps_run"] == 6
    assert metrics["data_source"].startswith(f"files: 1 json file(s) from {tmp_path / 'a.jsonl'}")
    assert 1.0 < metrics["ppl"] < 200


@pytest.mark.slow
def test_train_py_on_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", docs(200, 2))
    run_dir = tmp_path / "run"
    result = train_py("+preset=deed", "data=files", f"data.paths=[{tmp_path}/*.jsonl]", "data.val_fraction=0.1",
                      f"data.cache_dir={tmp_path / 'cache'}", "model=tiny", "train.max_steps=6", "train.eval_every=3",
                      "progress=false", f"hydra.run.dir={run_dir}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["data_source"].startswith("files: 1 json file(s)") and metrics["training"]["steps_run"] == 6


def test_a_line_of_spaces_ends_a_text_paragraph(tmp_path: Path) -> None:
    # WikiText's raw files separate paragraphs by lines holding one space: each paragraph is still one document.
    corpus = docs(12, 2)
    (tmp_path / "w.txt").write_text(" \n" + "\n \n".join(corpus) + "\n \n")
    data = build_data(cfg(tmp_path, paths=[str(tmp_path / "w.txt")], val_fraction=0.3))
    held = val_mask(len(corpus), 0.3)
    assert 0 < held.sum() < len(corpus)
    assert data.train.tokens.tolist() == stream(data.tokenizer, [d for d, v in zip(corpus, held) if not v])
    assert data.val.tokens.tolist() == stream(data.tokenizer, [d for d, v in zip(corpus, held) if v])
