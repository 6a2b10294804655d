"""EASE's standard-LM training step against nanoGPT's, at equal dims, batch and optimizer, interleaved.

    python benchmarks/nanogpt.py            # dims 64 and 256, one thread; writes benchmarks/nanogpt.json/.md
    python -m benchmarks.nanogpt '{"dim": 64, "chunks": 8, "steps": 10}'   # one width, one JSON line (run.py)

nanoGPT's `model.py` is re-implemented here for the comparison only (GPT: learned positions, LayerNorm and
Linear without bias (`bias=False`, its smaller and faster setting), causal SDPA attention, 4×GELU MLP, dropout
modules at p=0, tied head, `ignore_index=-1`), and its optimizer as `configure_optimizers` builds it: AdamW with
a decay group (2-D weights) and a no-decay group, fused only on CUDA, so the for-loop AdamW on CPU. EASE runs
its public path: `Trainer.train_steps` on the native `EarlyExitTransformer` with the standard-LM config (loss on
the last layer) and `Trainer.create_optimizer` (AdamW, one group per layer), gradient clipping at 1.0 for both,
weight decay 0 for both (EASE's default). A third series, `ease_fused_adamw`, is the same EASE trainer with
`create_optimizer(..., fused=True)`: PyTorch's fused AdamW, which nanoGPT's own code would not pick on CPU.

EASE's default architecture differs from nanoGPT's as the projects do: RMSNorm, rotary positions, a SwiGLU
sized to the 4× MLP's parameters and an untied head (`ease/model`). A fourth series, `ease_same_arch`, is the
same EASE trainer on the native model built with nanoGPT's architecture (`norm="layer"`, `positions="learned"`,
`ffn="gelu"`, `tie_weights=True`, `max_positions=seq`): equal architecture and parameters, so its ratio is the
framework's overhead. The series alternate in chunks of `steps` steps after warm-up; each figure is the median
chunk.
"""

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ease.config import create_standard_config
from ease.data import TokenBatches
from ease.model import EarlyExitTransformer
from ease.training import Trainer

OUT = Path(__file__).resolve().parent
DEFAULTS = {"layers": 3, "heads": 4, "vocab": 1000, "seq": 64, "batch": 32, "chunks": 8, "steps": 10}

# --- nanoGPT's model.py, re-implemented -------------------------------------------------------------------


@dataclass
class GPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout_p, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = idx.shape[1]
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))
        for block in tr.h:
            x = block(x)
        logits = self.lm_head(tr.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple, device_type: str):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        use_fused = device_type == "cuda"  # nanoGPT: fused where available and on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))


# --- the interleaved comparison ---------------------------------------------------------------------------


