"""data=files: globbed text / JSON lines / parquet corpora, tokenized once into memory-mapped token files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_py

from ease.data import DataConfig, TokenBatches, build_data
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


def test_memmap_windows_equal_in_memory_windows_and_cache_is_reused(tmp_path: Path, monkeypatch) -> None:
    corpus = docs(120, 0)
    write_jsonl(tmp_path / "a.jsonl", corpus[:70])
    write_jsonl(tmp_path / "b.jsonl", corpus[70:])
    data = build_data(cfg(tmp_path, paths=[str(tmp_path / "*.jsonl")], val_fraction=0.2), seed=1)
    assert isinstance(data.train.tokens, np.memmap) and data.train.tokens.dtype == np.uint16
    # the same ids, written out again: every train document not held out, each followed by <eos>
    held_out = val_mask(len(corpus), 0.2)
    eos = data.tokenizer.eos_id
    expected = [t for d, val in zip(corpus, held_out) if not val for t in [*data.tokenizer.encode(d), eos]]
    assert data.train.tokens.tolist() == expected and 0 < held_out.sum() < len(corpus)
    plain = TokenBatches(expected, seq_len=8, batch_size=4, shuffle=True, seed=1)
    for epoch in (0, 2):
        data.train.set_epoch(epoch)
        plain.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(data.train, plain, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # a second build reads the cache (nothing tokenized); a changed file is tokenized again
    calls = []
    real = files_module.write_token_files
    monkeypatch.setattr(files_module, "write_token_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = build_data(cfg(tmp_path, paths=[str(tmp_path / "*.jsonl")], val_fraction=0.2), seed=1)
    assert calls == [] and again.train.tokens.tolist() == expected
    write_jsonl(tmp_path / "b.jsonl", [*corpus[70:], "w1 w2 w3"])
    changed = build_data(cfg(tmp_path, paths=[str(tmp_path / "*.jsonl")], val_fraction=0.2), seed=1)
    assert (
        calls == [1] and changed.num_train_tokens + changed.num_val_tokens > data.num_train_tokens + data.num_val_tokens
    )


def test_text_parquet_and_val_paths(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    corpus = docs(30, 1)
    (tmp_path / "train.txt").write_text("\n\n".join(corpus[:20]) + "\n")
    (tmp_path / "val.txt").write_text("\n\n".join(corpus[20:]) + "\n")
    data = build_data(cfg(tmp_path, paths=[str(tmp_path / "train.txt")], val_paths=[str(tmp_path / "val.txt")]))
    eos = data.tokenizer.eos_id
    assert data.val.tokens.tolist()[-1] == eos and data.num_val_tokens > 20 * 5 // 2
    pq.write_table(pa.table({"body": corpus, "k": list(range(30))}), tmp_path / "c.parquet")
    p = build_data(cfg(tmp_path, paths=[str(tmp_path / "c.parquet")], text_field="body", val_fraction=0.3))
    assert p.num_train_tokens + p.num_val_tokens == sum(len(p.tokenizer.encode(d)) + 1 for d in corpus)
    with pytest.raises(ValueError, match=r"^data.text_field: 'text' is not in .*c.parquet \(fields: body, k\)$"):
        build_data(cfg(tmp_path, paths=[str(tmp_path / "c.parquet")]))


@pytest.mark.parametrize(
    ("setup", "kw", "message"),
    [
        (None, {"paths": ["nothing/*.jsonl"]}, r"^data.paths: 'nothing/\*.jsonl' matches no file$"),
        ("empty", {}, r"^data.paths: .*x.jsonl is empty$"),
        ("garbage", {}, r"^data.paths: .*x.jsonl line 1 is not a JSON object"),
        ("field", {}, r"^data.text_field: 'text' is not in .*x.jsonl \(fields: body\)$"),
        ("csv", {"paths": ["{tmp}/x.csv"]}, r"^data.paths: .*x.csv has an unsupported extension"),
    ],
)
def test_bad_corpora_are_one_line(tmp_path: Path, setup, kw, message) -> None:
    target = tmp_path / "x.jsonl"
    if setup == "empty":
        target.write_text("")
    elif setup == "garbage":
        target.write_bytes(b"\x00\x01not json\n")
    elif setup == "field":
        target.write_text('{"body": "a b"}\n')
    elif setup == "csv":
        (tmp_path / "x.csv").write_text("a,b\n")
    paths = [p.replace("{tmp}", str(tmp_path)) for p in kw.get("paths", [str(target)])]
    with pytest.raises(ValueError, match=message):
        build_data(cfg(tmp_path, paths=paths))


def test_config_checks() -> None:
    with pytest.raises(ValueError, match=r"^data.paths: data=files needs the corpus files"):
        DataConfig(name="files")
    with pytest.raises(ValueError, match=r"^data.num_proc: must be an int >= 1"):
        DataConfig(name="files", paths=["a.txt"], num_proc=0)


def test_train_py_on_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", docs(200, 2))
    run = tmp_path / "run"
    result = train_py("+preset=deed", "data=files", f"data.paths=[{tmp_path}/*.jsonl]", "data.val_fraction=0.1",
                      f"data.cache_dir={tmp_path / 'cache'}", "model=tiny", "train.max_steps=6", "train.eval_every=3",
                      "progress=false", f"hydra.run.dir={run}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert metrics["data_source"].startswith("files: 1 json file(s)") and metrics["training"]["steps_run"] == 6
