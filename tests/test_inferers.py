"""Inferers: sliding windows equal a plain MONAI call; slabs reproduce, keep the earlier slab, ignore batching."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from volsynth.experiment import load_config
from volsynth.inferers import SlabInferer, SlidingWindowInferer, item_generator, run_inferer
from volsynth.methods import build_method


def test_sliding_window_matches_a_plain_monai_call() -> None:
    torch.manual_seed(0)
    config = load_config({"method": {"name": "regression_unet", "channels": [4, 8, 16, 32]}})
    method = build_method(config.method).eval()
    array = np.random.default_rng(0).random((24, 32, 16)).astype(np.float32)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.625, sigma_scale=0.125, batch=3)
    ours = method.infer(array, inferer, device=torch.device("cpu"))
    with torch.no_grad():
        plain = sliding_window_inference(torch.from_numpy(array)[None, None], (16, 16, 16), 3, method.translate,
                                         overlap=0.625, mode="gaussian", sigma_scale=0.125)[0, 0].numpy()
    np.testing.assert_allclose(ours, np.clip(plain, 0, 1), atol=1e-6)
    assert method.training is False


def halve(items: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    return items * 0.5


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize(("depth", "overlap"), [(1, 0), (4, 1), (5, 2), ("all", 0), (30, 0)])
def test_a_pointwise_predictor_reproduces_the_volume(axis: int, depth: int | str, overlap: int) -> None:
    volume = torch.rand(1, 1, 9, 7, 11, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, ...]] = []

    def record(items: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        seen.append(tuple(items.shape))
        assert generators is not None and len(generators) == items.shape[0]
        return halve(items, generators)

    output = SlabInferer(axis=axis, depth=depth, overlap=overlap, batch=3)(record, volume)
    torch.testing.assert_close(output, volume * 0.5, rtol=0, atol=0)
    length = volume.shape[2 + axis]
    expected_depth = length if depth == "all" else depth
    assert all(s[-1] == max(expected_depth, 1) for s in seen)  # slice axis last, thinner volumes padded
    in_plane = [n for a, n in enumerate(volume.shape[2:]) if a != axis]
    assert all(list(s[2:4]) == in_plane for s in seen)


def test_overlapping_slabs_keep_the_earlier_slab() -> None:
    def slab_start(items: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        # every slab answers with the first slice index it saw (encoded in the input)
        return items[..., :1].expand_as(items).clone()

    volume = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 1, 10).expand(1, 1, 2, 2, 10).contiguous()
    inferer = SlabInferer(axis=2, depth=4, overlap=2, batch=2)
    assert inferer.starts(10) == [0, 2, 4, 6]
    output = inferer(slab_start, volume)[0, 0, 0, 0]
    # slices 0–3 from the slab at 0, 4–5 from the slab at 2, 6–7 from 4, 8–9 from 6
    np.testing.assert_array_equal(output.numpy(), [0, 0, 0, 0, 2, 2, 4, 4, 6, 6])


def noisy(items: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    assert generators is not None
    noise = torch.stack([torch.rand(items.shape[1:], generator=g) for g in generators])
    return (items + noise) / 2


@pytest.mark.parametrize("depth", [1, 3, "all"])
def test_random_draws_do_not_depend_on_the_batch_size_and_follow_the_seed(depth: int | str) -> None:
    volume = torch.rand(1, 1, 6, 5, 8, generator=torch.Generator().manual_seed(1))
    one = SlabInferer(depth=depth, overlap=1 if depth == 3 else 0, batch=1)(noisy, volume, seed=7)
    many = SlabInferer(depth=depth, overlap=1 if depth == 3 else 0, batch=5)(noisy, volume, seed=7)
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    other = SlabInferer(depth=depth, overlap=1 if depth == 3 else 0, batch=5)(noisy, volume, seed=8)
    assert not torch.equal(one, other)
    assert torch.equal(torch.rand(3, generator=item_generator(7, 2)), torch.rand(3, generator=item_generator(7, 2)))


def test_run_inferer_checks_its_input() -> None:
    with pytest.raises(ValueError, match="expected a 3D"):
        run_inferer(SlabInferer(), halve, np.zeros((4, 4)), device=torch.device("cpu"))
    out = run_inferer(SlabInferer(), lambda x, g: x * 3, np.full((2, 3, 4), 0.5, np.float32),
                      device=torch.device("cpu"))
    assert out.dtype == np.float32 and np.all(out == 1.0)  # clamped to [0, 1]


def ramp(items: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Not mirror-equivariant: adds 0.01 × the item's own x index (sliding-window items are the whole volume)."""
    x = torch.arange(items.shape[2], dtype=items.dtype).view(1, 1, -1, 1, 1)
    return items * 0.5 + 0.01 * x


@pytest.mark.parametrize("axes", [(0,), (0, 2)])
def test_mirroring_averages_every_flip_combination_flipped_back(axes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    source = rng.random((8, 6, 4), dtype=np.float32)
    inferer = SlidingWindowInferer(roi_size=(8, 6, 4), overlap=0.0, sigma_scale=0.125, batch=1, blend="constant")
    plain = run_inferer(inferer, ramp, source, device=torch.device("cpu"))
    x = np.arange(8, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(plain, np.clip(source * 0.5 + 0.01 * x, 0, 1), atol=1e-6)
    mirrored = run_inferer(inferer, ramp, source, device=torch.device("cpu"), mirror_axes=axes)
    # By hand: a flip along y or z leaves the ramp where it was; a flip along x reverses it. So passes that flip x
    # (half of them when 0 is mirrored) see 0.01 × (7 − x) after flipping back: the mean ramp is 0.035 flat.
    np.testing.assert_allclose(mirrored, np.clip(source * 0.5 + 0.035, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="mirror_axes"):
        run_inferer(inferer, ramp, source, device=torch.device("cpu"), mirror_axes=(0, 0))


def test_config_refuses_bad_mirror_axes() -> None:
    from volsynth.errors import ConfigError

    assert load_config("regression_unet-cpu", ["inference.mirror_axes=[0,1,2]"]).inference.mirror_axes == (0, 1, 2)
    for bad in ("[0,0]", "[3]"):
        with pytest.raises(ConfigError, match="mirror_axes"):
            load_config("regression_unet-cpu", [f"inference.mirror_axes={bad}"])
