"""The Hydra app's config: the library's own config classes, one per group, registered in the ConfigStore.

Every group is the library dataclass that owns it (`ModelConfig`, `DataConfig`, `LossWeightsConfig`,
`LrScalesConfig`, `RoutingConfig`, `ScheduleConfig`, `StrategyConfig`, `TrainConfig`), plus the app's own
`TaskConfig` and `LoggerConfig` (ease/app/loggers.py). Hydra types every key from them, so a mistyped key or a
wrong type fails at composition; `ease.app.build` turns each group into its object with `OmegaConf.to_object`,
whose `__post_init__` checks the values and names the key of a bad one, before any data is read or training
starts. A key added with `+` passes composition (Hydra opens the struct for it), so `check_keys` refuses one the
schema lacks; `check_top_level` also checks the seed against torch's range and that the device exists on this machine.
"""

import dataclasses
import datetime
import difflib
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ease.app.loggers import LoggerConfig
from ease.comparison import CompareConfig
from ease.config import LrScalesConfig
from ease.data import DataConfig
from ease.distillation import DistillConfig
from ease.inference.decoder import KV_MODES
from ease.inference.generation import DECODERS
from ease.losses import LossWeightsConfig
from ease.model.config import ModelConfig
from ease.model.layer_dropout import LayerDropoutConfig
from ease.model.mod import MoDConfig
from ease.routing import RoutingConfig
from ease.schedule import ScheduleConfig
from ease.strategies import StrategyConfig
from ease.training.config import TrainConfig

TASKS = ("train", "eval", "generate")
GENERATE_MODES = ("early_exit", "speculative")
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
            max_new_tokens is at most 4096 (a fixed cap, `MAX_NEW_TOKENS`; for a Hugging Face backbone also below
            its position limit); a prompt longer than the checkpoint's training data.seq_len keeps its last tokens.
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
    # generate: early_exit (each token stops at its confidence exit) | speculative (lossless: draft with layers
    # 1..draft_exit, verify with the rest; ease.inference.speculative)
    mode: str = "early_exit"
    draft_exit: int | None = None  # speculative: E (None: the checkpoint's first exit layer)
    num_speculations: int = 4  # speculative: tokens drafted per round (the most, with adaptive)
    adaptive: bool = False  # speculative: draft length follows the acceptance

    def __post_init__(self) -> None:
        choices = (
            ("name", TASKS), ("split", SPLITS), ("kv_mode", KV_MODES), ("decoder", DECODERS), ("mode", GENERATE_MODES)
        )  # fmt: skip
        for key, allowed in choices:
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"task.{key}: must be one of {', '.join(allowed)}, got {value!r}")
        if isinstance(self.num_speculations, bool) or self.num_speculations < 1:
            raise ValueError(f"task.num_speculations: must be an int >= 1, got {self.num_speculations!r}")
        if self.draft_exit is not None and (isinstance(self.draft_exit, bool) or self.draft_exit < 1):
            raise ValueError(f"task.draft_exit: must be a layer >= 1, got {self.draft_exit!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mod: MoDConfig = field(default_factory=MoDConfig)  # Mixture-of-Depths (off while mod.capacity is null)
    data: DataConfig = field(default_factory=DataConfig)
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    lr_scales: LrScalesConfig = field(default_factory=LrScalesConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    layer_dropout: LayerDropoutConfig = field(default_factory=LayerDropoutConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)  # methods at equal compute (ease.comparison)
    distill: DistillConfig = field(default_factory=DistillConfig)
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
    # The Optuna trial this job is (set by hydra/sweeper=ease_optuna for each job; ease.app.pruning reports to it)
    optuna_trial: int | None = None


# What torch.manual_seed accepts (a negative seed is taken modulo 2**64); a bigger int overflows there.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _schema_class(hint: Any) -> type | None:
    """The dataclass a field holds (also inside `X | None`), or None: keys under a dict or Any field are free."""
    if dataclasses.is_dataclass(hint):
        return hint
    classes = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
    return classes[0] if len(classes) == 1 else None


def unknown_key_message(key: str, names: list[str]) -> str:
    """`KEY: not a config key; did you mean NAME?` (difflib's closest field), else the keys there are."""
    parent, _, leaf = key.rpartition(".")
    prefix = parent + "." if parent else ""
    close = difflib.get_close_matches(leaf, names, n=1)
    if close:
        return f"{key}: not a config key; did you mean {prefix}{close[0]}?"
    return f"{key}: not a config key; the keys{' of ' + parent if parent else ''} are {', '.join(names)}"


def check_keys(cfg: Any, schema: type = Config, prefix: str = "") -> None:
    """Refuse a key the schema does not have: `+key=value` adds any key (Hydra opens the struct for it), so
    `+modle=tiny` or `+model.foo=1` would otherwise pass and be ignored. Keys under a free dict (`callbacks`,
    `model.hf_config`) or an Any field are allowed; so is `hydra` at the top."""
    plain = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    if not isinstance(plain, Mapping):
        return
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in plain.items():
        key = str(key)
        if key not in names:
            if not prefix and key == "hydra":
                continue
            raise ValueError(unknown_key_message(prefix + key, names))
        inner = _schema_class(hints[key])
        if inner is not None and isinstance(value, Mapping):
            check_keys(value, inner, f"{prefix}{key}.")


def check_seed(seed: Any) -> None:
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise ValueError(f"seed: must be an int in [{low}, {high}], got {seed!r}")


def check_device(device: Any) -> None:
    """cpu, cuda[:N] or mps, and present on this machine (before any data is read or a model is built)."""
    import torch

    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", str(device))
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ValueError(f"device: must be cpu, cuda[:N] or mps, got {device!r}")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device} is not available on this machine (torch.cuda.is_available() is False)")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ValueError(
                f"device: {device} is not available on this machine (torch.cuda.device_count() is {count}: "
                f"cuda:0..cuda:{count - 1})"
            )
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"device: {device} is not available on this machine (torch.backends.mps.is_available() is False)"
            )
        if index not in (None, "0"):
            raise ValueError(f"device: {device} is not available on this machine (mps has one device, mps:0)")


