"""data=files at scale: tokenization throughput and peak memory for generated corpora of 10 MB and 100 MB.

    python benchmarks/corpus.py            # writes benchmarks/corpus.json and benchmarks/corpus.md

Each corpus (JSON lines of random words from a 5,000-word vocabulary, 50-500 words a document) is tokenized
with the word tokenizer (fitted on the first 2 MB) in a fresh subprocess, whose peak resident memory
(ru_maxrss) is what the table reports: the target is that 10× the corpus costs at most 1.2× the memory. The
time includes reading, hashing, fitting, tokenizing and writing the memory-mapped token file.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent


def make_corpus(path: Path, megabytes: int) -> None:
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
import resource, sys, time
from ease.data import DataConfig, build_data
t0 = time.perf_counter()
data = build_data(DataConfig(name="files", paths=[sys.argv[1]], cache_dir=sys.argv[2], vocab_size=8000,
                             max_chars=2_000_000, val_fraction=0.01, seq_len=64, batch_size=32))
seconds = time.perf_counter() - t0
print(seconds, data.num_train_tokens + data.num_val_tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(megabytes: int, folder: Path) -> dict:
    corpus = folder / f"corpus_{megabytes}mb.jsonl"
    make_corpus(corpus, megabytes)
    done = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(folder / "cache")], capture_output=True,
                          text=True, check=True)  # fmt: skip
    seconds, tokens, rss_kb = done.stdout.split()
    size = corpus.stat().st_size / 1e6
    return {"corpus_mb": round(size, 1), "tokens": int(tokens), "seconds": float(seconds),
            "mb_per_s": size / float(seconds), "peak_rss_mb": int(rss_kb) / 1024}  # fmt: skip


def run(quick: bool = False) -> dict:
    sizes = (2, 20) if quick else (10, 100)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(mb, Path(tmp)) for mb in sizes]
    result = {"rows": rows, "rss_ratio": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]}
    return result


def main() -> None:
    t0 = time.perf_counter()
    result = run("--quick" in sys.argv)
    (OUT / "corpus.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# data=files: tokenization throughput and peak memory", "",
             "`python benchmarks/corpus.py` (word tokenizer, 1 process, this 2-core CPU)", "",
             "| corpus MB | tokens | seconds | MB/s | peak RSS MB |", "|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['corpus_mb']} | {r['tokens']} | {r['seconds']:.1f} | {r['mb_per_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    lines += ["", f"RSS ratio (largest / smallest): {result['rss_ratio']:.2f} (target ≤ 1.2)"]
    (OUT / "corpus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
