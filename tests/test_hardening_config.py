"""Bad configuration fails before training, in one line naming the key.

- a key the schema does not have, added with `+` (`+modle=tiny`, `+model.foo=1`), is refused with difflib's
  suggestion; keys under the free dicts (`callbacks`, `model.hf_config`) stay allowed;
- `+sweep=NAME` without `-m`; a seed torch.manual_seed cannot take; a device this machine does not have;
- a job or study name that is a path (`..`, `/`, `\\`);
- over-long messages are cut in the middle; a bad `hydra.sweeper.storage` names the URL, its password hidden.

The end-to-end cases (exit code, the one line, no record claiming success) are rows of tests/test_bad_inputs.py.
"""

import warnings

import pytest
import sqlalchemy
import torch
from conftest import FAST, compose, train_py
from omegaconf import OmegaConf

from ease.app import studies
from ease.app.errors import MAX_MESSAGE, one_line_error, shorten
from ease.app.runner import check_hydra, validate
from ease.app.schema import (
    SEED_RANGE,
    check_device,
    check_keys,
    check_plain_name,
    check_seed,
    check_sweep_mode,
    unknown_key_message,
)

# keys, the schema's


def test_typo_key_suggests_the_close_field() -> None:
    assert unknown_key_message("modle", ["model", "data", "seed"]) == "modle: not a config key; did you mean model?"
    assert unknown_key_message("model.dimm", ["dim", "num_layers"]) == (
        "model.dimm: not a config key; did you mean model.dim?"
    )
    assert unknown_key_message("xyz", ["model", "seed"]) == "xyz: not a config key; the keys are model, seed"
    assert unknown_key_message("model.foo", ["dim"]) == "model.foo: not a config key; the keys of model are dim"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+modle=tiny", "modle: not a config key; did you mean model?"),
        ("++sed=1", "sed: not a config key; did you mean seed?"),
        ("+model.foo=1", "model.foo: not a config key; the keys of model are num_layers, dim"),
        ("+train.lrr=0.1", "train.lrr: not a config key; did you mean train.lr?"),
        ("+task.splt=test", "task.splt: not a config key; did you mean task.split?"),
    ],
)
def test_plus_key_outside_the_schema_is_refused(override: str, message: str) -> None:
    cfg = compose([*FAST, override])  # Hydra takes it: `+` opens the struct
    with pytest.raises(ValueError) as info:
        validate(cfg)
    assert str(info.value).startswith(message)


def test_keys_under_free_dicts_and_hydra_are_allowed() -> None:
    check_keys(compose(["model=hf_tiny_gpt2", "+model.hf_config.n_inner=64"]))
    check_keys(compose(["+callbacks.stop._target_=my.Callback", "+callbacks.stop.epoch=1"]))
    check_keys(compose(FAST, hydra_config=True))  # the `hydra` node beside the schema's keys
    check_keys({"seed": 1, "routing": {"exit_layer": {"any": "thing"}}})  # an Any field holds anything


# seed


def test_seed_range_is_what_torch_accepts() -> None:
    low, high = SEED_RANGE
    for seed in (low, -1, 0, 2**63 - 1, high):
        check_seed(seed)
        torch.manual_seed(seed)
    for seed in (low - 1, high + 1):
        with pytest.raises(ValueError):
            torch.manual_seed(seed)  # the range's ends are torch's own
        with pytest.raises(ValueError, match=rf"^seed: must be an int in \[{low}, {high}\], got {seed}$"):
            check_seed(seed)
    torch.manual_seed(0)


@pytest.mark.parametrize("seed", [True, 1.5, float("nan"), "3", None])
def test_seed_must_be_an_int(seed) -> None:
    with pytest.raises(ValueError, match=r"^seed: must be an int in "):
        check_seed(seed)


def test_seed_out_of_range_fails_in_validation() -> None:
    with pytest.raises(ValueError, match=r"^seed: must be an int in \[-9223372036854775808, 18446744073709551615\]"):
        validate(compose([*FAST, "seed=18446744073709551616"]))
    validate(compose([*FAST, "seed=-1"]))  # negative seeds work (taken modulo 2**64 by torch)


# device


def test_cuda_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError) as info:
            check_device(device)
        assert (
            str(info.value) == f"device: {device} is not available on this machine (torch.cuda.is_available() is False)"
        )


