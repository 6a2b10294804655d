"""generate(): greedy and sampled text, seeded determinism, what it reports, and `train.py task=generate`."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import compose, train_py

from ease import EarlyExitTransformer
from ease.app.runner import run
from ease.checkpoint import load_checkpoint, save_checkpoint
from ease.data import WordTokenizer
from ease.inference.fused import FusedDecoder as EarlyExitDecoder
from ease.inference.generation import SamplingConfig, decode, generate, sample_next

TEXT = "the cat sat on the mat and the dog ran to the park where the cat sat again\n" * 4


@pytest.fixture
def tokenizer() -> WordTokenizer:
    return WordTokenizer.fit(TEXT, 40)


@pytest.fixture
def model(tokenizer: WordTokenizer) -> EarlyExitTransformer:
    torch.manual_seed(0)
    return EarlyExitTransformer(tokenizer.vocab_size, 32, 3, num_heads=4).eval()


@pytest.fixture
def peaky(model: EarlyExitTransformer) -> EarlyExitTransformer:
    with torch.no_grad():
        model.output_head.weight.mul_(40.0)  # confident enough that some tokens exit at layer 1
    return model


def test_greedy_full_depth_equals_plain_greedy_loop(model, tokenizer) -> None:
    result = generate(model, tokenizer, "the cat sat", 12, routing_threshold=0.0, compare_full_depth=False)
    ids = torch.tensor([tokenizer.encode("the cat sat")])
    with torch.no_grad():
        for _ in range(12):  # no cache, no exits: the whole prefix through the model every step
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert result.token_ids[0] == ids[0, 3:].tolist()
    assert result.exit_layers == [[3] * 12]
    assert result.text == tokenizer.decode(ids[0].tolist())
    assert result.continuations[0] == tokenizer.decode(ids[0, 3:].tolist())


def test_greedy_with_exits_follows_the_decoder(peaky, tokenizer) -> None:
    result = generate(peaky, tokenizer, "the dog", 15, exit_layer=1, routing_threshold=0.5)
    dec = EarlyExitDecoder(peaky, 1, 17, exit_layer=1, routing_threshold=0.5)
    prompt = tokenizer.encode("the dog")
    dec.prefill(torch.tensor([prompt[:-1]]))
    token, ids, exits = torch.tensor(prompt[-1:]), [], []
    for _ in range(15):
        out = dec.step(token)
        token = out.logits.argmax(-1)
        ids.append(int(token))
        exits.append(int(out.exit_layer))
    assert result.token_ids[0] == ids and result.exit_layers[0] == exits
    assert 0 < sum(e == 1 for e in exits) < 15  # both paths taken
    mean = sum(exits) / 15
    assert result.mean_layers_per_token == pytest.approx(mean)
    assert result.compute_cost == pytest.approx(mean / 3)
    assert result.theoretical_speedup == pytest.approx(3 / mean)
    assert result.speedup == pytest.approx(result.tokens_per_s / result.full_depth_tokens_per_s)
    assert result.speedup_over_theoretical == pytest.approx(result.speedup / result.theoretical_speedup)
    assert result.settings["layer_tokens"] + result.settings["kv_tokens"] == 15 * 3


@pytest.mark.parametrize("kv_mode", ["propagate", "recompute"])
def test_sampling_is_deterministic_under_a_seed(model, tokenizer, kv_mode) -> None:
    kwargs = {"temperature": 1.0, "top_k": 10, "batch_size": 3, "kv_mode": kv_mode, "routing_threshold": 0.05}
    a = generate(model, tokenizer, "the cat", 20, seed=7, **kwargs)
    b = generate(model, tokenizer, "the cat", 20, seed=7, **kwargs)
    c = generate(model, tokenizer, "the cat", 20, seed=8, **kwargs)
    assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers and a.texts == b.texts
    assert a.token_ids != c.token_ids
    assert len({tuple(row) for row in a.token_ids}) > 1  # rows of one batch sample independently


def test_sample_next() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0, None, None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1.0, 1, g).tolist() == [1, 0]  # top-1 sampling is greedy
    draws = torch.stack([sample_next(logits, 1.0, 2, g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}  # only the two most likely tokens of row 0
    # the sampled frequencies are the softmax probabilities (temperature 2: flatter)
    row = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    draws = torch.cat([sample_next(row.expand(500, -1), 2.0, None, g) for _ in range(8)])
    freq = torch.bincount(draws, minlength=4) / draws.numel()
    assert torch.allclose(freq, torch.softmax(row[0] / 2.0, -1), atol=0.02)


def test_prompts_and_settings_are_checked(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="same token length"):
        generate(model, tokenizer, ["the cat", "the cat sat"], 3)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tokenizer, "", 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=0)
    with pytest.raises(ValueError, match="kv_mode"):
        SamplingConfig(kv_mode="lazy")
    rows = generate(model, tokenizer, ["the cat", "the dog"], 4, compare_full_depth=False)
    assert len(rows.texts) == 2 and rows.texts[1].startswith("the dog")


# --- the app: train.py task=generate ---------------------------------------------------------------------


@pytest.fixture
def checkpoint(peaky, tokenizer, tmp_path: Path) -> Path:
    peaky.set_routing(1, 0.5)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(path, peaky, tokenizer.to_dict())
    return path


def test_generate_task_writes_text_exits_and_speed(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    overrides = ["task=generate", f"checkpoint={checkpoint.parent}", "prompt=the cat", "task.max_new_tokens=6"]
    record = run(compose([*overrides, "task.batch_size=2", "task.temperature=0.8", "seed=3"]), out)
    m = record["metrics"]
    assert record["status"] == "ok" and m["routing_source"] == "checkpoint"
    assert m["settings"]["exit_layers"] == [1] and m["settings"]["routing_thresholds"] == [0.5]
    assert len(m["token_ids"]) == 2 and all(len(row) == 6 for row in m["exit_layers"])
    assert m["tokens_per_s"] > 0 and m["speedup"] > 0
    assert "exit layers" in (out / "generated.txt").read_text()
    again = run(compose([*overrides, "task.batch_size=2", "task.temperature=0.8", "seed=3"]), tmp_path / "again")
    assert again["metrics"]["token_ids"] == m["token_ids"]  # seeded
    routed = run(compose([*overrides, "routing=confidence", "routing.threshold=0.9"]), tmp_path / "routed")
    assert routed["metrics"]["routing_source"] == "config"
    assert routed["metrics"]["settings"]["routing_thresholds"] == [0.9]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompt=the cat", "task.kv_mode=lazy"], "task.kv_mode"),
        (["prompt=the cat", "task.max_new_tokens=0"], "task.max_new_tokens"),
        ([], "prompt"),
    ],
)
def test_generate_task_errors_name_the_key(checkpoint: Path, tmp_path: Path, overrides, message) -> None:
    cfg = compose(["task=generate", f"checkpoint={checkpoint}", *overrides])
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_generate_task_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        run(compose(["task=generate", "prompt=the cat", f"checkpoint={tmp_path / 'missing.pt'}"]), tmp_path)


def test_train_py_generate_subprocess(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    proc = train_py(
        "task=generate", f"checkpoint={checkpoint}", "prompt=the dog ran", "task.max_new_tokens=5",
        f"hydra.run.dir={out}", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("the dog ran")
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "ok" and len(record["metrics"]["token_ids"][0]) == 5


@pytest.mark.slow
def test_generate_from_a_deed_training_run(tmp_path: Path) -> None:
    """The issue's 'done when': train with +preset=deed, then generate from its checkpoint."""
    train_dir, gen_dir = tmp_path / "train", tmp_path / "gen"
    proc = train_py(
        "+preset=deed", "model=tiny", "data=synthetic", "train.max_epochs=1", "progress=false",
        f"hydra.run.dir={train_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = train_py(
        "task=generate", f"checkpoint={train_dir}", "prompt=t1 t2 t3", "task.max_new_tokens=8",
        f"hydra.run.dir={gen_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((gen_dir / "metrics.json").read_text())["metrics"]
    assert metrics["settings"]["routing_thresholds"] == [0.7]
    assert len(metrics["exit_layers"][0]) == 8


def test_speculative_generate_task_gives_the_full_depth_text(checkpoint: Path, tmp_path: Path) -> None:
    cfg = compose(["task=generate", f"checkpoint={checkpoint}", "prompt=the cat sat", "task.mode=speculative",
                   "task.num_speculations=3", "task.max_new_tokens=20"])  # fmt: skip
    m = run(cfg, tmp_path)["metrics"]
    assert m["exact_match"] is True and m["mode"] == "speculative"
    assert m["settings"]["draft_exit"] == 1  # the checkpoint's exit layer
    assert 0 <= m["acceptance"] <= 1 and len(m["token_ids"][0]) == 20
    assert m["speedup"] > 0 and m["predicted_speedup"] > 0
    assert math.isclose(m["speedup_over_predicted"], m["speedup"] / m["predicted_speedup"])
    # The same text as the library's full-depth greedy generation (routing off).
    model, ckpt = load_checkpoint(checkpoint)
    full = generate(model, WordTokenizer.from_dict(ckpt["tokenizer"]), "the cat sat", 20, routing_threshold=0.0)
    assert m["token_ids"] == full.token_ids and (tmp_path / "generated.txt").read_text().count("--- row") == 1


def test_speculative_generate_task_at_batch_4_keeps_per_row_lengths(checkpoint: Path, tmp_path: Path) -> None:
    """Sampled rows of one prompt diverge, so they accept differently and keep their own lengths."""
    cfg = compose(["task=generate", f"checkpoint={checkpoint}", "prompt=the cat sat", "task.mode=speculative",
                   "task.batch_size=4", "task.temperature=1.5", "task.max_new_tokens=16"])  # fmt: skip
    m = run(cfg, tmp_path)["metrics"]
    assert [len(t) for t in m["token_ids"]] == [16] * 4 and len(m["row_predicted_speedups"]) == 4
    assert min(m["row_predicted_speedups"]) >= m["predicted_speedup"] > 0  # the batch waits for its slowest row
    assert len(set(m["row_predicted_speedups"])) > 1  # (seeded) rows finished after different rounds


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.draft_exit=3"], r"^task\.draft_exit: must be an int in 1\.\.2 .*\(the model has 3 layers\)$"),
        (["task.num_speculations=0"], r"^task\.num_speculations: must be an int >= 1"),
        (["task.mode=fast"], r"^task\.mode: must be one of early_exit, speculative"),
        (["task.temperature=-1"], r"^task\.temperature"),
    ],
)
def test_speculative_settings_fail_in_one_line(checkpoint: Path, tmp_path: Path, overrides, message) -> None:
    cfg = ["task=generate", f"checkpoint={checkpoint}", "prompt=the cat", "task.mode=speculative", *overrides]
    with pytest.raises(ValueError, match=message):
        run(compose(cfg), tmp_path)


