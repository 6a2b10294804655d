"""EASE's standard-LM training step against nanoGPT's, at equal dims, batch and optimizer, interleaved.

    python benchmarks/nanogpt.py            # dims 64 and 256, one thread; writes benchmarks/nanogpt.json/.md

nanoGPT's `model.py` is re-implemented here for the comparison only (GPT: learned positions, LayerNorm without
bias, causal SDPA attention, 4×GELU MLP, tied head; AdamW as its `configure_optimizers` builds it on CPU, i.e.
not fused). EASE runs its public path: `Trainer.train_steps` on the native `EarlyExitTransformer` with the
standard-LM config (loss on the last layer), `Trainer.create_optimizer` (AdamW, one group per layer),
gradient clipping at 1.0 for both. The two differ in architecture as the projects do: EASE has RMSNorm,
rotary positions and a SwiGLU sized to the 4× MLP's parameters (`ease/model`). Steps alternate in chunks
of 10; the figure is the median step time of each over 6 chunks, after warm-up. This is a measurement only:
no kernel work has been done on the EASE side yet.
"""

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ease.config import create_standard_config
from ease.data import TokenBatches
from ease.model import EarlyExitTransformer
from ease.training import Trainer

OUT = Path(__file__).resolve().parent


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, bias=False)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq_len, dim)
        self.h = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def compare(dim: int, layers: int, heads: int, vocab: int = 1000, seq: int = 64, batch: int = 32,
            chunks: int = 6, steps: int = 10) -> dict:  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (seq * batch * (chunks * steps + 2) + 1,))
    batches = TokenBatches(ids, seq_len=seq, batch_size=batch, shuffle=True, seed=0)
    ease = EarlyExitTransformer(vocab, dim, layers, num_heads=heads)
    trainer = Trainer(create_standard_config(layers), vocab, grad_clip=1.0)
    ease_opt = trainer.create_optimizer(ease, 1e-3)
    gpt = GPT(vocab, dim, layers, heads, seq)
    gpt_opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3, weight_decay=0.0)

    def gpt_steps(n: int) -> None:
        for b in range(n):
            x, y = batches.batch(0, b % len(batches))
            loss = gpt(x, y)
            gpt_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            gpt_opt.step()
            loss.item()

    def ease_steps(n: int) -> None:
        trainer.total_steps = 10**9
        trainer.train_steps(ease, batches, ease_opt, trainer.step + n)

    ease_steps(3)
    gpt_steps(3)  # warm-up
    times = {"ease": [], "nanogpt": []}
    for _ in range(chunks):
        for name, run in (("ease", ease_steps), ("nanogpt", gpt_steps)):
            t0 = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - t0) / steps)
    ease_s, gpt_s = statistics.median(times["ease"]), statistics.median(times["nanogpt"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "dim": dim, "layers": layers, "heads": heads, "batch": batch, "seq_len": seq,
        "ease_tokens_per_s": batch * seq / ease_s, "nanogpt_tokens_per_s": batch * seq / gpt_s,
        "ratio": gpt_s / ease_s, "ease_parameters": count(ease), "nanogpt_parameters": count(gpt),
    }  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    rows = [compare(64, 3, 4), compare(256, 3, 4)]
    result = {"threads": 1, "rows": rows, **{f"over_nanogpt_dim{r['dim']}": r["ratio"] for r in rows}}
    (OUT / "nanogpt.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Training step: EASE standard LM vs nanoGPT (re-implemented), one thread", "",
             "`python benchmarks/nanogpt.py`: 3 layers, 4 heads, vocab 1000, seq 64, batch 32, AdamW lr 1e-3, clip 1.0",
             "", "| dim | EASE tokens/s | nanoGPT tokens/s | EASE / nanoGPT | params EASE / nanoGPT |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['dim']} | {r['ease_tokens_per_s']:.0f} | {r['nanogpt_tokens_per_s']:.0f} | "
                     f"{r['ratio']:.2f} | {r['ease_parameters']} / {r['nanogpt_parameters']} |")  # fmt: skip
    (OUT / "nanogpt.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
