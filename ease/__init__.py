"""EASE: Efficient Asymmetric Supervision for Early-Exit Transformers.

Every early-exit training method is a configuration: per-layer loss weights (with an optional α schedule),
per-layer learning-rate scales, and confidence routing at inference.
"""

from ease.ashem import (
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
from ease.config import (
    StageConfig,
    TrainingConfig,
    UniversalConfig,
    create_deep_supervision_config,
    create_standard_config,
)
from ease.decoding import KV_MODES, EarlyExitDecoder, StepOutput
from ease.evaluation import TokenStats, collect_token_stats, threshold_rows
from ease.generation import GenerationResult, SamplingConfig, TokenSampler, generate
from ease.model import (
    DEEDTransformer,
    DeepSupervisionTransformer,
    EarlyExitTransformer,
    RoutedOutput,
    StandardTransformer,
)
from ease.presets import PRESET_ALIASES, PRESETS
from ease.routed_eval import evaluate_routed, skip_routed_forward
from ease.routing import CONFIDENCE_MEASURES, compute_cost, normalize_routing, route_by_confidence
from ease.schedule import AlphaSchedule
from ease.seed import set_seed
from ease.token_routed import TokenRoutedTrainer, TokenRoutedTransformer, token_routed_loss
from ease.trainer import EarlyStoppingState, EpochResult, NonFiniteLossError, Trainer, UniversalTrainer

__version__ = "0.1.0"

__all__ = [
    "CONFIDENCE_MEASURES",
    "KV_MODES",
    "PRESETS",
    "PRESET_ALIASES",
    "ASHEMConfig",
    "AlphaSchedule",
    "DEEDTransformer",
    "DeepSupervisionTransformer",
    "EarlyExitDecoder",
    "EarlyExitTransformer",
    "EarlyStoppingState",
    "EpochResult",
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
