"""Sweep throughput: the alpha grid serially vs two joblib jobs, and a threshold sweep vs one evaluation pass.

    python benchmarks/sweeps.py            # WikiText-2 at the seeds' size, 3 epochs per trial (~10-20 min)
    python benchmarks/sweeps.py --quick    # tiny model on synthetic tokens (a smoke run, ~2 min)

Writes benchmarks/sweeps_results.json. Every number is measured here, with the machine's load average
recorded beside it: on a shared CPU, wall times move with what else runs.

1. Alpha grid (`+sweep=alpha_grid`: α ∈ {0.3, 0.5, 0.7} × 2 seeds = 6 trainings; `--seeds N`: 3N, stored as
   alpha_grid_{3N}trials). Every trial trains a fixed number of epochs (patience above max_epochs), so each variant
   does the same work. Variants (`--variants`): serial with 1 torch thread, serial with all cores,
   hydra/launcher=ease_joblib (2 loky jobs × 1 thread) and hydra/launcher=ease_fork (2 forked workers × 1 thread),
   each run --repeats times, interleaved. Reports the median wall time, trials per hour and the ratio parallel /
   serial, whole sweep and steady state (the jobs' phase: first job start to last job end), and each run's
   start-up, jobs' phase and tail (the results tables).
3. Pruning (`--only pruning` runs this section alone): `+sweep=alpha_optuna`, 20 trials of 6 epochs, without
   and with the median pruner; wall time, epochs trained, pruned trials, best PPL.
2. Threshold sweep (`+sweep=threshold`, K thresholds of one checkpoint, task=eval): wall time of the K-job sweep
   with the per-token pass cached (the default) and without, against one eval job and against the training
   run that made the checkpoint; and the number of model passes the K jobs ran.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "sweeps_results.json"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


def train_py(args: list[str], multirun: bool = False) -> float:
    """Run train.py from the repo root; returns its wall time in seconds."""
    cmd = [sys.executable, "train.py", *(["-m"] if multirun else []), *args, "progress=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]


def load() -> float:
    return os.getloadavg()[0]


VARIANTS = {
    "serial_threads1": ["threads=1"],
    "serial_threads_all": [f"threads={os.cpu_count()}"],
    "joblib_2jobs_threads1": ["hydra/launcher=ease_joblib", "threads=1"],
    "fork_2jobs_threads1": ["hydra/launcher=ease_fork", "threads=1"],
}
SHORT = {"serial_threads_all": "serial_threads_all", "joblib_2jobs_threads1": "joblib", "fork_2jobs_threads1": "fork"}


def phases(records_: list[dict[str, Any]], t0: float, t1: float) -> dict[str, float]:
    """Where a sweep's wall time went: start-up (command start to the first job's start), the jobs' phase (first
    start to last end) and the tail (last end to exit: the results tables), from each record's started/finished."""
    first, last = min(r["started"] for r in records_), max(r["finished"] for r in records_)
    return {"startup_s": round(first - t0, 2), "jobs_phase_s": round(last - first, 2), "tail_s": round(t1 - last, 2)}


