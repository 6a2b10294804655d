"""EASE's one entry point: `python train.py +preset=deed`, `python train.py -m +sweep=alpha_grid`.

A thin @hydra.main around `ease.app.runner.hydra_main`; the work is in `ease.app.runner.run(cfg, out_dir)`,
which is callable from Python too.
"""

import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ease.app.runner import hydra_main
from ease.app.schema import register_configs

register_configs(Path(__file__).resolve().parent)
# Hydra 1.4 warns on every config-named target (our results callback); the whitelist API is still moving.
warnings.filterwarnings("ignore", message=r"(?s).*_execution_whitelist_", category=UserWarning)


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    return hydra_main(cfg)


if __name__ == "__main__":
    main()
