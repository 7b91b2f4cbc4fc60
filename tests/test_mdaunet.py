"""3D-mDAUNet generator, its blocks, the discriminators and the multi-resolution L1 (seed-reference §1, §2, §3.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from volsynth.losses.voxel import multires_voxel_loss
from volsynth.nets.blocks import CBAM, RRDB, ResidualDenseBlock, make_pyramid
from volsynth.nets.discriminators import BinaryDiscriminator, MultiResUNetDiscriminator
from volsynth.nets.mdaunet import MDAUNet, count_parameters

PAPER_PARAMETERS = 6_176_846  # seed-reference §1.7
TINY = {"base_channels": 4, "growth_rates": (2, 2, 4, 4), "rdbs_per_block": 1, "convs_per_rdb": 3}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_paper_generator_has_the_reference_parameter_count() -> None:
    net = MDAUNet()
    count = count_parameters(net)
    assert abs(count - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.02
    assert count == PAPER_PARAMETERS
    # Without the three deep-supervision heads (§1.7) and with parameter-free spectral norm.
    assert count_parameters(MDAUNet(multires_output=False)) == 6_170_795


def test_paper_blocks_match_hand_counts() -> None:
    # §1.7: E0 = RRDB(16, growth 8) + conv 16→16 = 141,856; CBAM(192, r=8) = 9,902.
    e0 = nn.Sequential(RRDB(3, 16, 8, 3, 5), nn.Conv3d(16, 16, 3, padding=1))
    assert count_parameters(e0) == 141_856
    assert count_parameters(CBAM(3, 192, 8)) == 9_902
    rdb = ResidualDenseBlock(3, 16, 8, 5)
    assert [c.in_channels for c in rdb.convs] == [16, 24, 32, 40, 48]
    assert [c.out_channels for c in rdb.convs] == [8, 8, 8, 8, 16]


def test_rdb_applies_leaky_relu_after_the_last_conv_and_scales_the_residual() -> None:
    rdb = ResidualDenseBlock(3, 2, 2, 2, residual_scale=0.2)
    for layer in rdb.convs:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    last = rdb.convs[-1]
    last.bias.data = torch.tensor([1.0, -1.0])
    x = torch.zeros(1, 2, 4, 4, 4)
    out = rdb(x)
    # last conv gives (+1, -1) per voxel; LeakyReLU(0.2) → (1, -0.2); residual scale 0.2 → (0.2, -0.04).
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 0.2))
    assert torch.allclose(out[:, 1], torch.full_like(out[:, 1], -0.04))


def _assert_level_shapes(outputs: dict[str, torch.Tensor], batch: int, shape: tuple[int, ...]) -> None:
    assert list(outputs) == ["level_0", "level_1", "level_2", "level_3"]
    for level, tensor in enumerate(outputs.values()):
        assert tuple(tensor.shape) == (batch, 1, *(s // 2**level for s in shape)), level


@pytest.mark.parametrize("shape", [(24, 24, 24), (32, 32, 32), (8, 16, 24)])
def test_generator_shapes_at_every_level(shape: tuple[int, int, int]) -> None:
    net = MDAUNet(3, **TINY)
    with torch.no_grad():
        outputs = net(torch.rand(1, 1, *shape))
    _assert_level_shapes(outputs, 1, shape)


def test_generator_2d() -> None:
    net = MDAUNet(2, **TINY)
    with torch.no_grad():
        outputs = net(torch.rand(2, 1, 16, 24))
    _assert_level_shapes(outputs, 2, (16, 24))


@pytest.mark.parametrize("shape", [(20, 16, 16), (16, 16, 12)])
def test_generator_rejects_sizes_not_divisible_by_8(shape: tuple[int, int, int]) -> None:
    bad = next(s for s in shape if s % 8)
    with pytest.raises(ValueError, match=rf"multiple of 8.*got size {bad}"):
        MDAUNet(3, **TINY)(torch.rand(1, 1, *shape))


def test_multires_output_off_keeps_only_the_full_resolution_head() -> None:
    net = MDAUNet(3, multires_output=False, **TINY)
    outputs = net(torch.rand(1, 1, 16, 16, 16))
    assert list(outputs) == ["level_0"]
    assert count_parameters(MDAUNet(3, **TINY)) - count_parameters(net) == sum(
        (4 * 2**k) * 27 + 1 for k in (1, 2, 3))


def test_multires_input_uses_the_given_pyramid_levels() -> None:
    net = MDAUNet(3, **TINY).eval()
    source = torch.rand(1, 1, 16, 16, 16)
    pyramid = make_pyramid(source, 4, "linear")
    with torch.no_grad():
        implicit = net(source)["level_0"]
        explicit = net(pyramid)["level_0"]
        changed = net({**pyramid, "level_2": torch.rand_like(pyramid["level_2"])})["level_0"]
    assert torch.allclose(implicit, explicit)  # a bare tensor builds the same trilinear pyramid
    assert not torch.allclose(implicit, changed)
    # Without multi-resolution input only level_0 has a feature conv and extra levels are ignored.
    plain = MDAUNet(3, multires_input=False, **TINY).eval()
    assert len(plain.feature_convs) == 1
    with torch.no_grad():
        a = plain(source)["level_0"]
        b = plain({**pyramid, "level_2": torch.rand_like(pyramid["level_2"])})["level_0"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_linear_and_nearest_resampling_modes(mode: str) -> None:
    net = MDAUNet(3, downsample=mode, upsample=mode, **TINY)
    with torch.no_grad():
        _assert_level_shapes(net(torch.rand(1, 1, 8, 8, 16)), 1, (8, 8, 16))


def test_no_normalisation_layers_and_spectral_norm_placement() -> None:
    net = MDAUNet()
    norms = (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in net.modules())
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    spectral = [m for m in convs if parametrize.is_parametrized(m, "weight")]
    # §1.6: 4 input feature convs + 9 decoder convs.
    assert len(spectral) == 13
    assert all(parametrize.is_parametrized(m, "weight") for m in net.feature_convs)
    assert not any(parametrize.is_parametrized(m, "weight") for m in net.encoder.modules() if isinstance(m, nn.Conv3d))
    assert not any(parametrize.is_parametrized(m, "weight") for m in net.heads.values())


def test_clip_activation_can_kill_all_gradients_but_linear_heads_do_not() -> None:
    """The release's clip-before-loss failure (§4 "Known failure") and why "none" is our default."""
    source, target = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    grads = {}
    for activation in ("clip", "none"):
        torch.manual_seed(0)
        net = MDAUNet(3, output_activation=activation, **TINY)
        for head in net.heads.values():
            head.bias.data.fill_(-10.0)  # an all-negative initial output
        multires_voxel_loss(net(source), target).backward()
        grads[activation] = sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
    assert grads["clip"] == 0.0
    assert grads["none"] > 0.0
    sigmoid = MDAUNet(3, output_activation="sigmoid", **TINY)
    out = sigmoid(source)
    assert all(((v > 0) & (v < 1)).all() for v in out.values())


