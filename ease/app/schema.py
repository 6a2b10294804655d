"""The Hydra app's config: the library's own config classes, one per group, registered in the ConfigStore.

Every group is the library dataclass that owns it (`ModelConfig`, `DataConfig`, `LossWeightsConfig`,
`LrScalesConfig`, `RoutingConfig`, `ScheduleConfig`, `StrategyConfig`, `TrainConfig`), plus the app's own
`TaskConfig`. Hydra types every key from them, so a mistyped key or a wrong type fails at composition;
`ease.app.build` turns each group into its object with `OmegaConf.to_object`, whose `__post_init__` checks
the values and names the key of a bad one, before any data is read or training starts.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ease.config import LrScalesConfig
from ease.data import DataConfig
from ease.inference.decoder import KV_MODES
from ease.inference.generation import DECODERS
from ease.losses import LossWeightsConfig
from ease.model.config import ModelConfig
from ease.routing import RoutingConfig
from ease.schedule import ScheduleConfig
from ease.strategies import StrategyConfig
from ease.training.config import TrainConfig

TASKS = ("train", "eval", "generate")
SPLITS = ("val", "test")
OBJECTIVES = ("ppl", "acc", "compute_cost", "shallow_ratio", "loss")


@dataclass
class TaskConfig:
    """The `task` group: train, or score / continue a saved checkpoint.

    Attributes:
        name: train | eval | generate.
        split: eval: val | test.
        checkpoint_data: eval: rebuild the data as the checkpoint was trained (its data settings and seed).
        cache_stats: eval: keep the per-token pass beside the checkpoint, so a threshold sweep runs the model once.
        max_new_tokens, temperature, top_k, batch_size, kv_mode, decoder: generate (`SamplingConfig`).
    """

    name: str = "train"
    split: str = "val"
    checkpoint_data: bool = True
    cache_stats: bool = True
    max_new_tokens: int = 50
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    batch_size: int = 1  # prompts decoded together (the prompt repeated)
    kv_mode: str = "propagate"  # propagate (CALM state copying) | recompute
    decoder: str = "auto"  # auto (fused for the native model) | fused | reference (any backbone)

    def __post_init__(self) -> None:
        choices = (("name", TASKS), ("split", SPLITS), ("kv_mode", KV_MODES), ("decoder", DECODERS))
        for key, allowed in choices:
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"task.{key}: must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    lr_scales: LrScalesConfig = field(default_factory=LrScalesConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    objective: list[str] = field(default_factory=lambda: ["ppl"])  # metric(s) returned to the sweeper
    checkpoint: str | None = None  # a checkpoint.pt to evaluate or generate from (task=eval/generate)
    prompt: str | None = None  # text to continue (task=generate)
    compile: bool = False  # torch.compile the model where it wins (see docs/speed.md)
    resume: bool = False  # continue from checkpoint.pt in hydra.run.dir
    save_checkpoint: bool = True
    progress: bool = True  # tqdm bar while training
    debug: bool = False  # show full tracebacks instead of one-line errors
    # {name: {_target_: CLASS, ...}}: objects whose on_epoch_end(epoch, history_row) runs after each epoch's checkpoint
    callbacks: dict[str, Any] = field(default_factory=dict)


def check_top_level(cfg: Any) -> None:
    """The top-level keys no group owns (read from the composed config, without building the groups)."""
    for name in cfg.objective:
        if name not in OBJECTIVES:
            raise ValueError(f"objective: must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    if not cfg.objective:
        raise ValueError(f"objective: needs at least one of {', '.join(OBJECTIVES)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {cfg.threads}")
    if not (cfg.device == "cpu" or cfg.device.startswith(("cuda", "mps"))):
        raise ValueError(f"device: must be cpu, cuda[:N] or mps, got {cfg.device!r}")
    if isinstance(cfg.seed, float) and not math.isfinite(cfg.seed):
        raise ValueError(f"seed: must be an int, got {cfg.seed}")


def register_configs(root: str | Path) -> None:
    """Put the schema into Hydra's ConfigStore as `base_config` (config.yaml lists it first), and define
    `${ease_root:}`, the project folder, so outputs/ and the Optuna database never depend on the cwd."""
    project_root = str(Path(root).resolve())

    def ease_root() -> str:
        return project_root

    OmegaConf.register_resolver("ease_root", ease_root, replace=True)
    from ease.app.studies import register_resolvers  # the sweeper's seed resolver, for `--cfg hydra` too

    register_resolvers()
    ConfigStore.instance().store(name="base_config", node=Config, replace=True)
