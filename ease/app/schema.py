"""Structured-config schemas for the Hydra app, registered in Hydra's ConfigStore.

They type every group the code reads, so a mistyped key or a wrong type fails when Hydra composes the
config, before anything runs. Range checks live in the library's own dataclasses (TrainingConfig,
DataConfig, ASHEMConfig), which `ease.app.build` constructs from these at the edge.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class ModelSchema:
    num_layers: int = 3
    dim: int = 64
    num_heads: int = 4
    hidden_dim: int | None = None  # SwiGLU width; None = 2/3 of 4*dim, rounded up to 16
    dropout: float = 0.0
    tie_weights: bool = False


@dataclass
class DataSchema:
    name: str = "wikitext2"  # wikitext2 | synthetic
    data_dir: str | None = None  # None: $EASE_DATA_DIR, then ./data/wikitext-2, ~/.cache/ease/wikitext-2
    split: str = "train"
    fallback_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    max_chars: int | None = 200_000
    tokenizer: str = "word"  # word | char | bpe
    vocab_size: int = 1000
    seq_len: int = 64
    val_fraction: float = 0.1
    shuffle: bool = True
    drop_last: bool = False
    synthetic_tokens: int = 40_000
    synthetic_vocab_size: int = 64
    synthetic_deterministic_fraction: float = 0.5


@dataclass
class LossWeightsSchema:
    kind: str = "final_only"  # final_only | uniform | asymmetric | shallow_deep | with_middle | custom
    alpha: float = 0.7  # weight of the shallow exit (asymmetric, shallow_deep, with_middle); last layer gets 1-α
    middle: float = 1.0  # weight of every layer between the shallow exit and the last (with_middle)
    shallow_layer: int | None = None  # where α goes; None = the first routing exit layer
    # custom: one weight per layer, shallowest first (a list, so an override replaces it whole).
    weights: list[float] = field(default_factory=list)


@dataclass
class LrScalesSchema:
    kind: str = "uniform"  # uniform | decreasing | increasing | custom
    # One scale per layer, shallowest first. decreasing/increasing hold seed 001's 3-layer lists and are
    # resampled (piecewise-linearly over depth) for other depths; custom must give exactly num_layers values.
    scales: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    embedding: float | None = None  # None: layer 1's scale
    head: float = 1.0  # shared final norm + output head


@dataclass
class RoutingSchema:
    kind: str = "none"  # none | confidence
    exit_layer: Any = 1  # int, or a list for a cascade
    threshold: Any = 0.0  # float, or one per exit layer
    confidence: str = "max_prob"  # max_prob | top2_margin | neg_entropy
    # The threshold curve every run records from its final evaluation pass (seed 003's table).
    analysis_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])


@dataclass
class ScheduleSchema:
    kind: str = "constant"  # constant | linear | cosine
    start: float | None = None  # None: loss_weights.alpha
    end: float | None = None


@dataclass
class StrategySchema:
    name: str = "standard"  # standard | ashem | token_routed
    # ASHEM (seed 002)
    hard_example_ratio: float = 0.5
    phase1_layers: int = 2
    phase1_lr: float = 1e-3
    phase1_patience: int = 1
    phase2_layers: int = 4
    phase2_lr: float = 1e-4
    phase2_patience: int = 3
    hard_examples_from: str = "val"  # val | train: data the threshold and hard tokens come from
    phase2_train_head: bool = False  # also train the shared norm + head in phase 2 (moves the layer-k exit)
    # token-routed training (seed 000): each route keeps at least this share of every batch's tokens
    min_route_fraction: float = 0.05


@dataclass
class TrainSchema:
    max_epochs: int = 50
    patience: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    monitor: str = "loss"  # validation metric for early stopping: loss | ppl | routed_loss


@dataclass
class TaskSchema:
    name: str = "train"  # train | eval | generate
    # eval: score `checkpoint` under the routing group's settings, without training
    split: str = "val"  # val | test
    checkpoint_data: bool = True  # rebuild the data as the checkpoint was trained (its data settings and seed)
    cache_stats: bool = True  # keep the per-token pass beside the checkpoint: a threshold sweep runs the model once
    # generate: continue `prompt` from `checkpoint`
    max_new_tokens: int = 50
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    batch_size: int = 1  # prompts decoded together (the prompt repeated)
    kv_mode: str = "propagate"  # propagate (CALM state copying) | recompute
    decoder: str = "auto"  # auto (fused for the native model) | fused | reference (any backbone)


@dataclass
class Config:
    model: ModelSchema = field(default_factory=ModelSchema)
    data: DataSchema = field(default_factory=DataSchema)
    loss_weights: LossWeightsSchema = field(default_factory=LossWeightsSchema)
    lr_scales: LrScalesSchema = field(default_factory=LrScalesSchema)
    routing: RoutingSchema = field(default_factory=RoutingSchema)
    schedule: ScheduleSchema = field(default_factory=ScheduleSchema)
    strategy: StrategySchema = field(default_factory=StrategySchema)
    task: TaskSchema = field(default_factory=TaskSchema)
    train: TrainSchema = field(default_factory=TrainSchema)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    objective: list[str] = field(default_factory=lambda: ["ppl"])  # metric(s) returned to the sweeper
    checkpoint: str | None = None  # a checkpoint.pt to evaluate or generate from (task=eval/generate)
    prompt: str | None = None  # text to continue (task=generate)
    compile: bool = False  # torch.compile the model where it wins (see README, Speed)
    resume: bool = False  # continue from checkpoint.pt in hydra.run.dir
    save_checkpoint: bool = True
    progress: bool = True  # tqdm bar while training
    debug: bool = False  # show full tracebacks instead of one-line errors
    # {name: {_target_: CLASS, ...}}: objects whose on_epoch_end(epoch, history_row) runs after each epoch's checkpoint
    callbacks: dict[str, Any] = field(default_factory=dict)


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
