"""ASHEM (Adaptive Supervision via Hard Example Mining) on LEGO blocks (seed 002).

Block 1 (layers 1..k) is trained as a standard LM on every token. Its exit confidence (max softmax at layer
k by default) then splits the tokens: the `hard_example_ratio` least confident are "hard". Block 2 (layers
k+1..L) is added on top (`Backbone.extended`), the embedding, Block 1 and (by default) the shared norm +
head are frozen, and Block 2 is trained on the hard tokens only. At inference a token exits at layer k
when its confidence reaches the threshold, else it runs to layer L.

On a pretrained L-layer model (`ASHEMConfig.phase1="skip"`) its layers 1..k are Block 1 as they are: no
phase 1 and no growth; the threshold comes from its layer k and its own layers k+1..L are trained on the
hard tokens.

    config.py   ASHEMConfig
    cache.py    HardExamples: Block 1's cached exit states, confidences and the threshold
    batches.py  phase-2 batches of the windows holding hard tokens
    phases.py   phase 1 (the standard Trainer) and phase 2 (the hard-token loss on the cache), both on `fit`
    flow.py     run_ashem: the two phases, growth and freezing, the final routed evaluation, resume
"""

from ease.model.surgery import freeze_lower_layers, params_unchanged
from ease.strategies.ashem.batches import HardExampleBatches, create_hard_example_loader
from ease.strategies.ashem.cache import (
    HardExamples,
    cache_exit_states,
    collect_hard_examples,
    compute_confidence,
    compute_confidence_threshold,
    confidence_quantile,
)
from ease.strategies.ashem.config import HARD_EXAMPLE_SOURCES, PHASE1_MODES, ASHEMConfig
from ease.strategies.ashem.flow import ASHEMProgress, ASHEMResult, check_resume_mode, run_ashem
from ease.strategies.ashem.phases import (
    Phase2State,
    evaluate_on_hard_examples,
    evaluate_routed_from_cache,
    train_phase1,
    train_phase2,
    train_upper_layers,
)

__all__ = [
    "HARD_EXAMPLE_SOURCES",
    "PHASE1_MODES",
    "ASHEMConfig",
    "ASHEMProgress",
    "ASHEMResult",
    "HardExampleBatches",
    "HardExamples",
    "Phase2State",
    "cache_exit_states",
    "check_resume_mode",
    "collect_hard_examples",
    "compute_confidence",
    "compute_confidence_threshold",
    "confidence_quantile",
    "create_hard_example_loader",
    "evaluate_on_hard_examples",
    "evaluate_routed_from_cache",
    "freeze_lower_layers",
    "params_unchanged",
    "run_ashem",
    "train_phase1",
    "train_phase2",
    "train_upper_layers",
]
