"""Training strategies beyond plain weighted training. Each supplies losses, phases and data to the one
training loop (`ease.training.loop.fit`); none has a loop of its own.

    token_routed  seed 000: each token trains only the route it takes (a Trainer with another batch loss)
    ashem         seed 002: Block 1 on all tokens, Block 2 on the hard ones, routing at the top of Block 1

The standard strategy is `ease.training.Trainer` itself. The Hydra app's edge for all three is
`ease.app.train_task`; `StrategyConfig` is the `strategy` group it reads.
"""

from dataclasses import dataclass, fields

from ease.losses import check_min_route_fraction
from ease.strategies.ashem.config import ASHEMConfig

STRATEGIES = ("standard", "ashem", "token_routed")


@dataclass
class StrategyConfig:
    """The `strategy` group: which strategy, and its settings (ASHEMConfig's fields; the token-routed guard).

    Attributes:
        name: standard | ashem | token_routed.
        hard_example_ratio, phase1_layers, phase1_lr, phase1_patience, phase2_layers, phase2_lr,
        phase2_patience, hard_examples_from, phase2_train_head, phase1: ASHEM (see
            `ease.strategies.ashem.ASHEMConfig`); phase1=skip runs ASHEM on a pretrained model.
        min_route_fraction: token-routed training: each route keeps at least this share of every batch.
    """

    name: str = "standard"
    hard_example_ratio: float = 0.5
    phase1_layers: int = 2
    phase1_lr: float = 1e-3
    phase1_patience: int = 1
    phase2_layers: int = 4
    phase2_lr: float = 1e-4
    phase2_patience: int = 3
    hard_examples_from: str = "train"
    phase2_train_head: bool = False
    phase1: str = "train"
    min_route_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"strategy.name: must be one of {', '.join(STRATEGIES)}, got {self.name!r}")
        if self.name == "ashem":
            self.ashem()
        if self.name == "token_routed":
            try:
                check_min_route_fraction(self.min_route_fraction)
            except ValueError as err:
                raise ValueError(f"strategy.{err}") from None

    def ashem(self, confidence: str = "max_prob", max_epochs: int = 50) -> ASHEMConfig:
        """The ASHEMConfig of these settings; errors name the Hydra key (strategy.*, routing.confidence, ...)."""
        own = {f.name: getattr(self, f.name) for f in fields(ASHEMConfig) if hasattr(self, f.name)}
        try:
            return ASHEMConfig(**own, confidence=confidence, max_epochs=max_epochs)
        except ValueError as err:
            message = str(err)
            name = message.split(":", 1)[0]
            key = {"confidence": "routing.confidence", "max_epochs": "train.max_epochs"}.get(name, f"strategy.{name}")
            message = message.replace("phase1_layers (", "strategy.phase1_layers (")
            message = message.replace("with phase1=", "with strategy.phase1=")
            raise ValueError(key + message[len(name) :]) from None
