"""Data-parallel training under torchrun on CPU (gloo): 2 processes equal 1, a kill of all ranks resumes bit for
bit, rank 0 alone writes, and the settings data parallelism refuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, train_py

from ease.distributed import check_setup
from ease.evaluation import collect_token_stats, merge_token_stats
from ease.model import EarlyExitTransformer

ARGS = [
    "+preset=deed", "data=synthetic", "model=tiny", "data.synthetic_tokens=8000", "train.max_steps=12",
    "train.eval_every=4", "train.patience=5", "train.grad_accum=2", "train.lr_schedule=cosine",
    "train.warmup_steps=2", "progress=false", "threads=1",
]  # fmt: skip


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    return subprocess.run(
        [*cmd, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["metrics"]


def test_two_processes_equal_one_and_resume_after_a_kill(tmp_path: Path) -> None:
    one = train_py(*ARGS, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*ARGS, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert b["training"]["world_size"] == 2 and b["training"]["distributed"] == "ddp"
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "val_loss", "val_ppl"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-5), key
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5) and b["num_tokens"] == a["num_tokens"]
    # one folder, one writer: rank 1 adds no log or config of its own
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".hydra",
        "checkpoint.pt",
        "metrics.json",
        "train.log",
    ]

    # SIGKILL of rank 0 after evaluation 2 (torchrun then stops rank 1); resume=true carries on bit for bit
    cut = tmp_path / "cut"
    killed = torchrun(*ARGS, f"hydra.run.dir={cut}", "+callbacks.kill._target_=killswitch.KillAfterEpoch",
                      "+callbacks.kill.epoch=2")  # fmt: skip
    assert killed.returncode != 0 and not (cut / "metrics.json").exists()
    resumed = torchrun(*ARGS, f"hydra.run.dir={cut}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "after evaluation 2 (step 8)" in resumed.stdout + resumed.stderr
    c = metrics(cut)
    assert [r["train_loss"] for r in c["history"]] == [r["train_loss"] for r in b["history"]]
    assert c["ppl"] == b["ppl"]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path: Path) -> None:
    one = train_py(*ARGS, f"hydra.run.dir={tmp_path / 'one'}")
    fsdp = torchrun(*ARGS, "train.distributed=fsdp", f"hydra.run.dir={tmp_path / 'fsdp'}")
    assert one.returncode == 0 and fsdp.returncode == 0, fsdp.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert b["training"]["distributed"] == "fsdp"
    assert [r["val_ppl"] for r in b["history"]] == pytest.approx([r["val_ppl"] for r in a["history"]], rel=1e-5)
    # the checkpoint holds full (gathered) weights: it evaluates on one process like any other
    ev = train_py("task=eval", f"checkpoint={tmp_path / 'fsdp'}", f"hydra.run.dir={tmp_path / 'ev'}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert metrics(tmp_path / "ev")["ppl"] == pytest.approx(b["ppl"], rel=1e-6)


def test_merged_rank_stats_equal_one_pass() -> None:
    torch.manual_seed(0)
    model = EarlyExitTransformer(32, 16, 3, num_heads=2).eval()
    batches = [(torch.randint(0, 32, (4, 8)), torch.randint(0, 32, (4, 8))) for _ in range(3)]
    whole = collect_token_stats(model, batches, [1, 2], [3])
    shards = [[(x[2 * r : 2 * r + 2], y[2 * r : 2 * r + 2]) for x, y in batches] for r in range(2)]
    halves = [collect_token_stats(model, shard, [1, 2], [3]) for shard in shards]
    merged = merge_token_stats(halves)
    assert merged.num_tokens == whole.num_tokens
    assert merged.routed((1, 2), (0.3, 0.2))["ppl"] == pytest.approx(whole.routed((1, 2), (0.3, 0.2))["ppl"], rel=1e-9)
    assert merged.per_exit()[3]["loss"] == pytest.approx(whole.per_exit()[3]["loss"], rel=1e-9)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fsdp", 32, 1, "standard"), r"^train.distributed: fsdp shards the model over several processes; start them"),
        (("ddp", 30, 4, "standard"), r"^train.batch_size: the global batch 30 must divide evenly over the 4 processes"),
        (("ddp", 32, 2, "ashem"), r"^strategy: ashem trains on one process"),
    ],
)
def test_setups_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_setup(*args)


def test_app_refuses_before_training(tmp_path: Path) -> None:
    """The refusals that need the app (the others are TrainConfig's own checks, in test_step_training.py)."""
    for i, (extra, line) in enumerate(
        (
            (["train.distributed=fsdp"], "error: train.distributed: fsdp shards"),
            (["train.precision=fp16"], "error: train.precision: fp16 needs a CUDA device"),
        )
    ):
        result = train_py(*ARGS, *extra, f"hydra.run.dir={tmp_path / str(i)}")
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(line), result.stderr
