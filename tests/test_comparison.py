"""Methods at equal compute: the compute grid of one run (ease.comparison), its table and plot (ease.results),
and `-m +sweep=methods` end to end."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose, peaky_model, random_batches, train_py

from ease.comparison import CompareConfig, evaluate_grid, fixed_cost_levels
from ease.results import write_results

CHEAP_DECODE = {"decode_prompts": 2, "decode_prompt_len": 4, "decode_tokens": 4, "decode_repeats": 1}


def manual_pass(model, batches, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max-prob confidence at the exit, NLL at the exit, NLL at the last layer) per token, by a loop over layers."""
    confs, nll_exit, nll_last = [], [], []
    with torch.no_grad():
        for x, y in batches:
            h = model.embed(x)
            for i in range(1, model.num_layers + 1):  # the protocol's layers are 1-indexed
                h = model.layer(i, h)
                if i == exit_layer:
                    logits = model.unembed(h).reshape(-1, model.vocab_size).float()
                    confs.append(logits.softmax(-1).max(-1).values)
                    nll_exit.append(F.cross_entropy(logits, y.reshape(-1), reduction="none"))
            logits = model.unembed(h).reshape(-1, model.vocab_size).float()
            nll_last.append(F.cross_entropy(logits, y.reshape(-1), reduction="none"))
    return torch.cat(confs), torch.cat(nll_exit), torch.cat(nll_last)


def manual_grid_level(model, val, test, exit_layer: int, target: float) -> tuple[float, float, float]:
    """τ closest to `target` cost on val (ties: the larger τ), then test (ppl, compute cost) at τ."""
    L = model.num_layers
    conf_val, _, _ = manual_pass(model, val, exit_layer)
    best = None
    for tau in sorted(set(conf_val.double().tolist())):
        cost = torch.where(conf_val.double() >= tau, exit_layer, L).double().mean().item() / L
        if best is None or abs(cost - target) <= abs(best[1] - target):
            best = (tau, cost)
    tau = best[0]
    conf, nll_exit, nll_last = manual_pass(model, test, exit_layer)
    exits = conf.double() >= tau
    nll = torch.where(exits, nll_exit, nll_last).double()
    cost = torch.where(exits, exit_layer, L).double().mean().item() / L
    return tau, math.exp(nll.mean().item()), cost