def test_cuda_index_beyond_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(
        ValueError, match=r"^device: cuda:2 is not available on this machine \(torch.cuda.device_count\(\) is 2"
    ):
        check_device("cuda:2")


def test_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: mps is not available on this machine \(torch.backends.mps"):
        check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_device("mps")
    check_device("mps:0")
    with pytest.raises(ValueError, match=r"^device: mps:1 is not available"):
        check_device("mps:1")


@pytest.mark.parametrize("device", ["gpu", "cudax", "cuda:", "cuda:-1", "cpu:0", "CPU", ""])
def test_device_spelling(device: str) -> None:
    with pytest.raises(ValueError, match=r"^device: must be cpu, cuda\[:N\] or mps, got "):
        check_device(device)


def test_device_checked_in_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: cuda is not available"):
        validate(compose([*FAST, "device=cuda"]))
    check_device("cpu")


# names and modes Hydra turns into paths or runs


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "..", "x..y", "/abs"])
def test_names_that_are_paths(name: str) -> None:
    with pytest.raises(ValueError) as info:
        check_plain_name("hydra.job.name", name)
    assert str(info.value) == f"hydra.job.name: must be a plain name (no '/', '\\' or '..'), got {name!r}"


@pytest.mark.parametrize("name", ["train", "alpha_optuna", "exp-5.v2", "ease"])
def test_plain_names(name: str) -> None:
    check_plain_name("hydra.sweeper.study_name", name)


def test_sweep_needs_multirun() -> None:
    for override in ("+sweep=alpha_grid", "sweep=alpha_grid", "++sweep=pareto"):
        with pytest.raises(ValueError) as info:
            check_sweep_mode(["model=tiny", override], multirun=False)
        assert str(info.value) == (f"sweep: {override} needs -m (multirun); without it only one plain run would happen")
        check_sweep_mode([override], multirun=True)
    check_sweep_mode(["+preset=deed", "hydra.sweeper.n_trials=3", "sweeps=1"], multirun=False)


def _hydra(mode: str, task: list[str], job: str = "train", study: str | None = None):
    hc = {"mode": mode, "overrides": {"task": task}, "job": {"name": job}, "sweeper": {}}
    if study is not None:
        hc["sweeper"]["study_name"] = study
    return OmegaConf.create(hc)


def test_check_hydra() -> None:
    from hydra.types import RunMode

    check_hydra(_hydra(RunMode.RUN, ["model=tiny"]))
    check_hydra(_hydra(RunMode.MULTIRUN, ["+sweep=alpha_grid"], study="alpha_optuna"))
    with pytest.raises(ValueError, match=r"^sweep: \+sweep=alpha_grid needs -m"):
        check_hydra(_hydra(RunMode.RUN, ["+sweep=alpha_grid"]))
    with pytest.raises(ValueError, match=r"^hydra.job.name: must be a plain name"):
        check_hydra(_hydra(RunMode.RUN, [], job="../../x"))
    with pytest.raises(ValueError, match=r"^hydra.sweeper.study_name: must be a plain name"):
        check_hydra(_hydra(RunMode.MULTIRUN, [], study="../../../../elsewhere/x"))


# long messages


def test_long_list_is_cut_in_the_middle() -> None:
    values = [1.0] * 5000
    message = f"loss_weights.weights: custom needs one weight per layer (3), got {values}"
    assert len(message) > 20_000
    short = shorten(message)
    assert len(short) <= MAX_MESSAGE
    assert short.startswith("loss_weights.weights: custom needs one weight per layer (3), got [1.0, 1.0")
    assert short.endswith("1.0, 1.0]") and " ... " in short
    assert one_line_error(ValueError(message)) == short


def test_long_message_keeps_key_and_end() -> None:
    message = "model.name_or_path: " + " ".join(f"word{i}" for i in range(400)) + " the end"
    short = shorten(message)
    assert len(short) <= MAX_MESSAGE
    assert short.startswith("model.name_or_path: word0") and short.endswith("the end")
    quoted = "data.data_dir: no such folder: '" + "x" * 3000 + "' (give an absolute path)"
    assert shorten(quoted).endswith("' (give an absolute path)") and len(shorten(quoted)) <= MAX_MESSAGE


