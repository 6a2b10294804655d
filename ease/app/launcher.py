"""Parallel sweep jobs forked from the sweep's controller: `hydra/launcher=ease_fork`.

hydra-joblib-launcher's loky workers are new interpreters: before its first job each imports torch, Hydra and
EASE again (about 1.5 s, more on a busy machine), and every job's config, Hydra context and plugin state are
pickled to it. `ForkLauncher` forks `n_jobs` workers from the controller instead: they start with everything
the controller has imported (`preload` adds what a job would otherwise import lazily, e.g. torch._dynamo, which
the first optimizer pulls in: 1.3 s), inherit the config and Hydra context, and receive only each job's index and
overrides. Each worker runs its jobs one after another, as the basic launcher runs them all in one process, so
a trial's metrics are those of the serial sweep. Jobs go to whichever worker is free, so both stay busy until
the batch runs out.

Fork safety: the controller runs no torch op (it composes configs, asks the sweeper, writes tables at the end),
so no torch thread pool or CUDA context exists when it forks. A worker the OS kills (out of memory) fails the
sweep with one line naming its job; it does not hang it (the joblib plugin's `backend=multiprocessing` pool
waits for a killed job for ever).
"""

import importlib
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger("ease")

# What the forked workers inherit: set by `launch` just before the pool forks, so nothing of it is pickled.
_inherited: dict[str, Any] = {}


def worker_count(n_jobs: int, jobs: int) -> int:
    """Workers for a batch of `jobs`: `n_jobs` (-1: one per CPU), never more than the jobs."""
    wanted = (os.cpu_count() or 1) if n_jobs == -1 else n_jobs
    return max(1, min(wanted, jobs))


def _run_job(idx: int, overrides: Sequence[str]) -> JobReturn:
    """One job in a forked worker (the basic launcher's per-job steps)."""
    hydra_context: HydraContext = _inherited["hydra_context"]
    config: DictConfig = _inherited["config"]
    setup_globals()
    Singleton.set_state(_inherited["singleton_state"])
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = str(idx)
        sweep_config.hydra.job.num = idx
    HydraConfig.instance().set_config(sweep_config)
    return run_job(
        hydra_context=hydra_context,
        task_function=_inherited["task_function"],
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


class ForkLauncher(Launcher):
    """Runs a batch of jobs on `n_jobs` worker processes forked from the controller.

    Args:
        n_jobs: Jobs at a time (-1: one per CPU). Set torch's threads per job with `threads=N` (on 2 cores,
            `threads=1` with 2 jobs).
        preload: Modules imported in the controller before it forks, so no job imports them again.
        import_while_running: Modules the controller imports once its workers are forked and running, which
            only the controller needs (the results tables' pandas, scipy.stats, matplotlib): the sweep's end
            then does not wait for them.
    """

    def __init__(
        self, n_jobs: int = 2, preload: Sequence[str] | None = None, import_while_running: Sequence[str] | None = None
    ) -> None:
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or not (n_jobs >= 1 or n_jobs == -1):
            raise ValueError(f"hydra.launcher.n_jobs: must be an int >= 1, or -1 (one per CPU), got {n_jobs!r}")
        self.n_jobs = n_jobs
        self.preload = list(preload or [])
        self.import_while_running = list(import_while_running or [])
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(
            self.config.hydra.hydra_logging,
            self.config.hydra.verbose,
            execution_whitelist=self.hydra_context.execution_whitelist,
        )
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        for name in self.preload:
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise ValueError(f"hydra.launcher.preload: cannot import {name!r}: {err}") from None
        workers = worker_count(self.n_jobs, len(job_overrides))
        log.info("Launching %d jobs on %d forked workers", len(job_overrides), workers)
        jobs = [(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        for idx, overrides in jobs:
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        _inherited.update(
            hydra_context=self.hydra_context,
            config=self.config,
            task_function=self.task_function,
            singleton_state=Singleton.get_state(),
        )
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        try:
            # Python 3.11 forks every worker at the first submit, before the pool starts its manager thread.
            futures = [pool.submit(_run_job, idx, overrides) for idx, overrides in jobs]
            for name in self.import_while_running:  # the workers exist now: they do not inherit these
                try:
                    importlib.import_module(name)
                except ImportError as err:  # only a saving: the jobs go on
                    log.warning("hydra.launcher.import_while_running: cannot import %r: %s", name, err)
            runs = []
            for (idx, overrides), future in zip(jobs, futures, strict=True):
                try:
                    runs.append(future.result())
                except BrokenProcessPool:
                    # The pool stops the other workers with SIGTERM, which a running job catches to stop cleanly
                    # and report; with the pool's reader gone that report would block it, and `shutdown` with it.
                    for worker in multiprocessing.active_children():
                        worker.kill()
                    raise RuntimeError(
                        f"hydra.launcher: a worker process died (killed by the OS? out of memory?) while job "
                        f"#{idx} ({' '.join(filter_overrides(overrides))}) or one beside it ran"
                    ) from None
        finally:
            # A job that raised stops the sweep, as under the basic launcher: the jobs not started are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
            _inherited.clear()
        return runs  # the jobs ran in the workers: the controller's logging is as `launch` set it
