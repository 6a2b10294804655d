"""Per-row lengths against the old common-length rule, on random (untrained) native models: a quick check.

    python benchmarks/speculative_rows.py --old fbd01d2 --dim 64

A seeded random model (6 layers, vocabulary 200, a scaled-up head so its layers agree now and then) decodes 64
greedy tokens after a 10-token prompt, at batch 1 and 8, by `SelfSpeculativeDecoder` (E = 2, k = 4) and by the
decoder of git revision `--old`, alternately, 15 times; the medians are printed with the rounds and the load
average (the CPU may be shared). No file is written.
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.speculative import old_decoder  # noqa: E402
from ease.inference.speculative import SelfSpeculativeDecoder  # noqa: E402
from ease.model import EarlyExitTransformer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision of the decoder to compare with")
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    old = old_decoder(args.old)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = EarlyExitTransformer(200, args.dim, 6, num_heads=4).eval()
    with torch.no_grad():
        model.output_head.weight.mul_(30.0)
    g = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        prompt = torch.randint(0, 200, (batch, 10), generator=g)
        seconds, rounds = {"old": [], "new": []}, {}
        for rep in range(15):
            pair = [("new", SelfSpeculativeDecoder), ("old", old)]
            for name, cls in pair if rep % 2 == 0 else pair[::-1]:
                _, st = cls(model, 2, 4).generate(prompt, 64)
                seconds[name].append(st.seconds)
                rounds[name] = st.rounds
        o, n = statistics.median(seconds["old"]), statistics.median(seconds["new"])
        print(
            f"dim {args.dim} batch {batch}: old {batch * 64 / o:.0f} tokens/s ({rounds['old']} rounds), new "
            f"{batch * 64 / n:.0f} tokens/s ({rounds['new']} rounds), new / old {o / n:.3f}; "
            f"load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
