"""Early-exit curricula (LayerSkip, Elhoushi et al. 2024): which exits get loss at a given optimizer step.

Each curriculum is a pure function of the step, so a resumed run switches the same exits on at the same
steps, and what a run did can be recounted from the number of steps it took. The last layer is always
active. The semantics are torchtune's (`RotationalEarlyExitCurriculum`, `GradualEarlyExitCurriculum`):

- rotational, period R: at step 0 every R-th layer from layer 1 is active (1, 1+R, 1+2R, ...); each step the
  pattern rolls one layer deeper, wrapping around the L layers (np.roll of the L-long mask), so over L steps
  every layer is active equally often.
- gradual, fraction f: layer l becomes active once the share of the run's steps done reaches
  f · (L - l + 1) / L; the exits switch on from the last layer downward and every exit is on from step
  f · total_steps. (torchtune computes the mask of step s from s - 1; here step s uses s itself.)
"""

from collections.abc import Callable
from dataclasses import dataclass

CURRICULA = ("none", "rotational", "gradual")


def rotational_exits(step: int, num_layers: int, period: int) -> frozenset[int]:
    """The exits active at `step` (0-based) under the rotational curriculum of period R."""
    return frozenset(layer for layer in range(1, num_layers + 1) if (layer - 1 - step) % num_layers % period == 0) | {
        num_layers
    }


def gradual_exits(step: int, total_steps: int, num_layers: int, fraction: float = 0.5) -> frozenset[int]:
    """The exits active at `step` (0-based) of `total_steps` under the gradual curriculum."""
    done = step / total_steps
    on = {layer for layer in range(1, num_layers + 1) if done >= fraction * (num_layers - layer + 1) / num_layers}
    return frozenset(on | {num_layers})


@dataclass(frozen=True)
class ExitCurriculum:
    """A curriculum and the layer-weighting scheme it re-normalises over the active exits.

    Attributes:
        kind: rotational | gradual.
        period: rotational: R.
        fraction: gradual: the share of the run after which every exit is on.
        scheme: {active exits} -> {layer: weight} (a LayerSkip scale of `ease.losses` with its e_scale).
    """

    kind: str
    period: int
    fraction: float
    scheme: Callable[[frozenset[int]], dict[int, float]]

    def active(self, step: int, total_steps: int | None, num_layers: int) -> frozenset[int]:
        if self.kind == "rotational":
            return rotational_exits(step, num_layers, self.period)
        if total_steps is None:
            raise ValueError(
                "loss_weights.curriculum: gradual needs the run's total steps (train.max_epochs or max_steps)"
            )
        return gradual_exits(step, total_steps, num_layers, self.fraction)

    def weights(self, step: int, total_steps: int | None, num_layers: int) -> dict[int, float]:
        """The layer weights in force at `step`."""
        return self.scheme(self.active(step, total_steps, num_layers))

    def record(self, steps: int, total_steps: int | None, num_layers: int) -> dict:
        """What the curriculum did over steps 0..steps-1: per layer the number of steps it had loss."""
        counts = dict.fromkeys(range(1, num_layers + 1), 0)
        for step in range(steps):
            for layer in self.active(step, total_steps, num_layers):
                counts[layer] += 1
        out = {"kind": self.kind, "steps": steps, "active_steps": counts}
        if self.kind == "rotational":
            out["period"] = self.period
        else:
            out.update(fraction=self.fraction, total_steps=total_steps)
        return out
