"""benchmarks/width_grid.py's edges: the CUDA arguments (checked on CPU), results.json merging, gpu.sh parsing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import width_grid  # noqa: E402


def test_cuda_arguments_write_their_own_file() -> None:
    args = width_grid.parse_args(["--device", "cuda", "--dims", "256,1024", "--quick"])
    assert args.device == "cuda" and args.dims == [256, 1024] and args.quick
    assert args.out.name == "gpu_results.json"  # never the CPU grid's file
    args = width_grid.parse_args(["--device", "cuda", "--out", "/tmp/gpu_x.json"])
    assert args.out == Path("/tmp/gpu_x.json")
    cpu = width_grid.parse_args([])
    assert cpu.device == "cpu" and cpu.dims == [512, 256, 1024] and cpu.out.name == "width_grid.json"
    with pytest.raises(SystemExit):
        width_grid.parse_args(["--layers", "eight"])


def test_merge_keeps_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"training": {"x": 1}, "generation": {"rows": [1], "speedup_b1": 9.0}}))
    gen = {
        f"b{b}": {
            "speedup": s,
            "speedup_over_theoretical": s / 2,
            "theoretical_speedup": 2.0,
            "early_exit_fraction": 0.5,
        }
        for b, s in ((1, 1.8), (8, 1.1), (32, 1.2))
    }
    best = {"speedup": 1.5, "acceptance": 0.9, "draft_exit": 2, "k": 4, "speedup_over_predicted": 0.8}
    spec = {"best": best, "exact_match": True, "rows": [best, {**best, "speedup": 1.1}]}
    row = {"dim": 512, "layers": 8, "generation": gen, "speculative": spec}
    width_grid.merge_results(row, path)
    out = json.loads(path.read_text())
    assert out["training"] == {"x": 1} and out["generation"]["rows"] == [1]
    assert out["generation"]["speedup_b1"] == 1.8 and out["generation"]["speedup_b8_over_full"] == 1.1
    assert out["generation"]["speedup_over_theoretical_b1"] == 0.9
    assert out["speculative"]["exact_match"] is True and out["speculative"]["speedup_b1"] == 1.5
    assert out["speculative"]["acceptance"] == 0.9 and out["speculative"]["median_speedup"] == 1.3


def test_gpu_script_parses_and_names_cuda() -> None:
    script = REPO / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "--device cuda" in text and "gpu_results.json" in text
