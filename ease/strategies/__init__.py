"""Training strategies beyond plain weighted training, behind `strategy.name` in the Hydra app.

Each strategy module has `validate(cfg)` (every check that can run before data is read) and
`run(cfg, data, output_dir) -> metrics`, whose metrics carry the standard run's keys for the final routed
model plus a `strategy` section. Both checkpoint every epoch and resume (`resume=true`): see `resume`.

    ashem         seed 002: Block 1 on all tokens, Block 2 on the hard ones, routing at the top of Block 1
    token_routed  seed 000: each token trains only the route it takes
"""

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

STRATEGY_MODULES = {"ashem": "ease.strategies.ashem", "token_routed": "ease.strategies.token_routed"}


def _module(cfg: DictConfig) -> Any | None:
    name = cfg.strategy.name
    if name == "standard":
        return None
    if name not in STRATEGY_MODULES:
        raise ValueError(f"strategy.name: must be one of standard, {', '.join(STRATEGY_MODULES)}, got {name!r}")
    return importlib.import_module(STRATEGY_MODULES[name])


def validate_strategy(cfg: DictConfig) -> None:
    """One-line ValueError naming the Hydra key for a bad strategy setting; no-op for strategy=standard."""
    module = _module(cfg)
    if module is None:
        return
    module.validate(cfg)


def run_strategy(cfg: DictConfig, data: Any, output_dir: Path) -> dict[str, Any]:
    """Train with `cfg.strategy.name` on `data` (a DataBundle); writes checkpoint.pt; returns the metrics."""
    module = _module(cfg)
    if module is None:
        raise ValueError("strategy.name: standard runs through ease.app.runner.train_standard")
    module.validate(cfg)
    return module.run(cfg, data, Path(output_dir))