def alpha_grid(tmp: Path, base: list[str], repeats: int, seeds: int, names: list[str]) -> dict[str, Any]:
    """Each variant `repeats` times, interleaved (A B C A B C) so a change in the machine's load hits all alike.
    `seeds` seeds per α (3 × seeds trials). Besides whole-sweep wall time, the steady-state rate: trials per hour
    over the jobs' phase (first job start to last job end), without the sweep's fixed start-up and tables."""
    trials = 3 * seeds
    seed_arg = [f"seed={','.join(str(s) for s in range(seeds))}"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names:
            folder = tmp / f"grid{trials}_{name}_{repeat}"
            load_before = load()
            t0 = time.time()
            wall = train_py(["+sweep=alpha_grid", *base, *seed_arg, *VARIANTS[name], f"hydra.sweep.dir={folder}"], True)
            recs = records(folder)
            ok = [r for r in recs if r["status"] == "ok"]
            runs[name].append(
                {
                    "ok_trials": len(ok),
                    "wall_s": round(wall, 1),
                    **phases(recs, t0, t0 + wall),
                    "sum_train_time_s": round(sum(r["metrics"]["train_time_s"] for r in ok), 1),
                    "load_avg_1min_before": round(load_before, 2),
                    "load_avg_1min_after": round(load(), 2),
                }
            )
            print(name, runs[name][-1], flush=True)
    out: dict[str, Any] = {"trials_per_sweep": trials, "repeats": repeats, "variants": {n: VARIANTS[n] for n in names}}
    for name, results in runs.items():
        wall = statistics.median(r["wall_s"] for r in results)
        jobs = statistics.median(r["jobs_phase_s"] for r in results)
        out[name] = {
            "median_wall_s": wall,
            "trials_per_hour": round(3600 * trials / wall, 1),
            "median_jobs_phase_s": jobs,
            "steady_trials_per_hour": round(3600 * trials / jobs, 1),
            "runs": results,
        }
    if "serial_threads1" in names:
        serial = out["serial_threads1"]
        for name in names:
            if name != "serial_threads1":
                out[f"ratio_{SHORT[name]}_vs_serial_threads1"] = round(
                    out[name]["trials_per_hour"] / serial["trials_per_hour"], 2
                )
                out[f"steady_ratio_{SHORT[name]}_vs_serial_threads1"] = round(
                    out[name]["steady_trials_per_hour"] / serial["steady_trials_per_hour"], 2
                )
    return out


def threshold_sweep(tmp: Path, base: list[str]) -> dict[str, Any]:
    run_dir = tmp / "checkpoint_run"
    train_wall = train_py(["+preset=asymmetric", *base, "threads=1", f"hydra.run.dir={run_dir}"])
    trained = records(run_dir)[0]["metrics"]
    common = ["+sweep=threshold", f"checkpoint={run_dir}", "threads=1"]
    one_dir = tmp / "one_eval"
    eval_args = ["task=eval", f"checkpoint={run_dir}", "routing=confidence", "threads=1", "task.cache_stats=false"]
    one_wall = train_py([*eval_args, f"hydra.run.dir={one_dir}"])
    one = records(one_dir)[0]["metrics"]
    out: dict[str, Any] = {
        "thresholds": list(THRESHOLDS),
        "training_run": {"wall_s": round(train_wall, 1), "train_time_s": round(trained["train_time_s"], 1)},
        "one_eval_job": {"wall_s": round(one_wall, 1), "eval_time_s": round(one["eval_time_s"], 3)},
        "curve_in_training_run_eval_time_s": round(trained["eval_time_s"], 3),
    }
    for name, extra in (("sweep_cached", []), ("sweep_uncached", ["task.cache_stats=false"])):
        for cache in (run_dir / "eval_cache").glob("*.pt"):
            cache.unlink()
        folder = tmp / name
        values = ",".join(str(t) for t in THRESHOLDS)
        wall = train_py([*common, f"routing.threshold={values}", *extra, f"hydra.sweep.dir={folder}"], multirun=True)
        recs = records(folder)
        out[name] = {
            "jobs": len(recs),
            "wall_s": round(wall, 1),
            "model_passes": sum(r["metrics"]["model_passes"] for r in recs),
            "sum_eval_time_s": round(sum(r["metrics"]["eval_time_s"] for r in recs), 3),
            "wall_vs_one_eval_job": round(wall / one_wall, 2),
            "wall_vs_training_run": round(wall / train_wall, 2),
        }
        print(name, out[name], flush=True)
    return out


def pruning(tmp: Path, base: list[str], trials: int) -> dict[str, Any]:
    """`+sweep=alpha_optuna` with `trials` trials on a fresh study, without a pruner and with the median pruner
    (n_startup_trials 5, n_warmup_steps 1), the same sampler seed. Every trial may train all its epochs (patience
    above max_epochs), so the saving is the epochs the pruner cut. Reports wall time, epochs trained, pruned
    trials and the best PPL each study reached."""
    variants = {
        "no_pruner": [],
        "median": ["hydra.sweeper.pruner=median", "hydra.sweeper.pruner_args={n_startup_trials: 5, n_warmup_steps: 1}"],
    }
    out: dict[str, Any] = {
        "trials": trials,
        "overrides": base,
        "pruner_args": {"n_startup_trials": 5, "n_warmup_steps": 1},
    }
    for name, extra in variants.items():
        folder, url = tmp / f"prune_{name}", f"sqlite:///{tmp / f'prune_{name}.db'}"
        args = ["+sweep=alpha_optuna", *base, "threads=1", f"hydra.sweep.dir={folder}", f"hydra.sweeper.storage={url}",
                "hydra.sweeper.study_name=bench", f"hydra.sweeper.n_trials={trials}", *extra]  # fmt: skip
        before = load()
        wall = train_py(args, multirun=True)
        recs = records(folder)
        done = [r for r in recs if r["status"] == "ok"]
        out[name] = {
            "wall_s": round(wall, 1),
            "complete": len(done),
            "pruned": sum(r["status"] == "pruned" for r in recs),
            "epochs_trained": sum(len(r["metrics"].get("history") or []) for r in recs),
            "best_ppl": min(r["metrics"]["ppl"] for r in done) if done else None,
            "load_avg_1min_before": round(before, 2),
            "load_avg_1min_after": round(load(), 2),
        }
        print(name, out[name], flush=True)
    out["wall_saving"] = round(1 - out["median"]["wall_s"] / out["no_pruner"]["wall_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model on synthetic tokens")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each alpha-grid variant, interleaved")
    parser.add_argument("--trials", type=int, default=20, help="trials of each pruning variant")
    parser.add_argument("--seeds", type=int, default=2, help="alpha grid: seeds per alpha (3 x seeds trials)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"alpha grid: comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--only", choices=["alpha_grid", "threshold_sweep", "pruning"], help="run one section; keep the others in --out"
    )
    args = parser.parse_args()
    if args.quick:
        base = ["model=tiny", "data=synthetic", "train.max_epochs=2", "train.patience=100"]
    else:
        base = ["train.max_epochs=3", "train.patience=100"]
    sections = {
        "alpha_grid": lambda tmp: alpha_grid(tmp, base, args.repeats, args.seeds, args.variants.split(",")),
        "threshold_sweep": lambda tmp: threshold_sweep(tmp, base),
        "pruning": lambda tmp: pruning(tmp, [*base[:-2], "train.max_epochs=6", "train.patience=100"], args.trials),
    }
    result = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="ease-bench-sweeps-") as tmp:
        result.update(
            setting="quick (tiny, synthetic)" if args.quick else "WikiText-2 200K chars, small model, 3 epochs",
            overrides=base,
            machine={"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        )
        for name, run in sections.items():
            if args.only in (None, name):
                key = f"alpha_grid_{3 * args.seeds}trials" if name == "alpha_grid" and args.seeds != 2 else name
                result[key] = run(Path(tmp))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
