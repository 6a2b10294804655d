"""`model=hf` through train.py: every preset and strategy, a sweep, a local pretrained folder with its own
tokenizer, hf/ beside checkpoint.pt, task=eval / task=generate on the result, resume, ASHEM on pretrained layers."""

import json
from pathlib import Path

import pytest
import torch
from conftest import WIKITEXT_DIR, strip_timing, train_py
from hf_models import save_tiny
from killswitch import kill_after

transformers = pytest.importorskip("transformers")

from ease.checkpoint import load_checkpoint  # noqa: E402

SYNTHETIC = ["data=synthetic", "data.synthetic_tokens=4000", "train.max_epochs=1", "progress=false"]
PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "preset").glob("*.yaml"))


def metrics(run: Path) -> dict:
    record = json.loads((run / "metrics.json").read_text())
    assert record["status"] == "ok", record["error"]
    return record["metrics"]


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A "pretrained" Llama folder: its tokenizer trained on WikiText-2 valid text, model and tokenizer saved."""
    text = (WIKITEXT_DIR / "wiki.valid.tokens").read_text(encoding="utf-8")[:60_000]
    return save_tiny(tmp_path_factory.mktemp("hf") / "llama", "llama", text, layers=4, dim=32)


def wiki(pretrained: Path) -> list[str]:
    return [
        "model=hf", f"model.name_or_path={pretrained}", "data.tokenizer=hf", f"data.data_dir={WIKITEXT_DIR}",
        "data.split=valid", "data.max_chars=20000", "data.seq_len=32", "train.max_epochs=1", "progress=false",
    ]  # fmt: skip


def test_every_preset_runs_on_an_hf_backbone(tmp_path) -> None:
    proc = train_py(
        "-m", f"+preset={','.join(PRESETS)}", "model=hf_tiny_llama", *SYNTHETIC, f"hydra.sweep.dir={tmp_path}"
    )
    ok(proc)
    runs = sorted(tmp_path.glob("[0-9]*/metrics.json"))
    assert len(runs) == len(PRESETS)
    for path in runs:
        # hf/ holds a plain HF model; a Mixture-of-Depths model (routers beside it) lives in checkpoint.pt only
        mod = "+preset=mod" in json.loads(path.read_text())["overrides"]
        assert metrics(path.parent)["ppl"] > 1 and (path.parent / "hf" / "model.safetensors").is_file() != mod


@pytest.mark.slow  # the logit-equality tests cover every architecture; this is the end-to-end run
@pytest.mark.parametrize("model", ["hf_tiny_qwen2", "hf_tiny_mistral", "hf_tiny_gpt2"])
def test_other_architectures_train_with_deed(tmp_path, model) -> None:
    ok(train_py("+preset=deed", f"model={model}", *SYNTHETIC, f"hydra.run.dir={tmp_path}"))
    assert metrics(tmp_path)["per_exit"]["1"]["ppl"] > 1


@pytest.mark.slow
def test_optuna_sweep_on_an_hf_backbone(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = train_py(
        "-m", "+sweep=alpha_optuna", "model=hf_tiny_qwen2", *SYNTHETIC, "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    ok(proc)
    assert len(list((tmp_path / "sweep").glob("[0-9]*/metrics.json"))) == 2


def test_pretrained_folder_train_save_eval_generate(tmp_path, pretrained) -> None:
    run = tmp_path / "run"
    ok(train_py("+preset=deed", *wiki(pretrained), f"hydra.run.dir={run}"))
    m = metrics(run)
    tok = transformers.AutoTokenizer.from_pretrained(str(pretrained))
    assert m["vocab_size"] == len(tok)

    # hf/ is plain save_pretrained: transformers loads it alone, to the checkpoint's logits, with its tokenizer.
    model, _ = load_checkpoint(run / "checkpoint.pt")
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf")).eval()
    x = torch.tensor([tok.encode(" the game was", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.equal(plain(x).logits, model.eval()(x))
    assert transformers.AutoTokenizer.from_pretrained(str(run / "hf")).encode(" the game") == tok.encode(" the game")
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["ease_exit"] == {"exit_layers": [1], "routing_thresholds": [0.7], "confidence": "max_prob"}

    ok(train_py("task=eval", f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'eval'}"))
    evaluated = metrics(tmp_path / "eval")
    assert evaluated["ppl"] == pytest.approx(m["ppl"], rel=1e-6)

    proc = train_py("task=generate", f"checkpoint={run}", "prompt=The game", "task.max_new_tokens=8",
                    f"hydra.run.dir={tmp_path / 'gen'}")  # fmt: skip
    ok(proc)
    generated = metrics(tmp_path / "gen")
    assert len(generated["exit_layers"][0]) == 8 and set(generated["exit_layers"][0]) <= {1, 4}


def test_tokenizer_that_does_not_fit_the_embedding_is_one_line(tmp_path, pretrained) -> None:
    args = [a for a in wiki(pretrained) if a != "data.tokenizer=hf"] + ["data.tokenizer=word", "data.vocab_size=2000"]
    proc = train_py(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "data.tokenizer: its" in proc.stderr and "do not fit the model's embedding of" in proc.stderr


def test_ashem_on_pretrained_layers_keeps_them_frozen(tmp_path, pretrained) -> None:
    args = [*wiki(pretrained), "+preset=ashem", "strategy.phase1=skip", "strategy.phase1_layers=2",
            "strategy.phase2_layers=4", "train.max_epochs=2"]  # fmt: skip
    ok(train_py(*args, f"hydra.run.dir={tmp_path}"))
    m = metrics(tmp_path)
    s = m["strategy"]
    assert s["frozen_params_unchanged"] is True and s["phase1"]["skipped"] is True
    model, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    original = transformers.AutoModelForCausalLM.from_pretrained(str(pretrained))
    trained = model.hf.state_dict()
    for key, value in original.state_dict().items():
        frozen = not key.startswith("model.layers.") or int(key.split(".")[2]) < 2
        assert torch.equal(trained[key], value) == frozen, key


def test_ashem_growth_on_an_hf_backbone(tmp_path) -> None:
    ok(train_py("+preset=ashem", "model=hf_tiny_gpt2", *SYNTHETIC, f"hydra.run.dir={tmp_path}"))
    s = metrics(tmp_path)["strategy"]
    assert s["frozen_params_unchanged"] is True and s["phase1"]["epochs_run"] == 1


@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path) -> None:
    args = ["+preset=deed", "model=hf_tiny_llama", *SYNTHETIC, "train.max_epochs=3", "train.patience=5"]
    ok(train_py(*args, f"hydra.run.dir={tmp_path / 'full'}"))
    killed = tmp_path / "killed"
    assert train_py(*args, *kill_after(2), f"hydra.run.dir={killed}").returncode != 0
    ok(train_py(*args, "resume=true", f"hydra.run.dir={killed}"))
    assert strip_timing(metrics(killed)) == strip_timing(metrics(tmp_path / "full"))
