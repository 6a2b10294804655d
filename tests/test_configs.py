"""Every YAML under conf/ (recursively, sweeps included) composes, and every preset builds a valid run config."""

from pathlib import Path

import pytest
from conftest import REPO, compose
from omegaconf import OmegaConf

from ease.app import build
from ease.app.runner import validate
from ease.presets import MODEL_PRESETS, PRESETS, STRATEGY_PRESETS

CONF = REPO / "conf"


def group_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML below conf/, following the sweep symlink; hydra/ plugins excluded."""
    out = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if rel.parts[0] == "hydra" or len(rel.parts) == 1:
            continue
        out.append(("/".join(rel.parts[:-1]), path.stem))
    sweep = CONF / "sweep"
    if sweep.is_symlink():  # rglob does not descend into symlinked folders
        out += [("sweep", p.stem) for p in sorted(sweep.resolve().glob("*.yaml"))]
    return out


def override_for(group: str, option: str) -> str:
    # preset and sweep are not in the defaults list: they are appended with '+'.
    return f"+{group}={option}" if group in ("preset", "sweep") else f"{group}={option}"


def test_every_group_has_options() -> None:
    groups = {g for g, _ in group_options()}
    for group in ("model", "data", "loss_weights", "lr_scales", "routing", "schedule", "strategy", "task", "preset"):
        assert group in groups, f"conf/{group}/ is missing"


@pytest.mark.parametrize(("group", "option"), group_options(), ids=lambda v: str(v))
def test_every_yaml_composes(group: str, option: str) -> None:
    cfg = compose([override_for(group, option)], hydra_config=group == "sweep")
    if (group, option) == ("model", "hf"):  # a pretrained model's depth is its own unless set
        assert cfg.model.num_layers is None and cfg.model.backbone == "hf"
    else:
        assert cfg.model.num_layers >= 1
    if group not in ("preset", "sweep"):
        chosen = OmegaConf.select(cfg, group.replace("/", "."))
        assert chosen is not None


def preset_files() -> list[str]:
    return sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))


@pytest.mark.parametrize("name", preset_files())
def test_every_preset_validates(name: str) -> None:
    cfg = compose([f"+preset={name}"])
    validate(cfg)


def test_one_preset_registry_same_names() -> None:
    """The YAML files are the registry; PRESETS has exactly their names, less the strategy presets."""
    assert set(PRESETS) == set(preset_files()) - set(STRATEGY_PRESETS) - set(MODEL_PRESETS)
    for name in STRATEGY_PRESETS:
        assert compose([f"+preset={name}"]).strategy.name == name


@pytest.mark.parametrize("name", [n for n in PRESETS])
def test_yaml_presets_match_python_presets(name: str) -> None:
    """conf/preset/NAME.yaml gives the same weights, routing and LR scales as ease.PRESETS[NAME]."""
    cfg = compose([f"+preset={name}"])
    built = build.training_config(cfg)
    ref = PRESETS[name]
    assert built.weights_for(3) == pytest.approx(ref.weights_for(3))
    assert built.exit_layers == ref.exit_layers
    assert built.routing_thresholds == pytest.approx(ref.routing_thresholds)
    assert (built.layer_lr_scales or {1: 1.0, 2: 1.0, 3: 1.0}) == pytest.approx(
        ref.layer_lr_scales or {1: 1.0, 2: 1.0, 3: 1.0}
    )


def test_presets_have_header_with_reference_and_command() -> None:
    for path in sorted((CONF / "preset").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# @package _global_"), path.name
        header = "".join(line for line in text.splitlines() if line.startswith("#"))
        assert f"+preset={path.stem}" in header, f"{path.name}: header lacks its command"


def test_schema_rejects_mistyped_key_at_compose_time() -> None:
    with pytest.raises(Exception, match="dimm"):
        compose(["model.dimm=3"])
    with pytest.raises(Exception, match=r"model\.dim"):
        compose(["model.dim=abc"])


def test_asymmetric_alpha_override_path() -> None:
    cfg = compose(["+preset=asymmetric", "loss_weights.alpha=0.3"])
    assert build.training_config(cfg).weights_for(3) == pytest.approx({1: 0.3, 2: 0.0, 3: 0.7})


def test_cascade_routing_from_lists() -> None:
    cfg = compose(["model=ashem", "routing=confidence", "routing.exit_layer=[1,2]", "routing.threshold=[0.9,0.8]"])
    built = build.training_config(cfg)
    assert built.exit_layers == (1, 2)
    assert built.routing_thresholds == (0.9, 0.8)


def test_layer_lr_resampled_for_other_depths() -> None:
    cfg = compose(["+preset=layer_lr_decreasing"])
    assert build.training_config(cfg).layer_lr_scales == pytest.approx({1: 1.0, 2: 0.5, 3: 0.1})
    cfg4 = compose(["+preset=layer_lr_decreasing", "model=ashem"])
    scales = build.training_config(cfg4).layer_lr_scales
    assert scales[1] == pytest.approx(1.0) and scales[4] == pytest.approx(0.1)
    assert scales[1] > scales[2] > scales[3] > scales[4]


def test_outputs_do_not_depend_on_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose([], hydra_config=True)
    assert cfg.hydra.run.dir.startswith(str(REPO / "outputs"))
    assert cfg.hydra.sweep.dir.startswith(str(REPO / "outputs"))


def test_with_middle_is_one_definition() -> None:
    """`middle` goes strictly between the shallow exit and the last layer; nothing below the shallow exit."""
    from ease.losses import asymmetric

    cfg = compose(["loss_weights=with_middle", "model.num_layers=5", "routing=confidence", "routing.exit_layer=2"])
    weights = build.training_config(cfg).weights_for(5)
    assert weights == {1: 0.0, 2: 0.7, 3: 1.0, 4: 1.0, 5: pytest.approx(0.3)}
    assert weights == asymmetric(5, 0.7, shallow=2, middle=1.0)
