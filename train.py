"""EASE's one entry point: `python train.py +preset=deed`, `python train.py -m +sweep=alpha_grid`.

A thin @hydra.main around `ease.app.runner.hydra_main`; the work is in `ease.app.runner.run(cfg, out_dir)`,
which is callable from Python too.
"""

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ease.app.errors import one_line_error
from ease.app.runner import hydra_main
from ease.app.schema import check_plain_name, register_configs

register_configs(Path(__file__).resolve().parent)
# Hydra 1.4 warns on every config-named target (our results callback); the whitelist API is still moving.
warnings.filterwarnings("ignore", message=r"(?s).*_execution_whitelist_", category=UserWarning)


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    return hydra_main(cfg)


# Names Hydra or the Optuna sweeper turn into paths before any task code runs (the job's log file, the study's
# database folder): checked on the command line first, so nothing is created outside the outputs folder.
PATH_NAMES = ("hydra.job.name", "hydra.sweeper.study_name")


def check_path_names(args: list[str]) -> None:
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in PATH_NAMES:
            check_plain_name(key, value)


def join_ranks() -> None:
    """Under torchrun: join the process group before Hydra names the run folder, so every rank gets rank 0's
    timestamp (one folder), and let only rank 0 write Hydra's log file and .hydra/ configs."""
    from ease import distributed
    from ease.app.schema import run_time, set_run_time

    if distributed.env_world_size() <= 1:
        return
    ctx = distributed.init_from_env()
    set_run_time(ctx.broadcast(run_time()))
    if not ctx.is_main:
        sys.argv += ["hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING", "hydra.output_subdir=null"]


def cli() -> None:
    """Run main; Hydra's own errors (composition, sweeper, output folder) become one line and exit 1."""
    from ease import distributed

    full_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1" or "debug=true" in sys.argv
    os.environ["HYDRA_FULL_ERROR"] = "1"  # make Hydra raise instead of printing its multi-line report
    try:
        check_path_names(sys.argv[1:])
        join_ranks()
        main()
    except Exception as err:
        if full_traceback:
            raise
        print(f"error: {one_line_error(err)}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    cli()
