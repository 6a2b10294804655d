"""Tests for ease.data: WikiText loading, tokenizers, batching, the synthetic corpus, and input checks."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from ease.data import (
    BPETokenizer,
    CharTokenizer,
    DataConfig,
    SyntheticTokenizer,
    TokenBatches,
    WordTokenizer,
    build_data,
    build_tokenizer,
    load_wikitext_text,
    make_synthetic_corpus,
    split_text,
    split_train_val,
    synthetic_rules,
    tokenizer_from_dict,
)
from ease.data import wikitext as wikitext_module
from ease.data.wikitext import truncate_at_whitespace

SAMPLE = "The cat sat .\n = = Heading = = \n\n Das Wörtchen ist schön , 東京 <unk> !\n"


@pytest.fixture
def valid_only_dir(tmp_path: Path, wikitext_dir: Path) -> Path:
    """A folder that holds only the real valid split (linked, not copied), so the train file is surely absent."""
    (tmp_path / "wiki.valid.tokens").symlink_to(wikitext_dir / "wiki.valid.tokens")
    return tmp_path


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a missing folder an error even where the optional datasets package is installed."""
    monkeypatch.setattr(wikitext_module, "_datasets_available", lambda: False)


def _write_splits(directory: Path, **splits: str) -> Path:
    for split, text in splits.items():
        (directory / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return directory


# --- WikiText-2 loading -------------------------------------------------------------------------------


def test_wikitext_falls_back_to_valid_and_reads_200k_chars(
    valid_only_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EASE_DATA_DIR", str(valid_only_dir))
    with caplog.at_level(logging.WARNING, logger="ease.data"):
        text, path = load_wikitext_text()
    full = (valid_only_dir / "wiki.valid.tokens").read_text(encoding="utf-8")
    assert path.name == "wiki.valid.tokens"
    assert 200_000 - 30 <= len(text) <= 200_000  # cut back to a whitespace, at most one word
    assert text == full[: len(text)] and full[len(text)].isspace()
    warnings = [r for r in caplog.records if r.name == "ease.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wiki.valid.tokens" in warnings[0].getMessage()


def test_wikitext_max_chars_none_reads_whole_file(valid_only_dir: Path) -> None:
    text, _ = load_wikitext_text(valid_only_dir, max_chars=None)
    assert len(text) == len((valid_only_dir / "wiki.valid.tokens").read_text(encoding="utf-8"))


def test_truncation_never_splits_a_word() -> None:
    assert truncate_at_whitespace("aaa bbb ccc", 6) == "aaa"
    assert truncate_at_whitespace("aaa bbb ccc", 7) == "aaa bbb"
    assert truncate_at_whitespace("aaa bbb", 50) == "aaa bbb"
    assert truncate_at_whitespace("abcdefgh", 3) == "abc"  # no whitespace at all: hard cut


def test_word_tokenizer_on_wikitext_has_1000_ids_and_real_unk_share(valid_only_dir: Path) -> None:
    text, _ = load_wikitext_text(valid_only_dir)
    tok = WordTokenizer.fit(text, 1000)
    ids = torch.tensor(tok.encode(text))
    assert tok.vocab_size == 1000 and tok.vocab[0] == "<unk>" and "<eos>" in tok.vocab
    assert int(ids.max()) == 999 and int(ids.min()) == 0
    # Plain re-implementation: top 999 words (WikiText's own <unk> excluded), the rest are unknown.
    lines = text.split("\n")
    words: list[str] = []
    for line in lines[:-1]:
        if line.split():
            words += [*line.split(), "<eos>"]
    words += lines[-1].split()  # the cut-off last line has no newline, hence no <eos>
    counts = Counter(w for w in words if w != "<unk>")
    known = {w for w, _ in counts.most_common(999)}
    assert len(ids) == len(words)
    assert int((ids == 0).sum()) == sum(w not in known for w in words)
    unk_share = (ids == 0).double().mean().item()
    assert 0.15 < unk_share < 0.40  # the top 1,000 words cover most of the valid split; <unk> also occurs literally


def test_build_data_wikitext_defaults(valid_only_dir: Path) -> None:
    data = build_data(DataConfig(data_dir=str(valid_only_dir)), seed=0)
    assert data.vocab_size == data.tokenizer.vocab_size == 1000
    assert data.source.endswith("wiki.valid.tokens") and data.test is None  # no test file in this folder
    # 200K chars are ~40K words; 10% of the characters go to val.
    total = data.num_train_tokens + data.num_val_tokens
    assert 35_000 < total < 45_000
    assert data.num_val_tokens / total == pytest.approx(0.1, abs=0.02)
    x, y = next(iter(data.train))
    assert x.shape == y.shape == (32, 64) and x.dtype == torch.long


# --- tokenizers ---------------------------------------------------------------------------------------


def test_word_tokenizer_lines_unk_and_ties() -> None:
    tok = WordTokenizer.fit("b a\nc a b\n", 4)  # counts a=2, b=2, <eos>=2, c=1: ties go to first occurrence
    assert tok.vocab == ["<unk>", "b", "a", "<eos>"]
    assert tok.encode("a zzz <unk>\n\n b") == [2, 0, 0, 3, 1]  # blank line adds no <eos>; unknown -> 0
    assert tok.decode([2, 1, 3, 1]) == "a b\nb"
    text = "one two three\nfour five six\nseven"
    a, b = split_text(text, 0.4)  # cut at 60% of the characters, moved back to a whitespace
    assert (a, b) == ("one two three\nfour ", "five six\nseven")
    tok = WordTokenizer.fit(text, 100)
    assert tok.encode(a) + tok.encode(b) == tok.encode(text)  # splitting at a whitespace keeps the ids


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_and_serialisation(kind: str) -> None:
    text = SAMPLE * 50
    tok = build_tokenizer(kind, 300, text)
    ids = tok.encode(SAMPLE)
    assert all(0 <= i < tok.vocab_size <= 300 for i in ids)
    assert tok.decode(ids) == SAMPLE
    restored = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert type(restored) is type(tok) and restored.vocab_size == tok.vocab_size
    assert restored.encode(SAMPLE) == ids


def test_char_tokenizer_caps_vocab_with_unk() -> None:
    tok = CharTokenizer.fit("aaab bc", 3)  # keeps 'a' and 'b'; ' ' and 'c' become <unk>
    assert tok.vocab_size == 3
    assert tok.encode("abc ") == [1, 2, 0, 0]
    assert tok.decode([1, 0]) == "a\ufffd"


def test_bpe_learns_merges_and_is_deterministic() -> None:
    text = SAMPLE * 50
    a, b = BPETokenizer.fit(text, 300), BPETokenizer.fit(text, 300)
    assert a.to_dict() == b.to_dict()
    assert len(a.encode(SAMPLE)) < len(SAMPLE.encode("utf-8"))  # merges shorten the byte sequence


def test_word_and_synthetic_serialisation() -> None:
    word = WordTokenizer.fit(SAMPLE, 10)
    assert tokenizer_from_dict(json.loads(json.dumps(word.to_dict()))).encode(SAMPLE) == word.encode(SAMPLE)
    syn = SyntheticTokenizer(8)
    assert syn.decode([0, 7, 3]) == "t0 t7 t3" and syn.encode("t0 t7 t3") == [0, 7, 3]
    assert tokenizer_from_dict(syn.to_dict()).vocab_size == 8


# --- batching -----------------------------------------------------------------------------------------


def test_split_train_val_is_contiguous() -> None:
    train, val = split_train_val(list(range(100)), 0.1)
    assert train == list(range(90)) and val == list(range(90, 100))
    train_t, val_t = split_train_val(torch.arange(10), 0.25)
    assert train_t.tolist() == list(range(8)) and val_t.tolist() == [8, 9]


def test_token_batches_shapes_targets_and_len() -> None:
    batches = TokenBatches(list(range(1000)), seq_len=10, batch_size=8)
    # 999 usable transitions -> 99 windows of 11 tokens with stride 10.
    assert batches.num_windows == 99 and batches.num_tokens == 990 and len(batches) == 13
    seen = list(batches)
    assert len(seen) == 13 and seen[-1][0].shape == (3, 10)
    for x, y in seen[:-1]:
        assert x.shape == y.shape == (8, 10) and x.dtype == y.dtype == torch.long
    x_all = torch.cat([x for x, _ in seen])
    y_all = torch.cat([y for _, y in seen])
    assert torch.equal(y_all, x_all + 1)  # y is x shifted by one token
    assert torch.equal(x_all.flatten(), torch.arange(990))  # unshuffled: stream order, nothing skipped
    assert len(TokenBatches(list(range(1000)), seq_len=10, batch_size=8, drop_last=True)) == 12


def test_token_batches_order_is_a_function_of_seed_and_epoch() -> None:
    ids = torch.arange(2001)

    def epoch(b: TokenBatches, e: int | None = None) -> torch.Tensor:
        if e is not None:
            b.set_epoch(e)
        return torch.cat([x[:, 0] for x, _ in b])  # first token identifies the window

    a = TokenBatches(ids, seq_len=4, batch_size=16, shuffle=True, seed=7)
    b = TokenBatches(ids, seq_len=4, batch_size=16, shuffle=True, seed=7)
    a0 = epoch(a)
    assert torch.equal(epoch(a), a0)  # iterating again (a progress bar's second iter()) changes nothing
    a1 = epoch(a, 1)
    assert torch.equal(a0, epoch(b, 0)) and torch.equal(a1, epoch(b, 1))  # a fresh object replays the sequence
    assert not torch.equal(a0, a1)  # successive epochs differ
    assert sorted(a0.tolist()) == list(range(0, 2000, 4))  # each epoch visits every window once
    other_seed = TokenBatches(ids, seq_len=4, batch_size=16, shuffle=True, seed=8)
    assert not torch.equal(epoch(other_seed), a0)


# --- synthetic ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.8])
def test_synthetic_deterministic_fraction(fraction: float) -> None:
    ids = make_synthetic_corpus(40_000, 64, fraction, seed=1)
    rules = synthetic_rules(64, fraction, seed=1)
    assert ids.shape == (40_000,) and int(ids.min()) >= 0 and int(ids.max()) < 64
    easy = rules.determined_mask(ids)
    assert easy[1:].float().mean().item() == pytest.approx(fraction, abs=0.02)
    # Easy positions always hold the fixed successor of the previous token.
    assert torch.equal(ids[easy], rules.successor[ids[:-1]][easy[1:]])
    assert torch.equal(ids, make_synthetic_corpus(40_000, 64, fraction, seed=1))


def test_synthetic_hard_positions_are_spread() -> None:
    ids = make_synthetic_corpus(40_000, 64, 0.5, seed=2)
    rules = synthetic_rules(64, 0.5, seed=2)
    after_free = ids[1:][~rules.trigger_mask[ids[:-1]]]
    # Random draws: heads with prob 0.5 (16 heads), free tokens otherwise; no single token dominates.
    assert len(torch.unique(after_free)) > 30
    assert torch.bincount(after_free).max().item() / len(after_free) < 0.1
    assert not torch.equal(ids, make_synthetic_corpus(40_000, 64, 0.5, seed=3))


def test_build_data_synthetic() -> None:
    cfg = DataConfig(name="synthetic", synthetic_tokens=5000, seq_len=16, batch_size=4)
    data = build_data(cfg, seed=0)
    assert data.source == "synthetic" and data.vocab_size == 64 and data.test is None
    assert (data.num_train_tokens, data.num_val_tokens) == (4500, 500)
    assert [x.tolist() for x, _ in data.val] == [x.tolist() for x, _ in data.val]  # val is never shuffled
    x, _ = next(iter(data.train))
    assert data.tokenizer.decode(x[0, :2].tolist()).startswith("t")


def test_build_data_fits_tokenizer_on_train_text_only(tmp_path: Path) -> None:
    train = "alpha beta gamma\n" * 300
    val = "omega omega omega\n" * 30
    _write_splits(tmp_path, valid=train + val, test="alpha omega\n" * 20)
    cfg = DataConfig(data_dir=str(tmp_path), max_chars=None, seq_len=8, batch_size=4, val_fraction=0.1)
    data = build_data(cfg)
    assert "omega" not in data.tokenizer.vocab  # only seen in the val part
    assert data.vocab_size == 5  # <unk> alpha beta gamma <eos>: shrunk below data.vocab_size=1000
    val_ids = torch.cat([x for x, _ in data.val])
    assert (val_ids == 0).float().mean().item() > 0.5
    assert data.test is not None and data.test.num_tokens > 0  # test file exists and is not the source


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"vocab_size": 1}, "data.vocab_size"),
        ({"vocab_size": True}, "data.vocab_size"),
        ({"tokenizer": "bpe", "vocab_size": 100}, "data.vocab_size"),
        ({"seq_len": 0}, "data.seq_len"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"tokenizer": "sentencepiece"}, "data.tokenizer"),
        ({"name": "ptb"}, "data.name"),
        ({"split": "dev"}, "data.split"),
        ({"fallback_splits": ["valid", "dev"]}, "data.fallback_splits"),
        ({"max_chars": 0}, "data.max_chars"),
        ({"synthetic_deterministic_fraction": 1.0}, "data.synthetic_deterministic_fraction"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: ") as err:
        DataConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_config_accepts_hydra_lists() -> None:
    assert DataConfig(fallback_splits=["test"]).fallback_splits == ("test",)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    _write_splits(tmp_path, train=" \n\n  \n")
    with pytest.raises(ValueError, match=r"^data\.data_dir: .*wiki\.train\.tokens is empty$"):
        load_wikitext_text(tmp_path)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.tokens").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"^data\.data_dir: .*wiki\.train\.tokens is not valid UTF-8") as err:
        load_wikitext_text(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_dir_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: None) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"^data\.data_dir: ") as err:
        load_wikitext_text(missing)
    assert str(missing) in str(err.value) and "EASE_DATA_DIR" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("EASE_DATA_DIR", str(missing))
    with pytest.raises(ValueError, match="nowhere"):
        build_data(DataConfig())


def test_missing_split_without_fallback_lists_files(tmp_path: Path) -> None:
    _write_splits(tmp_path, test="a b c\n")
    with pytest.raises(ValueError, match=r"^data\.split: .*wiki\.test\.tokens$"):
        load_wikitext_text(tmp_path, split="train", fallback_splits=("valid",))


def test_seq_len_longer_than_data() -> None:
    with pytest.raises(ValueError, match=r"^data\.seq_len: 10 .*longer than the data \(10 tokens\)$"):
        TokenBatches(list(range(10)), seq_len=10, batch_size=1)


def test_seq_len_longer_than_val_split(tmp_path: Path) -> None:
    _write_splits(tmp_path, train="a b c d e f g h i j\n" * 20)
    cfg = DataConfig(data_dir=str(tmp_path), seq_len=30, batch_size=2, val_fraction=0.1)
    with pytest.raises(ValueError, match=r"^data\.seq_len: .*val split"):
        build_data(cfg)


def test_unknown_tokenizer_kind() -> None:
    with pytest.raises(ValueError, match=r"^data\.tokenizer: must be one of word, char, bpe, hf, got 'sp'$"):
        build_tokenizer("sp", 100, "a b c")