def compare(spec: dict[str, Any]) -> dict[str, Any]:
    """Median step time of EASE, EASE with fused AdamW and nanoGPT, alternating in chunks, at one width."""
    s = {**DEFAULTS, **spec}
    dim, layers, heads, vocab, seq, batch = (s[k] for k in ("dim", "layers", "heads", "vocab", "seq", "batch"))
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (seq * batch * 40 + 1,))
    batches = TokenBatches(ids, seq_len=seq, batch_size=batch, shuffle=True, seed=0)

    def ease_runner(arch: dict[str, Any] | None = None, **adamw: Any) -> tuple[Any, nn.Module]:
        torch.manual_seed(0)
        model = EarlyExitTransformer(vocab, dim, layers, num_heads=heads, **(arch or {}))
        trainer = Trainer(create_standard_config(layers), vocab, grad_clip=1.0)
        optimizer = trainer.create_optimizer(model, 1e-3, 0.0, **adamw)
        trainer.total_steps = 10**9

        def run(n: int) -> None:
            trainer.train_steps(model, batches, optimizer, trainer.step + n)

        return run, model

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=seq, vocab_size=vocab, n_layer=layers, n_head=heads, n_embd=dim))
    gpt_opt = gpt.configure_optimizers(0.0, 1e-3, (0.9, 0.999), "cpu")  # EASE's betas and weight decay
    gpt.train()

    def gpt_steps(n: int) -> None:  # nanoGPT's train.py step, fp32 on CPU (its GradScaler is disabled there)
        for b in range(n):
            x, y = batches.batch(0, b % len(batches))
            _, loss = gpt(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            gpt_opt.step()
            gpt_opt.zero_grad(set_to_none=True)
            loss.item()

    ease_steps, ease = ease_runner()
    fused_steps, _ = ease_runner(fused=True)
    nanogpt_arch = {"norm": "layer", "positions": "learned", "ffn": "gelu", "tie_weights": True, "max_positions": seq}
    same_steps, same = ease_runner(nanogpt_arch)
    runs = {"ease": ease_steps, "ease_fused_adamw": fused_steps, "ease_same_arch": same_steps, "nanogpt": gpt_steps}
    for run in runs.values():
        run(3)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(s["chunks"]):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(s["steps"])
            times[name].append((time.perf_counter() - t0) / s["steps"])
    step = {name: statistics.median(t) for name, t in times.items()}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied weights counted once)
    return {
        "dim": dim, "layers": layers, "heads": heads, "batch": batch, "seq_len": seq, "vocab_size": vocab,
        "chunks": s["chunks"], "steps_per_chunk": s["steps"], "threads": torch.get_num_threads(),
        **{f"{name}_tokens_per_s": batch * seq / sec for name, sec in step.items()},
        "ratio": step["nanogpt"] / step["ease"],
        "ratio_fused_adamw": step["nanogpt"] / step["ease_fused_adamw"],
        "ratio_same_arch": step["nanogpt"] / step["ease_same_arch"],
        "ease_parameters": count(ease), "ease_same_arch_parameters": count(same), "nanogpt_parameters": count(gpt),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| dim | EASE tokens/s | EASE + fused AdamW | EASE, nanoGPT's arch | nanoGPT tokens/s | EASE / nanoGPT | "
        "with fused AdamW | same arch / nanoGPT | params EASE / same arch / nanoGPT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dim']} | {r['ease_tokens_per_s']:.0f} | {r['ease_fused_adamw_tokens_per_s']:.0f} | "
            f"{r['ease_same_arch_tokens_per_s']:.0f} | {r['nanogpt_tokens_per_s']:.0f} | {r['ratio']:.2f} | "
            f"{r['ratio_fused_adamw']:.2f} | {r['ratio_same_arch']:.2f} | "
            f"{r['ease_parameters']} / {r['ease_same_arch_parameters']} / {r['nanogpt_parameters']} |"
        )
    return lines


def main() -> None:
    torch.set_num_threads(1)
    rows = [compare({"dim": 64}), compare({"dim": 256, "chunks": 6, "steps": 5})]
    result = {"threads": 1, "rows": rows, **{f"over_nanogpt_dim{r['dim']}": r["ratio"] for r in rows},
              **{f"over_nanogpt_same_arch_dim{r['dim']}": r["ratio_same_arch"] for r in rows}}  # fmt: skip
    (OUT / "nanogpt.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Training step: EASE standard LM vs nanoGPT (re-implemented), one thread", "",
             "`python benchmarks/nanogpt.py`: 3 layers, 4 heads, vocab 1000, seq 64, batch 32, AdamW lr 1e-3, "
             "weight decay 0, clip 1.0. \"EASE\": the default (Llama-style) native model; \"nanoGPT's arch\": "
             "the native model with `norm=layer positions=learned ffn=gelu tie_weights=true`.", "",
             *table(rows)]  # fmt: skip
    (OUT / "nanogpt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1:  # worker mode (benchmarks/run.py): one width, one JSON line
        spec = json.loads(sys.argv[1])
        torch.set_num_threads(spec.get("threads") or 1)
        print(json.dumps(compare(spec)))
    else:
        main()
