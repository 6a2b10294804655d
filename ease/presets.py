"""The seeds' named configurations (3-layer model), as fresh TrainingConfig objects.

They reproduce methods; they are not recommendations (seed 000). The registry of presets is conf/preset/
(`python train.py +preset=NAME`); this module is its Python face for the presets that are a TrainingConfig,
with the same names, and a test holds every entry equal to its YAML file. The strategy presets (ashem,
token_routed) are flows, not configs: they exist as YAML only. Aliases are the names seed 001 used.
"""

import copy
from collections.abc import Iterator, Mapping

from ease.config import TrainingConfig
from ease.losses import asymmetric, final_only, sum_l, uniform

_L = 3
_DEFINITIONS: dict[str, TrainingConfig] = {
    # Last layer only, no routing.
    "standard_llm": TrainingConfig(layer_weights=final_only(_L), routing_threshold=0.0),
    # Deep supervision (Lee et al., 2015) = seed 001's LPT.
    "deep_supervision": TrainingConfig(layer_weights=uniform(_L), routing_threshold=0.0),
    # DEED (Tang et al., 2023): deep supervision + confidence exit at L1.
    "deed": TrainingConfig(layer_weights=uniform(_L), exit_layer=1, routing_threshold=0.7),
    # Self-distillation to the exits (Zhang et al., 2019): DEED's weights and exit; the KL term is the YAML's
    # `distill` group, which a TrainingConfig does not hold.
    "self_distill": TrainingConfig(layer_weights=uniform(_L), exit_layer=1, routing_threshold=0.7),
    # Auxiliary loss (Elbayad et al., 2020) = seed 001's standard_routing.
    "auxiliary_loss": TrainingConfig(layer_weights=asymmetric(_L, 0.5), exit_layer=1, routing_threshold=0.95),
    # Seed 003's asymmetric α=0.7 (setting A) = seed 001's asymmetric_best.
    "asymmetric": TrainingConfig(layer_weights=asymmetric(_L, 0.7), exit_layer=1, routing_threshold=0.95),
    # LPT + early exit (seed 001).
    "lpt_routing": TrainingConfig(layer_weights=uniform(_L), exit_layer=1, routing_threshold=0.7),
    # α on L1, 1.0 on L2, 1-α on L3: seed 003's setting B.
    "asymmetric_with_l2": TrainingConfig(
        layer_weights=asymmetric(_L, 0.7, middle=1.0), exit_layer=1, routing_threshold=0.95
    ),
    # Seed 001's layer-wise learning rates on top of asymmetric α=0.7 (ULMFiT, Howard & Ruder 2018).
    "layer_lr_decreasing": TrainingConfig(
        layer_weights=asymmetric(_L, 0.7), routing_threshold=0.95, layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1}
    ),
    "layer_lr_increasing": TrainingConfig(
        layer_weights=asymmetric(_L, 0.7), routing_threshold=0.95, layer_lr_scales={1: 0.1, 2: 0.5, 3: 1.0}
    ),
    # LayerSkip (Elhoushi et al., 2024): sum_l early-exit scales with every exit on (its curriculum and layer
    # dropout are the YAML's loss_weights / layer_dropout groups), confidence exit at L1.
    "layerskip": TrainingConfig(layer_weights=sum_l(_L), exit_layer=1, routing_threshold=0.9),
    # CALM (Schuster et al., 2022): deep supervision, exits at L1 and L2 by a learned classifier; the YAML adds the
    # classifier's training and the Learn-then-Test calibration that replaces this threshold.
    "calm": TrainingConfig(
        layer_weights=uniform(_L), exit_layer=[1, 2], routing_threshold=0.9, confidence="classifier"
    ),
}
PRESET_ALIASES = {
    "lpt": "deep_supervision",
    "standard_routing": "auxiliary_loss",
    "asymmetric_best": "asymmetric",
    "asymmetric_lr_decreasing": "layer_lr_decreasing",
    "asymmetric_lr_increasing": "layer_lr_increasing",
}
STRATEGY_PRESETS = ("ashem", "token_routed")  # YAML only: see the module docstring
MODEL_PRESETS = ("mod",)  # YAML only: Mixture-of-Depths is a model wrapper (the `mod` group), not a TrainingConfig


class _Presets(Mapping[str, TrainingConfig]):
    """Read-only mapping that hands out a fresh copy, so editing one never changes the preset."""

    def __getitem__(self, name: str) -> TrainingConfig:
        key = PRESET_ALIASES.get(name, name)
        if key not in _DEFINITIONS:
            raise KeyError(f"preset: unknown name {name!r}; known: {sorted([*_DEFINITIONS, *PRESET_ALIASES])}")
        return copy.deepcopy(_DEFINITIONS[key])

    def __iter__(self) -> Iterator[str]:
        return iter([*_DEFINITIONS, *PRESET_ALIASES])

    def __len__(self) -> int:
        return len(_DEFINITIONS) + len(PRESET_ALIASES)


PRESETS: Mapping[str, TrainingConfig] = _Presets()
