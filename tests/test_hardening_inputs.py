"""Bounded generation inputs, tokenizer/data mismatches and text-free data files fail (or warn) with one line.

- a 100,000-character prompt keeps the last context tokens (the checkpoint's data.seq_len), with a warning, in
  seconds; `max_new_tokens` above the cap (4096, or a Hugging Face backbone's positions) is refused;
- a prompt that is mostly `<unk>` is warned about; words for a synthetic checkpoint are refused, naming `prompt`;
- task=eval with task.checkpoint_data=false refuses data the checkpoint's tokenizer cannot read, synthetic data
  for a word tokenizer, and data whose evaluated tokens are more than half `<unk>`;
- a data file of NUL bytes names the file ("holds no text"), not data.val_fraction.
"""

import json
import logging
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, train_py

from ease.app.runner import run
from ease.checkpoint import load_checkpoint, save_checkpoint
from ease.data import DataConfig, SyntheticTokenizer, WordTokenizer, build_data, load_wikitext_text, tokenizer_from_dict
from ease.inference.generation import MAX_NEW_TOKENS, SamplingConfig, generate
from ease.model import EarlyExitTransformer

LONG = 100_000  # characters in the long prompt
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "park", "where", "it", "was", "again"]


def word_text(n_words: int, vocab: list[str], seed: int = 0) -> str:
    rng = random.Random(seed)
    words = [rng.choice(vocab) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 12]) for i in range(0, n_words, 12)) + "\n"


@pytest.fixture(scope="module")
def syn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on synthetic data (seq_len 32, synthetic tokenizer of 64 ids)."""
    out = tmp_path_factory.mktemp("syn_run")
    assert run(compose([*FAST, "data.seq_len=32"]), out)["status"] == "ok"
    return out


@pytest.fixture(scope="module")
def word_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on a small English-like text with the word tokenizer (seq_len 16)."""
    data = tmp_path_factory.mktemp("words")
    (data / "wiki.train.tokens").write_text(word_text(6000, WORDS))
    out = tmp_path_factory.mktemp("word_run")
    overrides = ["model=tiny", f"data.data_dir={data}", "data.seq_len=16", "train.max_epochs=1", "progress=false"]
    assert run(compose(overrides), out)["status"] == "ok"
    return out


def long_synthetic_prompt(chars: int = LONG) -> str:
    rng = random.Random(0)
    text = ""
    while len(text) < chars:
        text += " ".join(f"t{rng.randrange(64)}" for _ in range(1000)) + " "
    return text[:chars].rsplit(" ", 1)[0]


# --- generate: the prompt is cut to the context, new tokens are capped ----------------------------------------


