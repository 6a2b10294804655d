"""task=generate: continue a prompt from a saved checkpoint with real early exit, and time it.

`python train.py task=generate checkpoint=RUN_DIR prompt="The game"` loads the model and its tokenizer,
decodes `task.max_new_tokens` tokens per row with the KV-cached early-exit decoder (`ease.inference.generation`), and
records the text, each token's exit layer, tokens/s, mean layers per token and the speedup over the same
decoder at full depth. Routing is the checkpoint's own unless `routing=confidence` is given on the command
line (then routing.exit_layer / routing.threshold / routing.confidence apply).

Bounds: `task.max_new_tokens` is at most 4096 (`MAX_NEW_TOKENS`; for a Hugging Face backbone also below its
position limit); a prompt longer than the context (the checkpoint's training data.seq_len, and for a Hugging
Face backbone no more than its max_position_embeddings) keeps its last tokens, with a warning naming how many
were dropped.
"""

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ease.app import build
from ease.checkpoint import load_checkpoint, resolve_checkpoint_path
from ease.data.tokenizers import tokenizer_from_dict
from ease.inference.generation import SamplingConfig, generate, generate_speculative, prompt_budget
from ease.inference.speculative import check_speculative
from ease.model.mod import MixtureOfDepths

log = logging.getLogger("ease")

GENERATED_FILE = "generated.txt"


def sampling_config(cfg: DictConfig) -> SamplingConfig:
    """The task group's decoding settings, validated; errors name the Hydra key (task.*)."""
    t = cfg.task
    try:
        return SamplingConfig(t.max_new_tokens, t.temperature, t.top_k, t.batch_size, t.kv_mode, t.decoder)
    except ValueError as err:
        raise ValueError(f"task.{err}") from None


def checkpoint_context(ckpt: dict[str, Any]) -> int | None:
    """The sequence length the checkpoint was trained on (its config's data.seq_len), or None if unrecorded."""
    config = ckpt.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    seq_len = data.get("seq_len") if isinstance(data, dict) else None
    return seq_len if isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len >= 1 else None


def generate_task(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Load `cfg.checkpoint`, continue `cfg.prompt`, return the metrics (text, exits, speed)."""
    sampling = sampling_config(cfg)
    if cfg.prompt is None or not str(cfg.prompt).strip():
        raise ValueError('prompt: task=generate needs prompt="TEXT" (the text to continue)')
    path = resolve_checkpoint_path(cfg.checkpoint, "generate")
    model, ckpt = load_checkpoint(path, map_location=cfg.device)
    if not ckpt.get("tokenizer"):
        raise ValueError(f"checkpoint: {path} holds no tokenizer to encode the prompt with")
    tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    if cfg.routing.kind == "confidence":
        exit_layer, threshold = build.routing_settings(cfg)
        try:
            model.set_routing(exit_layer, threshold)
        except ValueError as err:
            raise build.hydra_key_error(err) from None
        model.confidence = cfg.routing.confidence
        routing_source = "config"
    else:
        routing_source = "checkpoint"
    context = checkpoint_context(ckpt)
    try:  # checked here so a Hugging Face backbone's position limit is named as task.max_new_tokens
        prompt_budget(model, sampling.max_new_tokens, context)
    except ValueError as err:
        raise ValueError(f"task.{err}") from None
    model.to(cfg.device)
    if cfg.task.mode == "speculative":
        return speculative_task(cfg, model, tokenizer, sampling, context, path, output_dir)
    if isinstance(model, MixtureOfDepths):  # counts the routed decoding's block computations (the predictor's)
        model.reset_counts()
    result = generate(
        model,
        tokenizer,
        str(cfg.prompt),
        sampling.max_new_tokens,
        sampling.temperature,
        sampling.top_k,
        seed=cfg.seed,
        batch_size=sampling.batch_size,
        kv_mode=sampling.kv_mode,
        decoder=sampling.decoder,
        threads=cfg.threads or 1,  # decoding is single-threaded unless threads= says otherwise
        max_context=context,
        threshold_decay=cfg.routing.threshold_decay if cfg.routing.kind == "confidence" else None,
    )
    lines = []
    for i, (text, exits) in enumerate(zip(result.texts, result.exit_layers)):
        lines.append(f"--- row {i} (exit layers: {' '.join(map(str, exits))})\n{text}\n")
    (output_dir / GENERATED_FILE).write_text("\n".join(lines), encoding="utf-8")
    print(result.text, file=sys.stdout)
    log.info(
        "generated %d x %d tokens: %.0f tokens/s, %.2f layers/token (compute %.1f%%), speedup %.2fx over full "
        "depth (theoretical %.2fx)",
        sampling.batch_size, sampling.max_new_tokens, result.tokens_per_s, result.mean_layers_per_token,
        100 * result.compute_cost, result.speedup, result.theoretical_speedup,
    )  # fmt: skip
    record = {
        **result.to_dict(),
        "checkpoint": str(path),
        "routing_source": routing_source,
        "num_parameters": model.num_parameters(),
    }
    if isinstance(model, MixtureOfDepths):
        record["mod"] = {"inference": "predictor", "compute_cost": model.compute_cost}
    return record


def speculative_task(
    cfg: DictConfig, model: Any, tokenizer: Any, sampling: SamplingConfig, context: int | None, path: Path, out: Path
) -> dict[str, Any]:
    """task.mode=speculative: lossless self-speculative decoding, timed against full depth (same cache code)."""
    draft_exit = cfg.task.draft_exit if cfg.task.draft_exit is not None else model.exit_layers[0]
    try:
        check_speculative(model, draft_exit, cfg.task.num_speculations)
    except ValueError as err:
        raise ValueError(f"{err} (the model has {model.num_layers} layers)") from None
    result = generate_speculative(
        model, tokenizer, str(cfg.prompt), sampling.max_new_tokens, sampling.temperature, sampling.top_k,
        seed=cfg.seed, batch_size=sampling.batch_size, draft_exit=draft_exit,
        num_speculations=cfg.task.num_speculations, adaptive=cfg.task.adaptive, threads=cfg.threads or 1,
        max_context=context,
    )  # fmt: skip
    lines = [f"--- row {i}\n{text}\n" for i, text in enumerate(result["texts"])]
    (out / GENERATED_FILE).write_text("\n".join(lines), encoding="utf-8")
    print(result["texts"][0], file=sys.stdout)
    same = {True: "yes", False: "NO", None: "not compared (sampling)"}[result["exact_match"]]
    log.info(
        "speculative (draft layers 1-%d, k=%d%s): acceptance %.1f%%, %.1f tokens/round, %.0f tokens/s, %.2fx over "
        "full depth (predicted %.2fx); same text as full-depth greedy: %s",
        draft_exit, cfg.task.num_speculations, ", adaptive" if cfg.task.adaptive else "", 100 * result["acceptance"],
        result["tokens_per_round"], result["tokens_per_s"], result["speedup"], result["predicted_speedup"], same,
    )  # fmt: skip
    return {**result, "checkpoint": str(path), "num_parameters": model.num_parameters()}
