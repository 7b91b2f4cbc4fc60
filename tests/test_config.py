from pathlib import Path

import pytest
import yaml

from volsynth.config import ConfigError, ExperimentConfig, load_config, save_config, to_dict
from volsynth.methods.regression_unet import RegressionUNetConfig


def test_defaults_resolve_to_the_concrete_method_config() -> None:
    config = load_config({"method": {"name": "regression_unet"}})
    assert isinstance(config.method, RegressionUNetConfig)
    assert config.train.lr == 1e-4 and config.inference.overlap == 0.625


@pytest.mark.parametrize(("raw", "message"), [
    ({"trian": {}}, "Did you mean 'train'?"),
    ({"train": {"lerning_rate": 1}}, "Unknown option 'train.lerning_rate'"),
    ({"train": {"precision": "bf61"}}, "Did you mean 'bf16'?"),
    ({"train": {"iterations": "many"}}, "train.iterations: expected an integer"),
    ({"data": {"patch_size": [32, 32]}}, "data.patch_size: expected 3 values"),
    ({"method": {"name": "regresion_unet"}}, "Did you mean 'regression_unet'?"),
    ({"method": {"name": "regression_unet", "chanels": [8]}}, "Did you mean 'channels'?"),
])
def test_strict_loading_names_the_bad_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_config(raw)


def test_overrides_go_through_the_same_validation() -> None:
    config = load_config({"method": {"name": "regression_unet"}},
                         ["train.lr=2e-4", "data.patch_size=[16,16,24]", "train.grad_clip=null", "seed=7"])
    assert config.train.lr == 2e-4 and config.data.patch_size == (16, 16, 24) and config.seed == 7
    with pytest.raises(ConfigError, match="Did you mean 'iterations'"):
        load_config({}, ["train.iteratons=5"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config({}, ["train.lr"])


def test_yaml_file_roundtrip_and_unknown_key_names_the_file(tmp_path: Path) -> None:
    config = load_config({"method": {"name": "regression_unet", "channels": [8, 16, 32]}}, ["train.iterations=3"])
    path = save_config(config, tmp_path / "config.yaml")
    again = load_config(path)
    assert to_dict(again) == to_dict(config)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["patchsize"] = [8, 8, 8]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data.patchsize.*config.yaml"):
        load_config(path)


def test_unknown_preset_suggests_a_name() -> None:
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset-anywhere")


def test_relative_manifest_resolves_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("{}")
    (tmp_path / "c.yaml").write_text("method: {name: regression_unet}\ndata: {manifest: m.json}\n")
    assert Path(load_config(tmp_path / "c.yaml").data.manifest) == (tmp_path / "m.json").resolve()


def test_every_preset_loads() -> None:
    presets = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert presets, "no presets in configs/"
    for preset in presets:
        assert isinstance(load_config(preset), ExperimentConfig), preset
