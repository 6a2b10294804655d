"""ASHEMConfig: the settings of the two-phase ASHEM flow (seed 002)."""

import math
from dataclasses import dataclass

from ease.config import StageConfig, TrainingConfig, create_standard_config
from ease.routing import CONFIDENCE_MEASURES

HARD_EXAMPLE_SOURCES = ("val", "train")
PHASE1_MODES = ("train", "skip")


@dataclass
class ASHEMConfig:
    """Settings of the two-phase ASHEM flow (seed 002's fields, plus what the flow needs).

    Attributes:
        phase1_layers: k, the depth of Block 1 and the routing exit layer.
        phase1_lr: learning rate of phase 1 (all of Block 1, embedding and head).
        phase1_patience: early-stopping patience of phase 1 (epochs without improvement).
        hard_example_ratio: share of tokens (lowest confidence first) that count as hard, in (0, 1).
        phase2_layers: L, the depth of the final model; Block 2 is layers k+1..L.
        phase2_lr: learning rate of phase 2 (Block 2 only, unless `phase2_train_head`).
        phase2_patience: early-stopping patience of phase 2, on the hard-token loss of the validation data.
        hard_examples_from: "train" (default: threshold and hard tokens from the training batches, phase 2
            early-stopped on the validation tokens below the same threshold: out of sample) or "val" (the
            seed: threshold and hard tokens from the validation batches; phase 2 then trains and early-stops
            on validation tokens, so validation numbers after phase 2 are in-sample and only the test split
            gives an unbiased figure).
        phase2_train_head: also train the shared final norm + output head in phase 2 (the seed leaves the
            head trainable). Off by default: the head is Block 1's exit too, so training it on hard tokens
            would move layer-k confidences away from the threshold computed on them.
        confidence: confidence measure at the exit ("max_prob" is the seed's).
        max_epochs: epoch limit of each phase.
        phase1: "train" (the seed: train a fresh k-layer Block 1, then grow it to L layers) or "skip" (a
            pretrained L-layer model: its layers 1..k are Block 1 as they are; no phase 1, no growth, its own
            layers k+1..L are trained on the hard tokens). With "skip", `phase1_lr` and `phase1_patience`
            are unused and `phase2_train_head` must stay off.
    """

    phase1_layers: int = 2
    phase1_lr: float = 1e-3
    phase1_patience: int = 1
    hard_example_ratio: float = 0.5
    phase2_layers: int = 4
    phase2_lr: float = 1e-4
    phase2_patience: int = 3
    hard_examples_from: str = "train"
    phase2_train_head: bool = False
    confidence: str = "max_prob"
    max_epochs: int = 50
    phase1: str = "train"

    def __post_init__(self) -> None:
        r = self.hard_example_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
            raise ValueError(f"hard_example_ratio: must be in (0, 1), got {r}")
        for name in ("phase1_layers", "phase2_layers", "phase1_patience", "phase2_patience", "max_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if self.phase2_layers <= self.phase1_layers:
            raise ValueError(
                f"phase2_layers: must be > phase1_layers ({self.phase1_layers}) so Block 2 has layers, "
                f"got {self.phase2_layers}"
            )
        for name in ("phase1_lr", "phase2_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value}")
        if self.hard_examples_from not in HARD_EXAMPLE_SOURCES:
            allowed = ", ".join(HARD_EXAMPLE_SOURCES)
            raise ValueError(f"hard_examples_from: must be one of {allowed}, got {self.hard_examples_from!r}")
        if self.phase1 not in PHASE1_MODES:
            raise ValueError(f"phase1: must be one of {', '.join(PHASE1_MODES)}, got {self.phase1!r}")
        if self.phase1 == "skip" and self.phase2_train_head:
            raise ValueError(
                "phase2_train_head: must be false with phase1=skip (the shared head is the pretrained Block 1's "
                "exit: training it would move the layer-k confidences the threshold came from)"
            )
        if self.confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence: must be one of {sorted(CONFIDENCE_MEASURES)}, got {self.confidence!r}")

    @property
    def skip_phase1(self) -> bool:
        """True when Block 1 is the given pretrained model's layers 1..k (`phase1="skip"`)."""
        return self.phase1 == "skip"

    @property
    def exit_layer(self) -> int:
        """Tokens are routed at the top of Block 1."""
        return self.phase1_layers

    @property
    def stages(self) -> tuple[StageConfig, StageConfig]:
        """The two LEGO blocks: layers 1..k (loss at k) and k+1..L (loss at L)."""
        k, L = self.phase1_layers, self.phase2_layers
        return StageConfig(layers=(1, k)), StageConfig(layers=(k + 1, L))

    def phase1_config(self) -> TrainingConfig:
        """Phase 1: Block 1 as a standard LM on its last layer, no routing (seed: create_standard_config)."""
        return create_standard_config(self.phase1_layers)

    def phase2_config(self, threshold: float) -> TrainingConfig:
        """Phase 2 and inference: loss on layer L, routing at layer k with the computed threshold."""
        return TrainingConfig(
            stages=[self.stages[1]], exit_layer=self.exit_layer, routing_threshold=threshold, confidence=self.confidence
        )


# --- confidences and the threshold ------------------------------------------------------------------------
