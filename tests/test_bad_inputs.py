"""The bad-input table: every kind of bad configuration, CLI and data input fails cleanly.

For each case, `python train.py ...` or `python -m ease.results ...` must exit non-zero with one clear line that
names what is wrong (and, for configuration, the key), print no traceback, and leave nothing under its output
folder that claims success. The cases run as subprocesses, a few at a time.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO

TINY_SYN = ["model=tiny", "data=synthetic", "data.synthetic_tokens=6000", "train.max_epochs=1", "progress=false"]


@dataclass
class Case:
    name: str
    args: list[str]
    expected: str  # must appear whole on one line of stderr
    module: str = "train"  # train | results
    setup: list[str] = field(default_factory=list)  # names of fixtures the case needs (see `materials`)


CASES = [
    # out-of-range numbers
    Case("threshold above 1", ["+preset=deed", *TINY_SYN, "routing.threshold=1.5"], "routing.threshold: must be in [0, 1]"),
    Case("negative alpha", ["+preset=asymmetric", *TINY_SYN, "loss_weights.alpha=-0.2"], "loss_weights.alpha: must be in [0, 1]"),
    Case("zero learning rate", [*TINY_SYN, "train.lr=0"], "train.lr: must be a finite number > 0, got 0"),
    Case("zero epochs", [*TINY_SYN, "train.max_epochs=0"], "train.max_epochs: must be an int >= 1, got 0"),
    Case("vocab below 2", ["data=wikitext2", "data.vocab_size=1"], "data.vocab_size: must be an int >= 2"),
    Case("heads do not divide dim", [*TINY_SYN, "model.num_heads=3"], "model.num_heads:"),
    Case("exit beyond the model", ["+preset=deed", *TINY_SYN, "routing.exit_layer=5"], "routing.exit_layer: must be in 1..2"),
    Case("hard ratio of 1", ["+preset=ashem", *TINY_SYN, "strategy.hard_example_ratio=1.0"], "strategy.hard_example_ratio: must be in (0, 1)"),
    Case("phase 2 not deeper", ["+preset=ashem", *TINY_SYN, "strategy.phase2_layers=2"], "strategy.phase2_layers:"),
    Case("custom weights of wrong length", [*TINY_SYN, "loss_weights=custom", "loss_weights.weights=[1,0]"], "loss_weights.weights: custom needs one weight per layer"),
    Case("all-zero weights", [*TINY_SYN, "loss_weights=custom", "loss_weights.weights=[0,0,0]"], "loss_weights: at least one weight must be > 0"),
    # unknown options, keys and types
    Case("unknown model option", ["model=huge"], "model: unknown option 'huge'; available: ashem, hf, hf_tiny_gpt2, hf_tiny_llama, hf_tiny_mistral, hf_tiny_qwen2, small, tiny"),
    Case("unknown preset", ["+preset=nope"], "preset: unknown option 'nope'"),
    Case("unknown task", ["task=nope"], "task: unknown option 'nope'"),
    Case("mistyped key", ["model.dimm=8"], "model.dimm: Key 'dimm' not in 'ModelConfig'"),
    Case("wrong type", ["model.dim=abc"], "model.dim: Value 'abc' of type 'str' could not be converted to Integer"),
    Case("unknown objective", [*TINY_SYN, "objective=[speed]"], "objective: must be one of"),
    # data
    Case("missing data folder", ["data.data_dir=/nonexistent/wikitext-2"], "/nonexistent/wikitext-2"),
    Case("folder without split files", ["data.data_dir={empty_dir}"], "data.data_dir: WikiText-2 files", setup=["empty_dir"]),
    Case("empty data file", ["data.data_dir={empty_file_dir}"], "is empty", setup=["empty_file_dir"]),
    Case("non-UTF-8 data file", ["data.data_dir={latin1_dir}"], "UTF-8", setup=["latin1_dir"]),
    Case("sequence longer than the data", [*TINY_SYN, "data.synthetic_tokens=200", "data.seq_len=512"], "data.seq_len:"),
    # checkpoints
    Case("missing checkpoint", [*TINY_SYN, "task=eval", "checkpoint=/nonexistent/checkpoint.pt"], "checkpoint: file not found: /nonexistent/checkpoint.pt"),
    Case("corrupt checkpoint", [*TINY_SYN, "task=eval", "checkpoint={garbage_ckpt}"], "checkpoint: cannot read", setup=["garbage_ckpt"]),
    Case("checkpoint of another model size", [*TINY_SYN, "model=small", "resume=true"], "checkpoint: ", setup=["tiny_run_dir"]),
    # outside resources
    Case("unreachable database", ["-m", "+sweep=alpha_optuna", *TINY_SYN, "hydra.sweeper.storage=postgresql+psycopg://ease@127.0.0.1:1/nodb"], "hydra.sweeper.storage: cannot open"),
    Case("read-only output folder", [*TINY_SYN], "Read-only file system", setup=["readonly_dir"]),
    # the results collector
    Case("results: no such folder", ["/nonexistent/sweep"], "/nonexistent/sweep", module="results"),
    Case("results: nothing to collect", ["{empty_dir}"], "no readable metrics.json", module="results", setup=["empty_dir"]),
    Case("results: only a corrupt record", ["{corrupt_dir}"], "no readable metrics.json", module="results", setup=["corrupt_dir"]),
    # generation and evaluation inputs that do not fit the checkpoint (tests/test_hardening_inputs.py has more)
    Case("NUL-byte data file", ["data.data_dir={nul_dir}"], "holds no text (only NUL bytes / whitespace)", setup=["nul_dir"]),
    Case("too many new tokens", ["task=generate", "checkpoint={synthetic_ckpt}", "prompt=t1 t2", "task.max_new_tokens=100000"], "task.max_new_tokens: must be <= 4096 (the generation cap), got 100000", setup=["synthetic_ckpt"]),
    Case("words for a synthetic checkpoint", ["task=generate", "checkpoint={synthetic_ckpt}", "prompt=1 2 3"], "prompt: the model's tokenizer is synthetic (tokens look like t0 t1 ... t63), got '1'", setup=["synthetic_ckpt"]),
    Case("eval text for a synthetic checkpoint", ["task=eval", "checkpoint={synthetic_ckpt}", "task.checkpoint_data=false", "data.data_dir={words_dir}"], "task.checkpoint_data: data 'wikitext2' does not fit the checkpoint's synthetic tokenizer", setup=["synthetic_ckpt", "words_dir"]),
    Case("eval synthetic data for a word checkpoint", ["task=eval", "checkpoint={word_ckpt}", "task.checkpoint_data=false", *TINY_SYN], "task.checkpoint_data: synthetic data needs a synthetic tokenizer, but the checkpoint's tokenizer is word", setup=["word_ckpt"]),
    Case("eval data of unknown words", ["task=eval", "checkpoint={word_ckpt}", "task.checkpoint_data=false", "data.data_dir={words_dir}"], "the data does not match the checkpoint's tokenizer", setup=["word_ckpt", "words_dir"]),
    # configuration refused before training (tests/test_hardening_config.py tests the checks themselves)
    Case("typo key added with +", [*TINY_SYN, "+modle=tiny"], "modle: not a config key; did you mean model?"),
    Case("unknown group key added with +", [*TINY_SYN, "+model.foo=1"], "model.foo: not a config key; the keys of model are num_layers, dim"),
    Case("sweep without -m", ["+sweep=alpha_grid", *TINY_SYN], "sweep: +sweep=alpha_grid needs -m (multirun); without it only one plain run would happen"),
    Case("seed beyond torch's range", [*TINY_SYN, "seed=18446744073709551616"], "seed: must be an int in [-9223372036854775808, 18446744073709551615], got 18446744073709551616"),
    Case("device this machine lacks", [*TINY_SYN, "device=cuda:99"], "device: cuda:99 is not available on this machine (torch.cuda."),
    Case("job name that is a path", [*TINY_SYN, "hydra.job.name=../../x"], "hydra.job.name: must be a plain name (no '/', '\\' or '..'), got '../../x'"),
    Case("study name that is a path", ["-m", "+sweep=alpha_optuna", *TINY_SYN, "hydra.sweeper.storage=sqlite:///${{hydra.sweep.dir}}/optuna/${{hydra.sweeper.study_name}}.db", "hydra.sweeper.study_name=../../../elsewhere/x"], "hydra.sweeper.study_name: must be a plain name (no '/', '\\' or '..'), got '../../../elsewhere/x'"),
    Case("malformed database URL", ["-m", "+sweep=alpha_optuna", *TINY_SYN, "hydra.sweeper.storage=notaurl"], "hydra.sweeper.storage: not a database URL: 'notaurl'"),
    Case("unwritable database", ["-m", "+sweep=alpha_optuna", *TINY_SYN, "hydra.sweeper.storage=sqlite:////proc/x/y.db"], "hydra.sweeper.storage: cannot open sqlite:////proc/x/y.db: cannot create /proc/x"),
    Case("database password hidden", ["-m", "+sweep=alpha_optuna", *TINY_SYN, "hydra.sweeper.storage=postgresql+psycopg://ease:s3cret@127.0.0.1:1/nodb"], "hydra.sweeper.storage: cannot open postgresql+psycopg://ease:***@127.0.0.1:1/nodb: "),
    Case("5,000 custom weights", [*TINY_SYN, "loss_weights=custom", "loss_weights.weights=[" + ",".join(["1"] * 5000) + "]"], "loss_weights.weights: custom needs one weight per layer (3), got [1.0, 1.0, 1.0, 1.0, 1.0 ... 1.0, 1.0, 1.0, 1.0, 1.0]"),
    # values that would silently invert or void a run, and more keys named by their one line
    Case("negative clip norm", [*TINY_SYN, "train.grad_clip=-1"], "train.grad_clip: must be a finite number >= 0 (0 or null = no clipping), got -1.0"),
    Case("NaN weight decay", [*TINY_SYN, "train.weight_decay=nan"], "train.weight_decay: must be a finite number >= 0, got nan"),
    Case("analysis threshold above 1", [*TINY_SYN, "routing.analysis_thresholds=[1.5,-1]"], "routing.analysis_thresholds: each must be in [0, 1], got 1.5"),
    Case("negative patience", [*TINY_SYN, "train.patience=-1"], "train.patience: must be an int >= 1, got -1"),
    Case("zero batch size", [*TINY_SYN, "train.batch_size=0"], "data.batch_size: must be an int >= 1, got 0"),
    Case("validation fraction above 1", [*TINY_SYN, "data.val_fraction=1.5"], "data.val_fraction: must be a number in (0, 1), got 1.5"),
    Case("unknown confidence measure", [*TINY_SYN, "routing.confidence=bogus"], "routing.confidence: must be one of max_prob, top2_margin, neg_entropy, saturation, classifier, got 'bogus'"),
    Case("α schedule without α", [*TINY_SYN, "schedule=linear"], "schedule.kind: 'linear' moves α, so loss_weights must be asymmetric, shallow_deep or with_middle, got 'final_only'"),
    Case("dropout of 1.5", [*TINY_SYN, "model.dropout=1.5"], "model.dropout: must be in [0, 1), got 1.5"),
    Case("model=hf without a model", [*TINY_SYN, "model=hf"], "model.name_or_path: model=hf needs model.name_or_path=DIR (a local model folder) or a hub name"),
    Case("model=hf folder without config.json", [*TINY_SYN, "model=hf", "model.name_or_path=/nonexistent/m"], "model.name_or_path: no config.json in '/nonexistent/m'"),
    Case("unsupported HF architecture", [*TINY_SYN, "model=hf_tiny_llama", "model.hf_config.model_type=bert"], "model.hf_config: architecture 'bert' is not supported as an EASE backbone"),
    Case("unknown kv mode", ["task=generate", "task.kv_mode=bogus"], "task.kv_mode: must be one of propagate, recompute, got 'bogus'"),
    Case("negative temperature", ["task=generate", "task.temperature=-1"], "task.temperature: must be >= 0 (0 = greedy), got -1.0"),
    Case("route fraction above 0.5", ["+preset=token_routed", *TINY_SYN, "strategy.min_route_fraction=0.9"], "strategy.min_route_fraction: must be in [0, 0.5], got 0.9"),
    Case("unknown ASHEM phase-1 mode", ["+preset=ashem", *TINY_SYN, "strategy.phase1=bogus"], "strategy.phase1: must be one of train, skip, got 'bogus'"),
]  # fmt: skip


def make_materials(root: Path) -> dict[str, str]:
    """Bad files and folders the cases point at."""
    m: dict[str, str] = {}
    (root / "empty").mkdir()
    m["empty_dir"] = str(root / "empty")
    (root / "empty_file").mkdir()
    (root / "empty_file" / "wiki.train.tokens").write_text("")
    m["empty_file_dir"] = str(root / "empty_file")
    (root / "latin1").mkdir()
    (root / "latin1" / "wiki.train.tokens").write_bytes("caf\xe9 na\xefve r\xe9sum\xe9\n".encode("latin-1") * 100)
    m["latin1_dir"] = str(root / "latin1")
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    m["garbage_ckpt"] = str(root / "garbage.pt")
    (root / "corrupt" / "0").mkdir(parents=True)
    (root / "corrupt" / "0" / "metrics.json").write_text('{"status": "ok", "metri')
    m["corrupt_dir"] = str(root / "corrupt")
    # generation / evaluation inputs: text of NUL bytes, plain words, and two checkpoints saved without a config
    from ease.checkpoint import save_checkpoint
    from ease.data import SyntheticTokenizer, WordTokenizer
    from ease.model import EarlyExitTransformer

    (root / "nul").mkdir()
    (root / "nul" / "wiki.train.tokens").write_bytes(b"\x00" * 10_000)
    m["nul_dir"] = str(root / "nul")
    (root / "words").mkdir()
    (root / "words" / "wiki.train.tokens").write_text("the cat sat on the mat and the dog ran to the park\n" * 300)
    m["words_dir"] = str(root / "words")
    torch.manual_seed(0)
    save_checkpoint(root / "syn.pt", EarlyExitTransformer(64, 16, 3, num_heads=2), SyntheticTokenizer(64).to_dict())
    m["synthetic_ckpt"] = str(root / "syn.pt")
    other = WordTokenizer.fit("alpha beta gamma delta epsilon zeta eta theta\n" * 10, 20)  # none of the words above
    save_checkpoint(root / "word.pt", EarlyExitTransformer(other.vocab_size, 16, 3, num_heads=2), other.to_dict())
    m["word_ckpt"] = str(root / "word.pt")
    return m


def run_case(case: Case, materials: dict[str, str], workdir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = workdir / "out"
    args = [a.format(**materials) for a in case.args]
    if case.module == "results":
        cmd = [sys.executable, "-m", "ease.results", *args, "--out", str(out)]
    else:
        run_dir = materials.get("run_dir_" + case.name, str(out))
        key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
        cmd = [sys.executable, str(REPO / "train.py"), *args, f"{key}={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    return proc, Path(materials.get("run_dir_" + case.name, str(out)))


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple]]:
    root = tmp_path_factory.mktemp("bad_inputs")
    materials = make_materials(root)
    # A finished tiny run whose checkpoint a `model=small resume=true` run must refuse.
    tiny = root / "tiny_run"
    subprocess.run([sys.executable, str(REPO / "train.py"), *FAST, f"hydra.run.dir={tiny}"], cwd=REPO, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    materials["run_dir_checkpoint of another model size"] = str(tiny)
    readonly = root / "readonly"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True)
    if mounted.returncode != 0:
        readonly.chmod(0o555)  # enough for a non-root user; root needs the read-only mount above
    materials["run_dir_read-only output folder"] = str(readonly / "run")
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {c.name: pool.submit(run_case, c, materials, root / f"case{i}") for i, c in enumerate(CASES)}
            yield {name: f.result() for name, f in futures.items()} | {"_root_is_writable_ro": (mounted.returncode,)}
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(readonly)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_cleanly(case: Case, results: dict[str, tuple]) -> None:
    if case.name == "read-only output folder" and results["_root_is_writable_ro"][0] != 0 and os.geteuid() == 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    proc, out = results[case.name]
    assert proc.returncode != 0, f"exit 0; stderr: {proc.stderr[-1500:]}"
    lines = [line for line in proc.stderr.splitlines() if case.expected in line]
    assert lines, f"expected {case.expected!r} on one line of stderr, got:\n{proc.stderr[-1500:]}"
    assert "Traceback" not in proc.stderr + proc.stdout
    for record in out.rglob("metrics.json") if out.exists() else []:
        try:
            status = json.loads(record.read_text())["status"]
        except (ValueError, KeyError):
            continue
        assert status != "ok", f"{record} claims success"
    for table in out.rglob("results.csv") if out.exists() else []:
        assert len(table.read_text().strip().splitlines()) <= 1, f"{table} lists runs"


def test_checkpoint_of_another_size_left_the_good_run_alone(results: dict[str, tuple]) -> None:
    _, out = results["checkpoint of another model size"]
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "failed"  # the refused resume rewrote the record as failed; the checkpoint stays
    assert torch.load(out / "checkpoint.pt", weights_only=True)["model_args"]["dim"] == 16
