"""Hydra callbacks: the comparison tables at the end of every multirun."""

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("ease")


class ResultsTablesCallback(Callback):
    """Writes results.csv / results.md / plots into the sweep folder when a multirun ends.

    Hydra calls on_multirun_end also when the sweep failed part of the way, so the finished jobs
    always get their table.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            from ease.results import write_results

            write_results([sweep_dir], sweep_dir, echo=True)
        except Exception as err:  # a table must never turn a finished sweep into a crash
            log.warning("results tables for %s not written: %s: %s", sweep_dir, type(err).__name__, err)
