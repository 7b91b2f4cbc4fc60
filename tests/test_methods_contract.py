"""Every registered method honours the contract the one trainer relies on (diffusers-style shared contract test).

Each method is exercised through the real pipeline: its CPU preset, the manifest → task → cache → sampler path the
trainer uses (patches or slabs, labels on both sides), one optimiser step, a save → load round trip, and whole-
volume translation through its own inferer on an oblique volume. Nothing here asks which method it is: what
differs is declared by the method (``stochastic``, ``sampling_kinds``, ``requires_paired_data``).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from volsynth.config import PRESET_DIR, to_dict
from volsynth.data.sampling import KEYS, build_sampler
from volsynth.data.volume import Volume
from volsynth.experiment import load_config, load_method, save_checkpoint
from volsynth.inference.predict import translate_volume
from volsynth.methods import METHODS, Batch, StepContext, build_method
from volsynth.registry import UnknownNameError
from volsynth.training.data import prepare_subjects, resolve_task


def contract_config(name: str, manifest: Path, *extra: str):
    overrides = [f"data.manifest={manifest}", "inference.overlap=0.25", "data.sampling.per_step=2", *extra]
    if METHODS.get(name).stochastic:
        overrides.append("inference.steps=2")  # a sampler: two steps keep the test fast
    return load_config(f"{name}-cpu", overrides)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name: str, cohort: Path, tmp_path: Path) -> None:
    assert (PRESET_DIR / f"{name}-cpu.yaml").is_file(), f"{name} has no CPU preset"
    assert (PRESET_DIR / f"{name}-paper.yaml").is_file(), f"{name} has no paper preset"
    config = contract_config(name, cohort)
    torch.manual_seed(0)
    method = build_method(config.method)
    assert config.data.sampling.kind in method.sampling_kinds
    method.check_data(config.data)
    config, task = resolve_task(config, paired=method.requires_paired_data)
    subjects = prepare_subjects(config, task, task.splits["train"], divisor=method.shape_divisor(config.data),
                                cache_dir=tmp_path / "cache", paired=method.requires_paired_data, progress=False)
    items = build_sampler(config.data.sampling, subjects, paired=method.requires_paired_data).sample(
        np.random.default_rng(0))
    batch = Batch(*(torch.from_numpy(items[k]) if items[k] is not None else None for k in KEYS))
    assert batch.source.ndim == 5 and batch.source.shape == batch.target.shape
    if config.data.sampling.labels is not None:
        assert batch.source_label is not None and batch.target_label is not None

    optimizers = method.configure_optimizers(config.train)
    assert optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers.values())
    ctx = StepContext(device=torch.device("cpu"), precision="fp32", optimizers=optimizers,
                      scalers={k: torch.amp.GradScaler("cpu", enabled=False) for k in optimizers}, grad_clip=None,
                      total_iterations=10, iteration=1, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in method.state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    method.train()
    for frozen in method.frozen_modules():
        assert not frozen.training, "frozen modules must stay in eval mode"
    losses = method.train_step(batch, ctx)
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    changed = [k for k, v in method.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "one train step changed no weights"

    # save → load round trip translates identically (same generators for samplers)
    method.eval()
    path = save_checkpoint(tmp_path / "m.pt", {"iteration": 1, "config": to_dict(config), "model": method.state_dict()})
    loaded, loaded_config, _ = load_method(path)
    probe = batch.source[:1]

    def generators(seed: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed)]

    expected, actual = method.translate(probe, generators(3)), loaded.translate(probe, generators(3))
    assert expected.shape == probe.shape
    assert 0.0 <= float(expected.min()) and float(expected.max()) <= 1.0
    torch.testing.assert_close(actual, expected)

    # Whole-volume translation through the method's own inferer keeps the input's grid; the same seed gives the
    # same volume, and a different seed a different one exactly when the method declares itself stochastic.
    direction = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    volume = Volume(np.random.default_rng(0).random((30, 28, 13)).astype(np.float32) * 500, (1.2, 1.0, 2.0),
                    (3.0, -4.0, 5.0), direction)
    first = translate_volume(loaded, loaded_config, volume)
    assert first.same_grid(volume) and np.isfinite(first.array).all()
    again = translate_volume(loaded, loaded_config, volume)
    np.testing.assert_array_equal(first.array, again.array)
    other_seed = load_config(to_dict(loaded_config), ["inference.seed=1"])
    differs = not np.array_equal(translate_volume(loaded, other_seed, volume).array, first.array)
    assert differs == type(loaded).stochastic


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError) as error:
        METHODS.get("mdgan")
    message = str(error.value)
    assert "Did you mean 'mdagan'?" in message
    for name in METHODS.names():
        assert name in message


def test_the_registry_has_every_method_of_the_papers() -> None:
    assert {"mdagan", "resunet_patchgan", "cyclegan3d", "eagan", "regression_unet", "make_a_volume",
            "hifisyn"} <= set(METHODS.names())


def test_a_method_refuses_items_it_cannot_take(cohort: Path) -> None:
    from volsynth.errors import ConfigError

    config = load_config("regression_unet-cpu", [f"data.manifest={cohort}", "data.sampling.kind=slab"])
    with pytest.raises(ConfigError, match=r"data\.sampling\.kind: method 'regression_unet' trains on patch items"):
        build_method(config.method).check_data(config.data)
    config = load_config("regression_unet-cpu", ["data.sampling.patch_size=[10,10,10]"])
    with pytest.raises(ConfigError, match=r"patch_size \[10, 10, 10\] must be a multiple of 4"):
        build_method(config.method).check_data(config.data)


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