def test_long_prompt_is_left_truncated_in_seconds(syn_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, ckpt = load_checkpoint(syn_run / "checkpoint.pt")
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    prompt = long_synthetic_prompt()
    assert len(prompt) > LONG - 10
    caplog.set_level(logging.WARNING, logger="ease")
    start = time.perf_counter()
    result = generate(model, tokenizer, prompt, 12, max_context=ckpt["config"]["data"]["seq_len"])
    assert time.perf_counter() - start < 10
    assert len(result.token_ids[0]) == 12 and result.settings["prompt_tokens"] == 32
    n_tokens = len(prompt.split())
    assert f"dropped its first {n_tokens - 32} tokens, kept the last 32 tokens" in caplog.text
    # the kept tokens are the prompt's last 32
    assert result.texts[0].startswith(" ".join(prompt.split()[-32:]))


def test_library_default_context_bounds_a_huge_prompt(syn_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, ckpt = load_checkpoint(syn_run / "checkpoint.pt")
    caplog.set_level(logging.WARNING, logger="ease")
    start = time.perf_counter()
    result = generate(model, tokenizer_from_dict(ckpt["tokenizer"]), "t1 " * 400_000, 4, compare_full_depth=False)
    assert time.perf_counter() - start < 20
    assert result.settings["prompt_tokens"] == result.settings["max_prompt_tokens"] == 1024  # DEFAULT_MAX_CONTEXT
    assert "characters (not encoded)" in caplog.text  # only the tail was tokenized


def test_generate_task_truncates_a_long_prompt_to_the_checkpoints_seq_len(syn_run: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    proc = train_py(
        "task=generate", f"checkpoint={syn_run}", f"prompt={long_synthetic_prompt()}", "task.max_new_tokens=10",
        f"hydra.run.dir={tmp_path}", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.perf_counter() - start < 60
    log_lines = (proc.stdout + proc.stderr).splitlines()  # Hydra logs to stdout, errors go to stderr
    warning = [line for line in log_lines if "longer than the context allows (32 tokens)" in line]
    assert len(warning) == 1 and "dropped its first" in warning[0]
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert m["settings"]["prompt_tokens"] == 32 and len(m["token_ids"][0]) == 10


def test_max_new_tokens_above_the_cap_is_refused(syn_run: Path, tmp_path: Path) -> None:
    assert MAX_NEW_TOKENS == 4096
    SamplingConfig(max_new_tokens=MAX_NEW_TOKENS)  # the cap itself is allowed
    with pytest.raises(ValueError, match=r"^max_new_tokens: must be <= 4096 \(the generation cap\), got 4097$"):
        SamplingConfig(max_new_tokens=4097)
    cfg = compose(["task=generate", f"checkpoint={syn_run}", "prompt=t1 t2", "task.max_new_tokens=100000"])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^task\.max_new_tokens: must be <= 4096") as err:
        run(cfg, tmp_path)
    assert "\n" not in str(err.value) and time.perf_counter() - start < 10


def test_hf_backbone_context_is_its_position_limit(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("transformers")
    from ease import hf

    tokenizer = WordTokenizer.fit(word_text(200, WORDS), 30)
    model = hf.from_config("gpt2", vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    caplog.set_level(logging.WARNING, logger="ease")
    result = generate(model.eval(), tokenizer, word_text(300, WORDS), 10, max_context=64, compare_full_depth=False)
    assert result.settings["prompt_tokens"] == 22  # prompt + new tokens fit the 32 learned positions
    assert "longer than the context allows (22 tokens)" in caplog.text
    with pytest.raises(ValueError, match=r"^max_new_tokens: must be <= 31 for this backbone \(32 positions"):
        generate(model, tokenizer, "the cat", 32)


# --- generate: prompts the tokenizer cannot read, or mostly does not know -------------------------------------


def test_unknown_word_prompt_is_warned_about(word_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, ckpt = load_checkpoint(word_run / "checkpoint.pt")
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    caplog.set_level(logging.WARNING, logger="ease")
    generate(model, tokenizer, "the cat sat", 3, compare_full_depth=False)
    assert "<unk>" not in caplog.text
    result = generate(model, tokenizer, "zebra quokka axolotl the", 3, compare_full_depth=False)
    assert len(result.token_ids[0]) == 3
    assert "prompt: 3 of its 4 tokens are <unk> (unknown to the word tokenizer)" in caplog.text


def test_words_for_a_synthetic_checkpoint_are_one_line(syn_run: Path, tmp_path: Path) -> None:
    model, ckpt = load_checkpoint(syn_run / "checkpoint.pt")
    message = r"^prompt: the model's tokenizer is synthetic \(tokens look like t0 t1 \.\.\. t63\), got '1'$"
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer_from_dict(ckpt["tokenizer"]), "1 2 3", 4)
    with pytest.raises(ValueError, match=r"got 't64'$"):  # an id beyond the vocabulary is the same mistake
        generate(model, tokenizer_from_dict(ckpt["tokenizer"]), "t1 t64", 4)
    proc = train_py("task=generate", f"checkpoint={syn_run}", "prompt=1 2 3", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: prompt: the model's tokenizer is synthetic (tokens look like t0 t1 ... t63), got '1'" in proc.stderr


# --- eval with task.checkpoint_data=false: data that does not fit the checkpoint's tokenizer ------------------


def eval_error(checkpoint: Path, out: Path, *overrides: str) -> str:
    cfg = compose(["task=eval", f"checkpoint={checkpoint}", "task.checkpoint_data=false", *overrides])
    with pytest.raises(ValueError) as err:
        run(cfg, out)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_eval_text_for_a_synthetic_checkpoint_is_refused(syn_run: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wiki.train.tokens").write_text(word_text(3000, WORDS))
    first = word_text(3000, WORDS).split()[0]
    message = eval_error(
        syn_run, tmp_path / "out", "model=tiny", "data=wikitext2", f"data.data_dir={tmp_path / 'data'}"
    )
    assert message == (
        "task.checkpoint_data: data 'wikitext2' does not fit the checkpoint's synthetic tokenizer "
        f"(tokens look like t0 t1 ... t63), got {first!r}"
    )


def test_eval_synthetic_data_for_a_word_checkpoint_is_refused(word_run: Path, syn_run: Path, tmp_path: Path) -> None:
    message = eval_error(word_run, tmp_path / "a", "model=tiny", "data=synthetic", "data.seq_len=16")
    expected = "task.checkpoint_data: synthetic data needs a synthetic tokenizer, but the checkpoint's tokenizer is"
    assert message == f"{expected} word"
    message = eval_error(syn_run, tmp_path / "b", *FAST, "data.synthetic_vocab_size=128")
    assert message == (
        "task.checkpoint_data: data.synthetic_vocab_size=128 is more than the checkpoint's synthetic tokenizer's 64 ids"
    )


def test_eval_data_of_unknown_words_is_refused(word_run: Path, tmp_path: Path) -> None:
    other = [w + "zz" for w in WORDS]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wiki.train.tokens").write_text(word_text(3000, other))
    overrides = ["model=tiny", f"data.data_dir={tmp_path / 'data'}", "data.seq_len=16"]
    message = eval_error(word_run, tmp_path / "out", *overrides)
    assert message.startswith("task.checkpoint_data: ") and "% of the val tokens are <unk>" in message
    assert message.endswith("the data does not match the checkpoint's tokenizer")
    # the same words the checkpoint was trained on evaluate fine
    (tmp_path / "data" / "wiki.train.tokens").write_text(word_text(3000, WORDS, seed=1))
    cfg = compose(["task=eval", f"checkpoint={word_run}", "task.checkpoint_data=false", *overrides])
    assert run(cfg, tmp_path / "ok")["status"] == "ok"


# --- data files that hold no text -----------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"\x00" * 5000, b"\x00\x00 \n\x00\t\n" * 100])
def test_nul_bytes_data_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "wiki.train.tokens"
    path.write_bytes(content)
    message = rf"^data\.data_dir: {path} holds no text \(only NUL bytes / whitespace\)$"
    with pytest.raises(ValueError, match=message):
        load_wikitext_text(tmp_path)
    with pytest.raises(ValueError, match=message):
        build_data(DataConfig(data_dir=str(tmp_path)))


def test_nul_bytes_test_file_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "wiki.train.tokens").write_text(word_text(3000, WORDS))
    (tmp_path / "wiki.test.tokens").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"wiki\.test\.tokens holds no text"):
        build_data(DataConfig(data_dir=str(tmp_path), seq_len=16))


def test_checkpoint_without_a_config_uses_the_default_context(tmp_path: Path) -> None:
    """A checkpoint saved without its training config (no data.seq_len) still generates, bounded by 1024."""
    tok = SyntheticTokenizer(8)
    assert tok.encode(tok.decode([0, 7, 3])) == [0, 7, 3]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", EarlyExitTransformer(8, 16, 2, num_heads=2), tok.to_dict())
    cfg = compose(["task=generate", f"checkpoint={tmp_path / 'ckpt'}", "prompt=t1 t2", "task.max_new_tokens=3"])
    m = run(cfg, tmp_path / "out")["metrics"]
    assert m["settings"]["max_prompt_tokens"] == 1024 and len(m["token_ids"][0]) == 3