def test_unet_discriminator_gives_voxelwise_logits_at_four_levels() -> None:
    d = MultiResUNetDiscriminator(3, base_channels=4)
    with torch.no_grad():
        outputs = d(torch.rand(2, 1, 8, 16, 24))
    _assert_level_shapes(outputs, 2, (8, 16, 24))
    hidden = [m for m in d.modules() if isinstance(m, nn.Conv3d) and parametrize.is_parametrized(m, "weight")]
    assert len(hidden) == 14  # two per encoder (4) and decoder (3) level; input convs and heads plain
    with pytest.raises(ValueError, match="multiple of 8"):
        d(torch.rand(1, 1, 12, 16, 16))


def test_unet_discriminator_default_widths() -> None:
    d = MultiResUNetDiscriminator()
    assert [block[0].out_channels for block in d.encoder] == [8, 16, 32, 64]


def test_binary_discriminator_gives_one_logit_per_sample() -> None:
    d = BinaryDiscriminator(3, base_channels=4)
    out = d(torch.rand(3, 1, 16, 16, 16))
    assert list(out) == ["level_0"]
    assert tuple(out["level_0"].shape) == (3, 1)


def test_multires_voxel_loss_closed_form_with_nearest_targets() -> None:
    target = torch.arange(8.0 ** 3).reshape(1, 1, 8, 8, 8) / 512
    outputs = {f"level_{k}": torch.zeros(1, 1, *(8 // 2**k,) * 3) for k in range(4)}
    # Nearest down-sampling keeps the even-index voxels (index 2i at level 1, 4i at level 2, ...).
    expected = [float(target[..., :: 2**k, :: 2**k, :: 2**k].mean()) for k in range(4)]
    weights = (1.0, 0.5, 2.0, 0.0)
    value = multires_voxel_loss(outputs, target, weights)
    assert value.item() == pytest.approx(sum(w * e for w, e in zip(weights, expected, strict=True)), rel=1e-6)
    # Tuples are read in level order; a bare tensor is level 0 only.
    assert multires_voxel_loss(tuple(outputs.values()), target, weights).item() == pytest.approx(value.item())
    assert multires_voxel_loss(outputs["level_0"], target).item() == pytest.approx(expected[0])
    # Squared error on zero outputs is the mean of the squared (nearest-sampled) targets at each level.
    squared = [float((target[..., :: 2**k, :: 2**k, :: 2**k] ** 2).mean()) for k in range(4)]
    assert multires_voxel_loss(outputs, target, weights, distance="mse").item() == pytest.approx(
        sum(w * e for w, e in zip(weights, squared, strict=True)), rel=1e-6)
    with pytest.raises(ValueError, match="voxel distance"):
        multires_voxel_loss(outputs, target, weights, distance="huber")