def check_plain_name(key: str, value: Any) -> None:
    """A name Hydra or Optuna turns into a file or folder name: no path separator, no `..`."""
    name = str(value)
    if "/" in name or "\\" in name or ".." in name:
        raise ValueError(f"{key}: must be a plain name (no '/', '\\' or '..'), got {name!r}")


def check_sweep_mode(overrides: list[str], multirun: bool) -> None:
    """`+sweep=NAME` without `-m` would run once with the sweep's fixed settings and ignore its search."""
    if multirun:
        return
    for override in overrides:
        if re.match(r"^\+{0,2}sweep=", override):
            raise ValueError(f"sweep: {override} needs -m (multirun); without it only one plain run would happen")


def check_top_level(cfg: Any) -> None:
    """The top-level keys no group owns (read from the composed config, without building the groups)."""
    check_keys(cfg)
    for name in cfg.objective:
        if name not in OBJECTIVES:
            raise ValueError(f"objective: must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    if not cfg.objective:
        raise ValueError(f"objective: needs at least one of {', '.join(OBJECTIVES)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {cfg.threads}")
    check_seed(cfg.seed)
    check_device(cfg.device)


_run_time: datetime.datetime | None = None


def run_time() -> datetime.datetime:
    """The time run folders are named after: fixed at first use (or by `set_run_time`, for all ranks)."""
    global _run_time
    if _run_time is None:
        _run_time = datetime.datetime.now()
    return _run_time


def set_run_time(value: datetime.datetime) -> None:
    global _run_time
    _run_time = value


def register_configs(root: str | Path) -> None:
    """Put the schema into Hydra's ConfigStore as `base_config` (config.yaml lists it first), and define
    `${ease_root:}`, the project folder, so outputs/ and the Optuna database never depend on the cwd."""
    project_root = str(Path(root).resolve())

    def ease_root() -> str:
        return project_root

    OmegaConf.register_resolver("ease_root", ease_root, replace=True)
    OmegaConf.register_resolver("ease_now", lambda pattern: run_time().strftime(pattern), replace=True)
    from ease.app.studies import register_resolvers  # the sweeper's seed resolver, for `--cfg hydra` too

    register_resolvers()
    ConfigStore.instance().store(name="base_config", node=Config, replace=True)
