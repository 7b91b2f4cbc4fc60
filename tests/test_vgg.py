"""VGG weight loading (no downloads) and the 2.5D perception loss in closed form (seed-reference §3.2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from volsynth.losses.perception import PerceptionLoss25D, grey_to_vgg_input, volume_slices
from volsynth.nets.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG, VGGWeightsUnavailable, load_vgg, relu_indices


@pytest.fixture(scope="module")
def vgg19_features() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return VGG(19).state_dict()


def test_relu5_4_is_features_35() -> None:
    assert relu_indices(19)["relu5_4"] == 35


def test_load_local_vgg19_file(tmp_path: Path, vgg19_features: dict[str, torch.Tensor]) -> None:
    # fp16 halves the file (40 MB); the classifier entry proves extra torchvision keys are ignored.
    state = {k: v.half() for k, v in vgg19_features.items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg19.pth"
    torch.save(state, path)
    model = load_vgg(19, path)
    loaded = model.state_dict()
    assert set(loaded) == set(vgg19_features)
    assert all(torch.equal(loaded[k], state[k].float()) for k in loaded)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(VGGWeightsUnavailable, match="not found") as info:
        load_vgg(19, path)
    assert str(path) in str(info.value)


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(VGGWeightsUnavailable, match="could not be read") as info:
        load_vgg(19, path)
    assert str(path) in str(info.value)


def test_imagenet_offline_explains_the_cache_and_how_to_provide_weights(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(VGGWeightsUnavailable) as info:
        load_vgg(19, "imagenet")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth") in message
    assert "local file" in message and "random" in message


def test_wrong_shapes_and_wrong_depth_are_errors(tmp_path: Path, vgg19_features: dict[str, torch.Tensor]) -> None:
    wrong_shapes = tmp_path / "shapes.pth"
    torch.save({k: torch.zeros(1) for k in vgg19_features}, wrong_shapes)  # every key, no right shape
    with pytest.raises(VGGWeightsUnavailable, match="do not fit VGG-19"):
        load_vgg(19, wrong_shapes)
    vgg16_keys = tmp_path / "vgg16.pth"
    torch.save({k: torch.zeros(1) for k in VGG(16).state_dict()}, vgg16_keys)
    with pytest.raises(VGGWeightsUnavailable, match="lack"):
        load_vgg(19, vgg16_keys)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(VGGWeightsUnavailable, match="not a state dict"):
        load_vgg(19, not_a_dict)


# ---------------------------------------------------------------------------------------------------------------
# Perception loss


def test_grey_is_replicated_before_imagenet_normalisation() -> None:
    out = grey_to_vgg_input(torch.full((2, 1, 4, 4), 0.5))
    assert out.shape == (2, 3, 4, 4)
    for c in range(3):
        assert torch.allclose(out[:, c], torch.full((2, 4, 4), (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_volume_slices_fold_each_axis_into_the_batch() -> None:
    volume = torch.arange(2 * 2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 2, 3, 4, 5)
    for axis, plane in ((2, (4, 5)), (3, (3, 5)), (4, (3, 4))):
        slices = volume_slices(volume, axis)
        n = volume.shape[axis]
        assert slices.shape == (2 * n, 2, *plane)
        assert torch.equal(slices[n + 1], volume[1].select(axis - 1, 1))  # batch-major


def test_identical_inputs_give_zero() -> None:
    loss = PerceptionLoss25D(nn.Conv2d(3, 4, 3, padding=1), tap=None)
    volume = torch.rand(2, 1, 6, 7, 8)
    assert loss(volume, volume).item() == 0.0


def test_one_layer_extractor_closed_form() -> None:
    # f(x) = Σ_c w_c x_c + b on normalised channels x_c = (g − m_c)/s_c, so f(s) − f(t) = (s − t) Σ_c w_c/s_c:
    # every view sees every voxel once, so each view's L1 (and their mean) is mean|s − t| · |Σ_c w_c / s_c|.
    conv = nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.3, -0.2, 0.5]).view(1, 3, 1, 1))
        conv.bias.fill_(0.7)
    loss = PerceptionLoss25D(conv, tap=None, chunk_size=5)
    synthetic, target = torch.rand(2, 1, 6, 7, 8), torch.rand(2, 1, 6, 7, 8)
    factor = abs(sum(w / s for w, s in zip((0.3, -0.2, 0.5), IMAGENET_STD, strict=True)))
    expected = (synthetic - target).abs().mean().item() * factor
    assert loss(synthetic, target).item() == pytest.approx(expected, rel=1e-5)


def test_chunking_and_checkpointing_do_not_change_value_or_gradient() -> None:
    torch.manual_seed(0)
    extractor = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    synthetic, target = torch.rand(1, 1, 4, 6, 8), torch.rand(1, 1, 4, 6, 8)
    results = []
    for chunk, checkpoint in ((1000, False), (5, True)):
        x = synthetic.clone().requires_grad_()
        value = PerceptionLoss25D(extractor, tap=None, chunk_size=chunk, checkpoint=checkpoint)(x, target)
        value.backward()
        results.append((value.detach(), x.grad))
    assert torch.allclose(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)


def test_slice_fraction_samples_reproducibly_with_a_generator() -> None:
    seen: list[int] = []

    class Count(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return x

    loss = PerceptionLoss25D(Count(), tap=None, slice_fraction=0.25, chunk_size=1000)
    synthetic, target = torch.rand(2, 1, 8, 12, 16), torch.rand(2, 1, 8, 12, 16)
    a = loss(synthetic, target, generator=torch.Generator().manual_seed(3))
    b = loss(synthetic, target, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()
    # per view: batch 2 × round(0.25 × n) slices, for synthetic and target
    assert seen[:6] == [4, 4, 6, 6, 8, 8]


def test_vgg_relu5_4_gradients_reach_the_input_not_the_weights() -> None:
    torch.manual_seed(0)
    loss = PerceptionLoss25D.from_weights("random", depth=19, layer="relu5_4", slice_fraction=0.1)
    assert loss.tap == 35 and loss.min_size == 16
    synthetic = torch.rand(1, 1, 16, 16, 16, requires_grad=True)
    value = loss(synthetic, torch.rand(1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    value.backward()
    assert value.item() > 0
    assert synthetic.grad is not None and synthetic.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.extractor.parameters())
    with pytest.raises(ValueError, match="at least 16"):
        loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))


def test_extractor_is_hidden_from_state_dict_and_parameters_but_follows_to() -> None:
    extractor = nn.Conv2d(3, 2, 1)
    loss = PerceptionLoss25D(extractor, tap=None)
    holder = nn.Module()
    holder.perception = loss
    assert holder.state_dict() == {}
    assert list(holder.parameters()) == []
    holder.to(torch.float64)
    assert extractor.weight.dtype == torch.float64
    holder.train()
    assert not extractor.training