def test_short_message_unchanged() -> None:
    message = "routing.threshold: must be in [0, 1], got 1.5"
    assert shorten(message) == message
    assert shorten("x" * MAX_MESSAGE) == "x" * MAX_MESSAGE


# storage


def test_safe_url_hides_the_password() -> None:
    assert studies.safe_url("postgresql://ease:s3cret@db.example:5432/optuna") == (
        "postgresql://ease:***@db.example:5432/optuna"
    )
    assert studies.safe_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert "s3cret" not in studies.safe_url("not a url://ease:s3cret@host")


def test_malformed_storage() -> None:
    with pytest.raises(ValueError, match=r"^hydra.sweeper.storage: not a database URL: 'notaurl' \("):
        studies.ensure_storage("notaurl", study_name="s")


def test_storage_folder_that_cannot_be_made() -> None:
    with pytest.raises(ValueError, match=r"^hydra.sweeper.storage: cannot open sqlite:////proc/x/y.db: cannot create"):
        studies.ensure_storage("sqlite:////proc/x/y.db", study_name="s")


def test_storage_folder_not_writable(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studies.os, "access", lambda path, mode: False)  # root writes anywhere: pretend not
    with pytest.raises(
        ValueError, match=rf"^hydra.sweeper.storage: cannot open sqlite:///{tmp_path}/y.db: .* is not writable"
    ):
        studies.ensure_storage(f"sqlite:///{tmp_path}/y.db", study_name="s")


def test_unreachable_database_hides_the_password() -> None:
    url = "postgresql+psycopg://ease:s3cret@127.0.0.1:1/nodb"
    with pytest.raises(ValueError) as info:
        studies.study_trials(url, "s")
    assert str(info.value).startswith(
        "hydra.sweeper.storage: cannot open postgresql+psycopg://ease:***@127.0.0.1:1/nodb: "
    )
    assert "s3cret" not in str(info.value)


def test_bad_study_name_makes_no_folder(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/optuna/../../elsewhere/x.db"
    with pytest.raises(ValueError, match=r"^hydra.sweeper.study_name: must be a plain name"):
        studies.ensure_storage(url, study_name="../../elsewhere/x")
    with pytest.raises(ValueError, match=r"^hydra.sweeper.study_name: must be a plain name"):
        studies.fail_stale_trials(url, "../../elsewhere/x")
    assert not (tmp_path.parent / "elsewhere").exists()


def test_seed_resolver_stops_the_sweeper_in_one_line() -> None:
    studies.register_resolvers()
    cfg = OmegaConf.create(
        {"hydra": {"sweeper": {"storage": "notaurl", "study_name": "s"}}, "seed": "${ease_resume_seed:0}"}
    )
    with pytest.raises(Exception) as info:
        cfg.seed
    assert one_line_error(info.value).startswith("hydra.sweeper.storage: not a database URL: 'notaurl'")


def test_driver_error_reports_the_refusal() -> None:
    with pytest.raises(ValueError):
        studies.ensure_storage("sqlite:////proc/x/y.db", study_name="s")
    err = sqlalchemy.exc.OperationalError("connect", {}, Exception("unable to open database file"))
    assert one_line_error(err).startswith("hydra.sweeper.storage: cannot open sqlite:////proc/x/y.db: cannot create")


def test_callback_warning_of_a_refusal_is_silenced() -> None:
    studies.register_resolvers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(
            "Callback OptunaStudyCallback.on_multirun_start raised ValueError: hydra.sweeper.storage: x", stacklevel=1
        )
        warnings.warn("Callback OptunaStudyCallback.on_multirun_start raised KeyError: other", stacklevel=1)
    assert [str(w.message) for w in caught] == ["Callback OptunaStudyCallback.on_multirun_start raised KeyError: other"]


def test_storage_error_is_exactly_one_line(tmp_path) -> None:
    """End to end: the whole stderr is the one error line, without the password."""
    proc = train_py("-m", "+sweep=alpha_optuna", *FAST, "hydra.sweeper.storage=postgresql+psycopg://ease:s3cret@127.0.0.1:1/nodb",
                    f"hydra.sweep.dir={tmp_path}/sweep")  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        "error: hydra.sweeper.storage: cannot open postgresql+psycopg://ease:***@127.0.0.1:1/nodb: "
    )
    assert "s3cret" not in proc.stderr + proc.stdout