@pytest.mark.parametrize("backbone", ["native", "hf_llama"])
def test_grid_equals_calibrating_and_evaluating_by_hand(backbone: str) -> None:
    if backbone == "native":
        model = peaky_model(50, 16, 3, 2)
    else:
        from hf_models import tiny

        model = tiny("llama", vocab=50, layers=3, dim=32)
    val, test = random_batches(50, n=3, seed=1), random_batches(50, n=3, seed=2)
    config = CompareConfig(compute_grid=[0.5, 0.7, 0.9], **CHEAP_DECODE)
    grid = evaluate_grid(model, val, test, config, [1])
    assert grid["calibrated_on"] == "val" and grid["evaluated_on"] == "test"
    for row in grid["levels"]:
        tau, ppl, cost = manual_grid_level(model, val, test, 1, row["target"])
        assert row["reachable"] and not row["fixed"]
        assert row["threshold"] == pytest.approx(tau, rel=1e-6)
        assert row["test"]["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert row["test"]["compute_cost"] == pytest.approx(cost, abs=1e-9)
        decode = row["decode"]
        assert decode["tokens_per_s"] > 0 and decode["full_depth_tokens_per_s"] > 0
        assert decode["speedup"] == pytest.approx(decode["tokens_per_s"] / decode["full_depth_tokens_per_s"])
        assert 1 / 3 <= decode["decode_compute_cost"] <= 1.0
    costs = [row["test"]["compute_cost"] for row in grid["levels"]]
    assert costs == sorted(costs) and costs[0] < costs[-1]  # the grid moves the cost


def test_unreachable_levels_are_recorded_not_raised() -> None:
    model = peaky_model(50, 16, 3, 2)
    val, test = random_batches(50, n=2, seed=1), random_batches(50, n=2, seed=2)
    grid = evaluate_grid(model, val, test, CompareConfig(compute_grid=[0.2, 0.8], **CHEAP_DECODE), [1])
    low, high = grid["levels"]
    # exiting every token at L1 of 3 layers costs 1/3: 0.2 is below anything a threshold gives
    assert not low["reachable"] and "compare.compute_grid" in low["why"] and "not reachable" in low["why"]
    assert low["reachable_range"][0] == pytest.approx(1 / 3)
    assert "test" not in low and "decode" not in low
    assert high["reachable"]


def test_a_fixed_cost_method_lands_at_its_nearest_level() -> None:
    own = {"ppl": 30.0, "acc": 0.4, "loss": math.log(30.0), "compute_cost": 0.63}
    rows = fixed_cost_levels(own, [0.5, 0.6, 0.7])
    assert [r["reachable"] for r in rows] == [False, True, False]
    assert all(r["fixed"] for r in rows) and rows[1]["test"] == own
    assert "fixed at 0.6300" in rows[0]["why"]
    model = peaky_model(50, 16, 3, 2)
    config = CompareConfig(compute_grid=[0.5, 0.6, 0.7], fixed_cost=True, **CHEAP_DECODE)
    grid = evaluate_grid(
        model, random_batches(50, n=2), random_batches(50, n=2, seed=3), config, [1], fixed_test_metrics=own
    )
    assert [r["reachable"] for r in grid["levels"]] == [False, True, False]
    assert grid["levels"][1]["decode"]["speedup"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compute_grid": [0.0, 0.5]}, "compare.compute_grid: each level must be in (0, 1], got 0.0"),
        ({"compute_grid": [1.5]}, "compare.compute_grid: each level must be in (0, 1], got 1.5"),
        ({"compute_grid": [0.5, 0.5]}, "compare.compute_grid: levels must be distinct"),
        ({"exit_layer": 0}, "compare.exit_layer: must be a layer >= 1 or null, got 0"),
        ({"decode_tokens": 0}, "compare.decode_tokens: must be an int >= 1, got 0"),
        ({"decode_threads": 0}, "compare.decode_threads: must be >= 1 or null, got 0"),
    ],
)
def test_bad_compare_settings_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        CompareConfig(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_settings_fail_at_validation_before_any_data_is_read() -> None:
    from ease.app.runner import validate

    with pytest.raises(ValueError, match=r"^compare\.compute_grid: each level must be in \(0, 1\], got 2\.0$"):
        validate(compose(["compare=grid", "compare.compute_grid=[0.5,2.0]"]))
    with pytest.raises(ValueError, match=r"^compare\.exit_layer: the compute grid routes at a layer in 1\.\.2"):
        validate(compose(["compare=grid", "compare.exit_layer=3"]))
    validate(compose(["compare=grid", "+preset=ashem", "strategy.phase1_layers=1", "strategy.phase2_layers=3"]))
    defaults = compose([])
    assert list(defaults.compare.compute_grid) == []  # off unless asked for: existing runs are unchanged


# --- the table and the plot from run records --------------------------------------------------------------------


def fake_run(root: Path, name: str, preset: str, seed: int, levels: list[dict]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    record = {
        "status": "ok", "task": "train", "seed": seed, "overrides": [f"+preset={preset}", f"seed={seed}"],
        "metrics": {"ppl": 40.0 + seed, "compute_cost": 1.0, "compute_grid": {"levels": levels}},
    }  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(record))


def level(target: float, ppl: float | None, cost: float = 0.0, speed: float = 100.0, full: float = 80.0) -> dict:
    if ppl is None:
        return {"target": target, "reachable": False, "fixed": False, "why": "not reachable"}
    return {
        "target": target, "reachable": True, "fixed": False, "threshold": 0.5, "val_compute_cost": target,
        "test": {"ppl": ppl, "acc": 0.3, "compute_cost": cost or target},
        "decode": {"tokens_per_s": speed, "full_depth_tokens_per_s": full, "speedup": speed / full,
                   "decode_compute_cost": target},
    }  # fmt: skip


def test_the_table_is_mean_and_std_over_seeds_and_the_plot_is_written(tmp_path: Path) -> None:
    ppl = {("a", 0): [50.0, 40.0], ("a", 1): [52.0, 41.0], ("a", 2): [57.0, 45.0], ("b", 0): [None, 38.0],
           ("b", 1): [60.0, 39.5], ("b", 2): [None, 40.5]}  # fmt: skip
    for i, ((preset, seed), (p50, p100)) in enumerate(ppl.items()):
        fake_run(tmp_path, str(i), preset, seed, [level(0.5, p50, speed=100 + seed), level(1.0, p100, cost=0.99)])
    res = write_results([tmp_path], tmp_path / "out", baseline="preset=a")
    grid = res.grid.set_index(["preset", "target"])
    for (preset, target), column in [(("a", 0.5), 0), (("a", 1.0), 1), (("b", 1.0), 1)]:
        values = [v[column] for (p, _), v in ppl.items() if p == preset]
        row = grid.loc[(preset, target)]
        assert row["n"] == 3 and row["n_unreachable"] == 0
        assert row["test_ppl_mean"] == pytest.approx(statistics.mean(values))
        assert row["test_ppl_std"] == pytest.approx(statistics.stdev(values))
    one = grid.loc[("b", 0.5)]  # two seeds could not reach 50%: n counts the one that did, no std
    assert (
        one["n"] == 1 and one["n_unreachable"] == 2 and one["test_ppl_mean"] == 60.0 and math.isnan(one["test_ppl_std"])
    )
    assert grid.loc[("a", 1.0), "test_compute_cost_mean"] == pytest.approx(0.99)
    assert grid.loc[("a", 0.5), "tokens_per_s_mean"] == pytest.approx(101.0)
    assert grid.loc[("a", 0.5), "speedup_mean"] == pytest.approx(statistics.mean([100 / 80, 101 / 80, 102 / 80]))
    from scipy import stats

    p = stats.ttest_ind([38.0, 39.5, 40.5], [40.0, 41.0, 45.0], equal_var=False).pvalue
    assert grid.loc[("b", 1.0), "ppl_p_holm"] == pytest.approx(p)  # one comparison per level: Holm leaves it
    assert bool(grid.loc[("a", 1.0), "baseline"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Methods at equal compute (test split)" in md
    assert re.search(r"\| a +\| 53\.00 ± 3\.61 \(3\) +\| 42\.00 ± 2\.65 \(3\) +\|", md)
    assert "60.00 (1), 2 unreachable" in md
    png = tmp_path / "out" / "methods_pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (tmp_path / "out" / "results_grid.csv").is_file()


def test_a_fixed_cost_method_shows_at_its_level_marked(tmp_path: Path) -> None:
    own = {"ppl": 31.0, "acc": 0.3, "loss": math.log(31.0), "compute_cost": 0.63}
    for seed in (0, 1):
        fake_run(tmp_path, f"a{seed}", "a", seed, [level(0.6, 30.0 + seed), level(1.0, 29.0 + seed)])
        rows = fixed_cost_levels({**own, "ppl": 31.0 + seed}, [0.6, 1.0])
        rows[0]["decode"] = {"tokens_per_s": 10.0, "full_depth_tokens_per_s": 8.0, "speedup": 1.25}
        fake_run(tmp_path, f"m{seed}", "mod", seed, rows)
    res = write_results([tmp_path], tmp_path / "out", baseline="preset=a")
    row = res.grid.set_index(["preset", "target"]).loc[("mod", 0.6)]
    assert row["fixed"] and row["n"] == 2 and row["test_ppl_mean"] == pytest.approx(31.5)
    assert re.search(r"\| mod +\| 31\.50 ± 0\.71 \(2\) fixed @ 63% +\| unreachable +\|", res.markdown)
    assert "60% (fixed)" in res.markdown


def test_runs_without_a_grid_give_no_section(tmp_path: Path) -> None:
    fake_run(tmp_path, "0", "a", 0, [])
    res = write_results([tmp_path], tmp_path / "out", plots=False)
    assert res.grid.empty and "Methods at equal compute" not in res.markdown


# --- end to end -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_methods_sweep_writes_the_table(tmp_path: Path, wikitext_dir: Path) -> None:
    """`-m +sweep=methods` narrowed to 2 presets x 2 seeds on a tiny model (WikiText-2: the grid needs a test split)."""
    small = ["model=tiny", "data.max_chars=20000", "train.max_epochs=1", "progress=false", "save_checkpoint=false",
             "compare.decode_repeats=1", "compare.decode_tokens=8"]  # fmt: skip
    proc = train_py("-m", "+sweep=methods", *small, "+preset=standard_llm,ashem", "seed=0,1",
                    f"hydra.sweep.dir={tmp_path}", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Methods at equal compute (test split)")[1].split("## Significance")[0]
    for preset in ("standard_llm", "ashem"):
        assert f"| {preset}" in section
    assert "(2)" in section and (tmp_path / "methods_pareto.png").is_file()
    record = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert record["metrics"]["compute_grid"]["evaluated_on"] == "test"
    depths = {json.loads(p.read_text())["config"]["model"]["num_layers"] for p in tmp_path.glob("*/metrics.json")}
    assert depths == {3}  # ASHEM grows to the same depth as the others


def test_sweep_file_lists_the_methods() -> None:
    text = (REPO / "sweeps" / "methods.yaml").read_text()
    assert (
        "+preset: standard_llm,deep_supervision,deed,asymmetric,layerskip,self_distill,calm,mod,ashem,token_routed"
        in text
    )
    assert "override /compare: grid" in text


@pytest.mark.slow
def test_task_eval_on_a_checkpoint_gives_the_training_runs_grid(tmp_path: Path, wikitext_dir: Path) -> None:
    grid = ["compare=grid", "compare.compute_grid=[0.2,0.6,1.0]", "compare.decode_repeats=1", "compare.decode_tokens=8"]
    run = ["model=tiny", "data.max_chars=20000", "train.max_epochs=1", "progress=false", *grid]
    proc = train_py("+preset=deed", *run, f"hydra.run.dir={tmp_path / 'train'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train_py("task=eval", f"checkpoint={tmp_path / 'train'}", "progress=false", *grid,
                    f"hydra.run.dir={tmp_path / 'eval'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, evaluated = (
        json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]["compute_grid"]["levels"]
        for name in ("train", "eval")
    )
    assert [r["reachable"] for r in trained] == [r["reachable"] for r in evaluated] == [False, True, True]
    for a, b in zip(trained[1:], evaluated[1:]):
        assert a["threshold"] == b["threshold"] and a["test"] == b["test"]
