"""EASE: Efficient Asymmetric Supervision for Early-Exit Transformers.

Every early-exit training method is a configuration: per-layer loss weights (with an optional α schedule),
per-layer learning-rate scales, and confidence routing at inference.
"""

from ease.config import (
    StageConfig,
    TrainingConfig,
    UniversalConfig,
    create_deep_supervision_config,
    create_standard_config,
)
from ease.evaluation import TokenStats, collect_token_stats, threshold_rows
from ease.inference import (
    KV_MODES,
    EarlyExitDecoder,
    FusedDecoder,
    GenerationResult,
    SamplingConfig,
    StepOutput,
    TokenSampler,
    evaluate_routed,
    generate,
    skip_routed_forward,
)
from ease.losses import token_routed_loss
from ease.model import (
    Backbone,
    DEEDTransformer,
    DeepSupervisionTransformer,
    EarlyExitTransformer,
    RoutedOutput,
    StandardTransformer,
)
from ease.presets import PRESET_ALIASES, PRESETS
from ease.routing import CONFIDENCE_MEASURES, compute_cost, normalize_routing, route_by_confidence
from ease.schedule import AlphaSchedule
from ease.seed import set_seed
from ease.strategies.ashem import (
    ASHEMConfig,
    HardExamples,
    collect_hard_examples,
    compute_confidence,
    compute_confidence_threshold,
    create_hard_example_loader,
    evaluate_on_hard_examples,
    run_ashem,
    train_upper_layers,
)
from ease.strategies.token_routed import TokenRoutedTrainer, TokenRoutedTransformer
from ease.training import EarlyStoppingState, EpochResult, NonFiniteLossError, Trainer, UniversalTrainer, fit

__version__ = "0.1.0"

__all__ = [
    "CONFIDENCE_MEASURES",
    "KV_MODES",
    "PRESETS",
    "PRESET_ALIASES",
    "ASHEMConfig",
    "AlphaSchedule",
    "Backbone",
    "DEEDTransformer",
    "DeepSupervisionTransformer",
    "EarlyExitDecoder",
    "EarlyExitTransformer",
    "EarlyStoppingState",
    "EpochResult",
    "FusedDecoder",
    "GenerationResult",
    "HardExamples",
    "NonFiniteLossError",
    "RoutedOutput",
    "SamplingConfig",
    "StageConfig",
    "StandardTransformer",
    "StepOutput",
    "TokenRoutedTrainer",
    "TokenRoutedTransformer",
    "TokenSampler",
    "TokenStats",
    "Trainer",
    "TrainingConfig",
    "UniversalConfig",
    "UniversalTrainer",
    "collect_hard_examples",
    "collect_token_stats",
    "compute_confidence",
    "compute_confidence_threshold",
    "compute_cost",
    "create_deep_supervision_config",
    "create_hard_example_loader",
    "create_standard_config",
    "evaluate_on_hard_examples",
    "evaluate_routed",
    "fit",
    "generate",
    "normalize_routing",
    "route_by_confidence",
    "run_ashem",
    "set_seed",
    "skip_routed_forward",
    "threshold_rows",
    "token_routed_loss",
    "train_upper_layers",
]
