from pathlib import Path

import pytest
import yaml

import volsynth
from volsynth.config import PRESET_DIR, ExperimentConfig, save_config, to_dict
from volsynth.errors import ConfigError
from volsynth.experiment import load_config
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
    ({"data": {"sampling": {"patch_size": [32, 32]}}}, "data.sampling.patch_size: expected 3 values"),
    ({"data": {"patch_size": [32, 32, 32]}}, "moved to 'data.sampling.patch_size'"),
    ({"data": {"sampling": {"kind": "slabs"}}}, "Did you mean 'slab'?"),
    ({"data": {"sampling": {"depth": "everything"}}}, "data.sampling.depth"),
    ({"data": {"sampling": {"axis": True}}}, "data.sampling.axis"),
    ({"method": {"name": "regresion_unet"}}, "Did you mean 'regression_unet'?"),
    ({"method": {"name": "regression_unet", "chanels": [8]}}, "Did you mean 'channels'?"),
])
def test_strict_loading_names_the_bad_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_config(raw)


def test_overrides_go_through_the_same_validation() -> None:
    config = load_config({"method": {"name": "regression_unet"}},
                         ["train.lr=2e-4", "data.sampling.patch_size=[16,16,24]", "train.grad_clip=null", "seed=7",
                          "data.sampling.depth=all"])
    assert config.train.lr == 2e-4 and config.data.sampling.patch_size == (16, 16, 24) and config.seed == 7
    assert config.data.sampling.depth == "all"
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


def test_every_preset_loads_and_ships_as_package_data() -> None:
    presets = sorted(PRESET_DIR.glob("*.yaml"))
    assert presets, "no presets in volsynth/configs/"
    assert PRESET_DIR.parent == Path(volsynth.__file__).parent  # inside the package: works after `pip install`
    for preset in presets:
        assert isinstance(load_config(preset), ExperimentConfig), preset
        assert isinstance(load_config(preset.stem), ExperimentConfig), preset.stem  # by name


@pytest.mark.parametrize(("override", "message"), [
    ("train.iterations=0", "train.iterations must be >= 1, got 0"),
    ("train.iterations=-5", "train.iterations must be >= 1, got -5"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("train.lr=.inf", "train.lr: expected a finite number"),
    ("data.sampling.patch_size=[-8,16,16]", "data.sampling.patch_size must be positive"),
    ("data.sampling.per_step=0", "data.sampling.per_step must be >= 1"),
    ("inference.sw_batch_size=0", "inference.sw_batch_size must be >= 1"),
    ("inference.overlap=1.0", "inference.overlap must be in"),
    ("data.orientation=RAX", "data.orientation: 'RAX' is not an orientation"),
    ("train.ema.decay=1.5", "train.ema.decay must be in"),
    ("data.split.fold=7", r"data.split.fold must be in \[0, 3\]"),
])
def test_out_of_range_values_fail_at_load_time_naming_the_option(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"method": {"name": "regression_unet"}}, [override])


def test_a_method_must_be_named() -> None:
    with pytest.raises(ConfigError, match=r"method.name is not set: choose one of .*regression_unet"):
        load_config({})


def test_stages_parse_with_their_overrides() -> None:
    config = load_config({"method": {"name": "regression_unet"}, "stages": [
        {"name": "warm", "overrides": {"train.lr": 1e-3, "data.sampling.depth": "all"}}, {"name": "main"}]})
    assert [s.name for s in config.stages] == ["warm", "main"]
    assert config.stages[0].overrides == {"train.lr": 1e-3, "data.sampling.depth": "all"}
    with pytest.raises(ConfigError, match=r"stages\[0\].overides"):
        load_config({"method": {"name": "regression_unet"}, "stages": [{"name": "x", "overides": {}}]})
