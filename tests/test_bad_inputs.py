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
