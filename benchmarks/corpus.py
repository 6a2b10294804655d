"""data=files at scale: tokenization throughput and peak memory for generated corpora of 10 MB and 100 MB.

    python benchmarks/corpus.py            # writes benchmarks/corpus.json and benchmarks/corpus.md
    python benchmarks/corpus.py --quick    # 2 MB and 20 MB, prints only

Each corpus (JSON lines of random words from a 5,000-word vocabulary, 50-500 words a document) is tokenized
with the word tokenizer (vocab 8,000, fitted on the first 2 MB) by `build_data` in a fresh subprocess, so the
peak memory is that corpus's alone. The child reports its `ru_maxrss` (peak resident memory, file-backed
pages included) and the peak of its anonymous memory (`RssAnon` of /proc/self/status, sampled every 5 ms):
the target is that 10x the corpus costs at most 1.2x the memory. The time (after imports) covers hashing,
fitting, reading, tokenizing and writing the token files; a second build in the same child times a cache
hit. The largest corpus is also tokenized with `data.num_proc=2` (identical token files; its memory figures
are the main process's only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent


def make_corpus(path: Path, megabytes: int) -> None:
    """JSON lines of random words, about `megabytes` MB."""
    rng = np.random.default_rng(0)
    words = np.array([f"word{i}" for i in range(5000)])
    target = megabytes * 1_000_000
    written = 0
    with path.open("w") as f:
        while written < target:
            line = json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(50, 500))))}) + "\n"
            f.write(line)
            written += len(line)


CHILD = """
import json, resource, sys, threading, time
peak = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(":")[0]
                if name in peak:
                    peak[name] = max(peak[name], int(line.split()[1]))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from ease.data import DataConfig, build_data
cfg = DataConfig(name="files", paths=[sys.argv[1]], cache_dir=sys.argv[2], vocab_size=8000, max_chars=2_000_000,
                 val_fraction=0.01, seq_len=64, batch_size=32, num_proc=int(sys.argv[3]))
t0 = time.perf_counter()
data = build_data(cfg)
seconds = time.perf_counter() - t0
t1 = time.perf_counter()
build_data(cfg)
hit = time.perf_counter() - t1
print(json.dumps({"seconds": seconds, "cache_hit_seconds": hit, "tokens": data.num_train_tokens + data.num_val_tokens,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mb": peak["RssAnon"] / 1024, "peak_file_mb": peak["RssFile"] / 1024}))
"""


def measure(corpus: Path, cache: Path, num_proc: int = 1) -> dict:
    """Tokenize `corpus` into an empty cache in a fresh process; its figures."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(cache), str(num_proc)], capture_output=True,
                          text=True, check=True, env=env)  # fmt: skip
    row = json.loads(done.stdout.strip().splitlines()[-1])
    size = corpus.stat().st_size / 1e6
    return {"corpus_mb": round(size, 1), "num_proc": num_proc, **row, "mb_per_s": size / row["seconds"]}


def run(quick: bool = False) -> dict:
    """Every row, and the peak-memory ratios of the largest corpus to the smallest (one process each)."""
    sizes = (2, 20) if quick else (10, 100)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for mb in sizes:
            corpus = Path(tmp) / f"corpus_{mb}mb.jsonl"
            make_corpus(corpus, mb)
            rows.append(measure(corpus, Path(tmp) / f"cache_{mb}"))
        rows.append(measure(corpus, Path(tmp) / f"cache_{sizes[-1]}_np2", num_proc=2))
    return {
        "rows": rows,
        "rss_ratio": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"],
        "anon_ratio": rows[1]["peak_anon_mb"] / rows[0]["peak_anon_mb"],
        "cpus": os.cpu_count(),
    }


def main() -> None:
    t0 = time.perf_counter()
    quick = "--quick" in sys.argv
    result = run(quick)
    lines = [
        "# data=files: tokenization throughput and peak memory",
        "",
        f"`python benchmarks/corpus.py`: JSON lines of random words, word tokenizer (vocab 8,000), {result['cpus']} "
        "CPU cores, each corpus tokenized in a fresh process (time after imports; a cache hit is a second build).",
        "",
        "| corpus MB | num_proc | tokens | seconds | MB/s | cache hit s | peak RSS MB | peak anonymous MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['corpus_mb']} | {r['num_proc']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['mb_per_s']:.1f} | "
            f"{r['cache_hit_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} |"
        )
    lines += [
        "",
        f"Peak RSS ratio, largest / smallest corpus (one process): {result['rss_ratio']:.2f} (target ≤ 1.2); "
        f"anonymous memory: {result['anon_ratio']:.2f}.",
    ]
    if not quick:
        (OUT / "corpus.json").write_text(json.dumps(result, indent=2) + "\n")
        (OUT / "corpus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
