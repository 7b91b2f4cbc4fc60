"""Every registered method honours the contract the one trainer relies on."""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from volsynth.config import PRESET_DIR, load_config, to_dict
from volsynth.data.volume import Volume
from volsynth.inference.predict import translate_volume
from volsynth.methods import METHODS, Batch, StepContext, build_method
from volsynth.registry import UnknownNameError
from volsynth.training.checkpoint import load_method, save_checkpoint


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name: str, tmp_path: Path) -> None:
    preset = PRESET_DIR / f"{name}-cpu.yaml"
    assert preset.is_file(), f"{name} has no CPU preset"
    assert (PRESET_DIR / f"{name}-paper.yaml").is_file(), f"{name} has no paper preset"
    config = load_config(preset, ["inference.overlap=0.25"])
    torch.manual_seed(0)
    method = build_method(config.method)
    size = config.data.patch_size
    assert all(p % method.patch_divisor == 0 for p in size)
    optimizers = method.configure_optimizers(config.train)
    assert optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers.values())
    ctx = StepContext(device=torch.device("cpu"), precision="fp32", optimizers=optimizers,
                      scalers={k: torch.amp.GradScaler("cpu", enabled=False) for k in optimizers}, grad_clip=None,
                      total_iterations=10, iteration=1)
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(1, 1, *size, generator=generator)
    target = (1 - source) ** 2
    before = {k: v.clone() for k, v in method.state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    method.train()
    losses = method.train_step(Batch(source, target), ctx)
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    changed = [k for k, v in method.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "one train step changed no weights"
    # save → load round trip gives the same translation
    method.eval()
    path = save_checkpoint(tmp_path / "m.pt", {"iteration": 1, "config": to_dict(config), "model": method.state_dict()})
    loaded, loaded_config, _ = load_method(path)
    probe = torch.rand(1, 1, *size, generator=generator)
    with torch.no_grad():
        expected, actual = method.translate(probe), loaded.translate(probe)
    assert expected.shape == probe.shape
    assert 0.0 <= float(expected.min()) and float(expected.max()) <= 1.0
    torch.testing.assert_close(actual, expected)
    # full-volume translation keeps shape and geometry
    direction = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    volume = Volume(np.random.default_rng(0).random((30, 28, 25)).astype(np.float32) * 500, (1.2, 1.0, 2.0),
                    (3.0, -4.0, 5.0), direction)
    synthetic = translate_volume(loaded, loaded_config, volume)
    assert synthetic.same_grid(volume) and np.isfinite(synthetic.array).all()


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError) as error:
        METHODS.get("mdgan")
    message = str(error.value)
    assert "Did you mean 'mdagan'?" in message
    for name in METHODS.names():
        assert name in message


def test_the_registry_has_every_method_of_the_issues() -> None:
    assert {"mdagan", "resunet_patchgan", "cyclegan3d", "eagan", "regression_unet"} <= set(METHODS.names())


def test_paper_checkpoint_predicts_without_imagenet_weights(tmp_path: Path) -> None:
    """The perception loss is training-only: rebuilding a paper-preset method for inference needs no VGG file."""
    config = load_config("mdagan-paper", ["method.generator.base_channels=4", "method.perception.weights=/no/such.pth"])
    trained = build_method(config.method, inference=True)
    state = {"iteration": 0, "config": to_dict(config), "model": trained.state_dict()}
    path = save_checkpoint(tmp_path / "m.pt", state)
    method, loaded_config, _ = load_method(path)
    assert loaded_config.method.perception.weights == "/no/such.pth"  # the saved config is untouched
    probe = torch.rand(1, 1, 16, 16, 16)
    torch.testing.assert_close(method.translate(probe), trained.eval().translate(probe))
