"""params.yaml is validated whole before any work: errors name the key and the valid choices."""
from __future__ import annotations

import pytest
import yaml

from pipeline.config import REGISTRIES, ConfigError, Params, flatten, load_params, parse_params, registry_names
from tests.helpers import REPO

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute


def test_repo_params_file_is_valid_and_complete():
    p = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # Every field is written out in params.yaml, so users see every knob with its default.
    assert set(flatten(raw)) == set(flatten(p)), set(flatten(p)) ^ set(flatten(raw))
    assert p.encoder_weights is None  # offline by default


def test_defaults_equal_the_params_file():
    assert parse_params({}) == Params()
    assert load_params(REPO / "params.yaml").model_dump() == Params().model_dump()


@pytest.mark.parametrize("raw, expected", [
    ({"masks": {"overlapp": "x"}}, "masks.overlapp: unknown key (valid keys here: cache_images, max_side, overlap, unknown, unknown_name)"),
    ({"modle": "unet"}, "modle: unknown key (valid keys here: audit, blend, data, demo"),
    ({"masks": {"overlap": "largest"}}, "masks.overlap: 'largest' is not a valid choice; expected 'smaller_on_top' or 'higher_class_wins'"),
    ({"model": "unet3"}, "model: unknown model 'unet3'; valid: deconvnet, deeplabv1"),
    ({"train": {"loss": {"cee": 1.0}}}, "unknown loss 'cee'; valid: boundary_ce, ce, dice, focal"),
    ({"infer": {"tta": ["d8"]}}, "infer.tta.0: unknown TTA view 'd8'; valid: antitranspose, d4, hflip"),
    ({"split": {"n_folds": "five"}}, "split.n_folds: Input should be a valid integer"),
    ({"split": {"holdout": 0.95}}, "split.holdout: Input should be less than 0.9"),
    ({"demo": {"image_size": 8}}, "demo.image_size: Input should be greater than or equal to 32"),
    ({"encoder_weights": "ssl"}, "encoder_weights: 'ssl' is not a valid choice; expected 'imagenet'"),
    ({"split": {"strategy": "given", "n_folds": 1}}, "needs data.val_json"),
    ({"split": {"strategy": "given", "n_folds": 5}}, "set n_folds: 1"),
    ({"data": {"strict": "maybe"}}, "data.strict: Input should be a valid boolean"),
    ([1, 2], "expected a mapping of sections"),
    # Sections that disagree, found before any work instead of after training:
    ({"infer": {"checkpoints": ["best", "swa"], "round": 1}}, "train.swa_epochs is 0: no swa.pt is written"),
    ({"infer": {"checkpoints": ["swa"]}, "train": {"swa_epochs": 2}}, "round-2 models (fine-tuned on pseudo-labels) keep best/last only"),
    ({"infer": {"fold_weights": [1.0, 2.0, 1.0]}}, "infer.fold_weights has 3 weights for 2 folds"),
    ({"train": {"class_weights": "inverse", "loss": {"lovasz": 1.0}}}, "lovasz takes no class weights"),
    ({"train": {"workers": 4}, "audit": {"max_side": 96}}, "train.workers -> runtime.workers, audit.max_side -> oof.max_side"),
])
def test_bad_params_name_the_key(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert expected in str(err.value)


def test_agreeing_sections_pass():
    parse_params({"infer": {"checkpoints": ["swa"], "round": 1, "fold_weights": [1, 2]}, "train": {"swa_epochs": 2}})
    parse_params({"train": {"class_weights": "inverse", "loss": {"ce": 1.0, "lovasz": 0.5}}})   # ce takes them


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_params({"masks": {"overlap": "x"}, "runtime": {"workers": -1}, "eda": {"max_sid": 3}})
    msg = str(err.value)
    assert "masks.overlap" in msg and "runtime.workers" in msg and "eda.max_sid" in msg


def test_params_are_frozen():
    p = Params()
    with pytest.raises(Exception):
        p.masks.overlap = "higher_class_wins"


def test_stage_view_only_exposes_declared_sections():
    view = Params().only("data", "masks")
    assert view.masks.overlap == "smaller_on_top"
    with pytest.raises(ConfigError, match="reads params section 'split' but declares only \\['data', 'masks'\\]"):
        view.split
    assert view.flat()["masks.overlap"] == "smaller_on_top" and "split.seed" not in view.flat()
    with pytest.raises(ConfigError, match="no params section"):
        Params().only("trian")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_there_are_presets():
    from pipeline.presets import available

    assert "photos" in available()


@pytest.mark.parametrize("name", __import__("pipeline.presets", fromlist=["available"]).available())
def test_every_preset_validates_and_round_trips_through_dvc(name, tmp_path):
    from dvc.utils.hydra import apply_overrides

    from pipeline.presets import flags, leaves, load_preset

    preset = load_preset(name, REPO / "params.yaml")
    out = flags(preset)
    assert out[0::2] == ["-S"] * (len(out) // 2) and out
    # DVC itself applies the flags to a copy of params.yaml: the result is params.yaml + the preset
    work = tmp_path / "params.yaml"
    work.write_text((REPO / "params.yaml").read_text())
    apply_overrides(str(work), out[1::2])
    applied, expected = yaml.safe_load(work.read_text()), yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in leaves(preset).items():
        *parents, leaf = key.split(".")
        node = expected
        for part in parents:
            node = node[part]
        node[leaf] = value
    assert applied == expected
    assert set(leaves(preset)) <= set(flatten(Params())) | {"train.loss"}   # every key is a real param


def test_a_bad_preset_fails_naming_its_key(tmp_path, monkeypatch):
    from pipeline import presets

    (tmp_path / "broken.yaml").write_text("# broken\ntrain: {input: crops}\n")
    monkeypatch.setattr(presets, "PRESETS", tmp_path)
    with pytest.raises(ConfigError, match=r"params.yaml \+ broken.yaml: train.input: 'crops' is not a valid choice"):
        presets.load_preset("broken", REPO / "params.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: broken"):
        presets.load_preset("nope", REPO / "params.yaml")


@pytest.mark.parametrize("family", sorted(REGISTRIES))
def test_the_config_accepts_exactly_each_registrys_names(family):
    """What config reads from each registry's source (it must not import torch) is what the module holds."""
    import importlib

    file, variables = REGISTRIES[family]
    module = importlib.import_module("pipeline." + file.removesuffix(".py").replace("/", "."))
    held = [name for v in variables for name in getattr(module, v)]
    assert registry_names(family) == tuple(held) and len(held) == len(set(held)) > 0
