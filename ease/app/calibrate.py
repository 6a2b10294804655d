"""`routing.calibrate` at the app's edge: calibrate τ on the validation split, route with it, measure it on test.

Used by task=train (strategy=standard, after training and the optional exit-classifier stage) and task=eval.
The threshold is set on the trainer's config and on the model (so checkpoint.pt stores the calibrated routing);
the run's metrics then are those of τ, and `metrics["calibration"]` records the target, τ, what it achieved on
the calibration data (the validation split) and, when the data has a test split, what it gives there.
"""

import copy
from typing import Any

from ease.calibration import calibrate, measured
from ease.data import DataBundle
from ease.model.backbone import Backbone
from ease.routing import CalibrateConfig
from ease.training import Trainer


def calibrate_routing(trainer: Trainer, model: Backbone, data: DataBundle, config: CalibrateConfig) -> dict[str, Any]:
    """Calibrate on data.val, set τ on every exit of `trainer.config` and `model`; returns the record."""
    exits = trainer.config.exit_layers
    stats = trainer.token_stats(model, data.val, exits)
    result = calibrate(stats, exits, config)
    tau = result.threshold
    routed = copy.copy(trainer.config)  # a stage config cannot be rebuilt with dataclasses.replace
    routed.routing_threshold = routed.routing_thresholds = (tau,) * len(exits)
    trainer.config = routed
    model.set_routing(exits, routed.routing_thresholds)
    record: dict[str, Any] = {"on": "val", "exit_layers": list(exits), **result.to_dict()}
    if config.metric == "quality":
        record["bound"] = {"epsilon": config.epsilon, "delta": config.delta, "p_value": result.p_value}
    if data.test is not None:
        if hasattr(trainer, "split"):  # task=eval's cached passes are keyed by split
            trainer.split = "test"
        record["test"] = measured(trainer.token_stats(model, data.test, exits), exits, tau, config)
        if hasattr(trainer, "split"):
            trainer.split = "val"
    return record
