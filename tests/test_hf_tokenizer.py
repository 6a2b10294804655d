"""Tests for data.tokenizer=hf: a pretrained Hugging Face tokenizer, built locally here (no network)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the hub

transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")

from ease.data import DataConfig, build_data, build_tokenizer, tokenizer_from_dict  # noqa: E402
from ease.data.tokenizers import HFTokenizer, Tokenizer  # noqa: E402

TRAIN_LINES = [
    "The cat sat on the mat .\n",
    " = = Heading = = \n",
    "The dog ate the cat 's dinner , and the cat was not pleased .\n",
    "Hello world , this is the end of the little corpus .\n",
]
TEXT = "The cat sat .\n The dog , the mat ; schön 東京 <unk> !\n"
NO_PATH = "data.tokenizer_path: tokenizer=hf needs data.tokenizer_path=DIR (or model=hf with model.name_or_path)"


def _backend(vocab_size: int = 300):
    """A small byte-level BPE trained on TRAIN_LINES with three special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAIN_LINES, trainer=trainer)
    return backend


@pytest.fixture
def backend():
    return _backend()


@pytest.fixture
def tok_dir(tmp_path: Path, backend) -> Path:
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_tokens(["<extra_added>"])  # an added token: counted by len(tokenizer), not by the backend's vocab
    folder = tmp_path / "tok"
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture
def wiki_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "wiki.valid.tokens").write_text("".join(TRAIN_LINES) * 40, encoding="utf-8")
    (folder / "wiki.test.tokens").write_text("".join(reversed(TRAIN_LINES)) * 10, encoding="utf-8")
    return folder