def test_decayed_threshold_is_calms_formula() -> None:
    from ease.routing import decayed_threshold

    for lam, t, n, tau in [(0.8, 0, 50, 4.0), (0.8, 25, 50, 4.0), (0.5, 50, 50, 1.0), (1.0, 0, 10, 0.0)]:
        assert math.isclose(decayed_threshold(lam, t, n, tau), min(1.0, 0.9 * lam + 0.1 * math.exp(-tau * t / n)))


@pytest.mark.parametrize("decoder", ["reference", "fused"])
def test_decaying_threshold_decodes_as_thresholds_set_step_by_step(model, decoder) -> None:
    """decode(threshold_decay=τ) against a plain loop that sets CALM's threshold itself before every step."""
    from ease.inference.decoder import EarlyExitDecoder as Reference

    with torch.no_grad():
        model.output_head.weight.mul_(10.0)  # layer-1 confidences around the thresholds: some tokens exit, not all
    peaky = model
    torch.manual_seed(0)
    prompt, n, lam, tau = torch.randint(0, peaky.vocab_size, (2, 5)), 24, 0.3, 6.0
    sampling = SamplingConfig(n, 0.0, None, 2, "propagate", decoder)
    got = decode(peaky, prompt, sampling, None, 1, lam, threshold_decay=tau)
    plain = Reference(peaky, 2, 5 + n, 1, lam)
    plain.prefill(prompt[:, :-1])
    token, tokens, exits = prompt[:, -1], [], []
    for t in range(n):
        plain.set_thresholds([min(1.0, 0.9 * lam + 0.1 * math.exp(-tau * t / n))])
        out = plain.step(token)
        token = out.logits.argmax(-1)
        tokens.append(token)
        exits.append(out.exit_layer)
    assert torch.equal(got.tokens, torch.stack(tokens, 1)) and torch.equal(got.exit_layers, torch.stack(exits, 1))
    fixed = decode(peaky, prompt, sampling, None, 1, lam)
    assert not torch.equal(fixed.exit_layers, got.exit_layers)  # the decay changed where tokens exit


def test_threshold_decay_in_generate_task_and_its_bad_value(checkpoint: Path, tmp_path: Path) -> None:
    args = ["task=generate", f"checkpoint={checkpoint}", "prompt=the cat", "task.max_new_tokens=6",
            "routing=confidence", "routing.exit_layer=1", "routing.threshold=0.5"]  # fmt: skip
    m = run(compose([*args, "routing.threshold_decay=4"]), tmp_path / "ok")["metrics"]
    assert m["settings"]["threshold_decay"] == 4.0
    with pytest.raises(ValueError, match=r"^routing\.threshold_decay: must be a finite number >= 0"):
        run(compose([*args, "routing.threshold_decay=-1"]), tmp_path / "bad")