def test_encode_decode_and_vocab(tok_dir: Path, backend) -> None:
    tok = HFTokenizer.load(tok_dir)
    reference = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(reference) == backend.get_vocab_size() + 1  # the added token counts
    assert tok.encode(TEXT) == backend.encode(TEXT, add_special_tokens=False).ids
    assert len(tok.encode(TEXT)) > 0
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_token_id == backend.token_to_id("</s>") == 2
    # Special and added tokens decode as themselves (no skipping), and ids stay below vocab_size.
    added = tok.encode("a <extra_added> b")
    assert tok.vocab_size - 1 in added
    assert tok.decode([1, *tok.encode("cat"), 2]) == "<s>cat</s>"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_decode_does_no_spacing_clean_up(tmp_path: Path) -> None:
    """A WordPiece tokenizer configured with clean_up_tokenization_spaces=True still decodes " ." as is."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.WordPiece({"[UNK]": 0, "a": 1, "b": 2, ".": 3, ",": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(cleanup=False)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True
    )
    fast.save_pretrained(str(tmp_path / "wp"))
    tok = HFTokenizer.load(tmp_path / "wp")
    ids = tok.encode("a . b , a")
    assert ids == [1, 3, 2, 4, 1]
    assert tok.tokenizer.decode(ids) == "a. b, a"  # what the plain HF call would give
    assert tok.decode(ids) == "a . b , a"


def test_encode_adds_no_special_tokens_per_call(tok_dir: Path) -> None:
    tok = HFTokenizer.load(tok_dir)
    tok.tokenizer.add_bos_token = True  # even a tokenizer that would prepend BOS gets none from encode
    first, second = "The cat sat on", " the mat ."
    assert tok.encode(first) + tok.encode(second) == tok.encode(first + second)
    assert 1 not in tok.encode(first + second)


def test_to_dict_is_json_and_restores_identical_tokenizer(tok_dir: Path) -> None:
    tok = HFTokenizer.load(tok_dir)
    state = tok.to_dict()
    assert state["kind"] == "hf"
    assert "tokenizer.json" in state["files"] and all(isinstance(v, str) for v in state["files"].values())
    restored = tokenizer_from_dict(json.loads(json.dumps(state)))
    assert isinstance(restored, HFTokenizer)
    assert restored.vocab_size == tok.vocab_size
    assert restored.encode(TEXT) == tok.encode(TEXT)
    assert restored.encode("a <extra_added> b") == tok.encode("a <extra_added> b")
    assert restored.eos_token_id == tok.eos_token_id
    assert restored.to_dict() == state  # stable through a second round trip


def test_to_dict_survives_torch_weights_only_load(tok_dir: Path, tmp_path: Path) -> None:
    tok = HFTokenizer.load(tok_dir)
    path = tmp_path / "ckpt.pt"
    torch.save({"tokenizer": tok.to_dict(), "weights": torch.zeros(2)}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["tokenizer"] == tok.to_dict()
    assert tokenizer_from_dict(ckpt["tokenizer"]).encode(TEXT) == tok.encode(TEXT)


def test_from_dict_rejects_file_names_outside_its_folder() -> None:
    with pytest.raises(ValueError, match="bad file entry"):
        HFTokenizer.from_dict({"kind": "hf", "files": {"../evil.json": "{}"}})
    with pytest.raises(ValueError, match="non-empty"):
        HFTokenizer.from_dict({"kind": "hf", "files": {}})


def test_save_pretrained_writes_a_loadable_folder(tok_dir: Path, tmp_path: Path) -> None:
    tok = HFTokenizer.load(tok_dir)
    out = tmp_path / "beside_model"
    written = tok.save_pretrained(out)
    assert any(Path(p).name == "tokenizer.json" for p in written)
    assert HFTokenizer.load(out).encode(TEXT) == tok.encode(TEXT)


def test_build_data_with_hf_tokenizer(tok_dir: Path, wiki_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = DataConfig(
        data_dir=str(wiki_dir), tokenizer="hf", tokenizer_path=tok_dir, vocab_size=5000, seq_len=16, batch_size=4
    )
    assert cfg.tokenizer_path == str(tok_dir)  # a Path is accepted as its str
    with caplog.at_level("WARNING", logger="ease.data"):
        data = build_data(cfg, seed=0)
    assert "fewer than data.vocab_size" not in caplog.text  # vocab_size is ignored for hf
    tok = HFTokenizer.load(tok_dir)
    assert isinstance(data.tokenizer, HFTokenizer)
    assert data.vocab_size == tok.vocab_size == len(transformers.AutoTokenizer.from_pretrained(str(tok_dir)))
    assert data.num_train_tokens > 100 and data.num_val_tokens > 10
    ids = torch.cat([x for x, _ in data.train] + [x for x, _ in data.val] + [x for x, _ in data.test])
    assert int(ids.min()) >= 0 and int(ids.max()) < data.vocab_size
    assert data.test is not None
    # The train stream is the plain encode of the text (no special tokens inserted).
    x, y = next(iter(data.val))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert tok.eos_token_id not in ids.tolist()


def test_build_tokenizer_routes_hf_to_load(tok_dir: Path) -> None:
    tok = build_tokenizer("hf", 2, "ignored text", path=tok_dir)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size > 2


def test_missing_folder_names_tokenizer_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(ValueError, match=r"^data\.tokenizer_path: .*no_such_tokenizer"):
        HFTokenizer.load(missing)
    with pytest.raises(ValueError, match=r"^data\.tokenizer_path: "):
        build_tokenizer("hf", 100, "", path=str(missing))


def test_unloadable_folder_is_one_line_value_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a tokenizer", encoding="utf-8")
    with pytest.raises(ValueError, match=r"^data\.tokenizer_path: cannot load") as info:
        HFTokenizer.load(empty)
    assert "\n" not in str(info.value)


def test_null_path_is_the_documented_error(wiki_dir: Path) -> None:
    cfg = DataConfig(data_dir=str(wiki_dir), tokenizer="hf")  # allowed: the app fills it from the model
    assert cfg.tokenizer_path is None
    with pytest.raises(ValueError) as info:
        build_data(cfg)
    assert str(info.value) == NO_PATH
    with pytest.raises(ValueError) as info:
        build_tokenizer("hf", 100, "text")
    assert str(info.value) == NO_PATH


@pytest.mark.parametrize("bad", [3, "", "   ", ["a"]])
def test_tokenizer_path_must_be_a_string(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^data\.tokenizer_path: must be"):
        DataConfig(tokenizer="hf", tokenizer_path=bad)


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch, tok_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match=r"^data\.tokenizer=hf needs transformers: pip install -e '\.\[hf\]'$"):
        HFTokenizer.load(tok_dir)
