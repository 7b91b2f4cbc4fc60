"""Baselines (issue 6): resunet_patchgan, cyclegan3d, eagan and their building blocks.

Faithfulness checks follow ``shared/research/seed-methods.md`` §3.3, §4.1 and §4.4: PatchGAN receptive field and
output grid, parameter counts against the counts measured on the public code, Sobel cases, the Ea-GAN edge ramp,
GAN-loss closed forms, the image pool, and one training step per method. Volumes are 8³–80³ and networks narrow,
so the whole file runs in seconds on one core.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from volsynth.config import PRESET_DIR, TrainConfig
from volsynth.errors import ConfigError
from volsynth.experiment import load_config
from volsynth.losses.edges import eagan_edge_map, edge_l1_loss, sobel_kernels, sobel_magnitude
from volsynth.losses.gan import discriminator_adversarial_loss, generator_adversarial_loss
from volsynth.methods import METHODS, Batch, StepContext, build_method
from volsynth.methods.cyclegan3d import CycleGAN3D, CycleGAN3DConfig
from volsynth.methods.eagan import EaGAN, EaGANConfig, edge_weight
from volsynth.methods.resunet_patchgan import ResUNetPatchGAN, ResUNetPatchGANConfig
from volsynth.nets.patchgan import (
    ImagePool,
    PatchDiscriminator,
    init_gan_weights,
    output_size,
    receptive_field,
    smallest_input,
)
from volsynth.nets.pix2pix_unet import Pix2PixUNet
from volsynth.nets.resnet_generator import ResnetGenerator
from volsynth.nets.resunet import ResidualBlock, ResUNet

CONFIGS = PRESET_DIR


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny convs are dominated by thread synchronisation on a shared 2-core machine; one thread is faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def context(method: nn.Module, *, iteration: int = 0, total: int = 100, seed: int = 0) -> StepContext:
    optimizers = method.configure_optimizers(TrainConfig(lr=1e-3, betas=(0.5, 0.999)))
    return StepContext(device=torch.device("cpu"), precision="fp32", optimizers=optimizers,
                       scalers={k: torch.amp.GradScaler("cpu", enabled=False) for k in optimizers}, grad_clip=None,
                       iteration=iteration, total_iterations=total, generator=torch.Generator().manual_seed(seed))


def random_batch(size: int = 16, batch: int = 1, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, size, size, size)
    return Batch(torch.rand(shape, generator=g), torch.rand(shape, generator=g))


# --------------------------------------------------------------------------------------------------------------
# PatchGAN


def test_patchgan_receptive_field_analytic() -> None:
    # r ← (r − 1)·s + k over [k4 s2]×n + [k4 s1]×2; n = 3 is pix2pix's "70×70" PatchGAN.
    assert [receptive_field(n) for n in (1, 2, 3, 4, 5)] == [16, 34, 70, 142, 286]
    assert PatchDiscriminator(3, 2, channels=2, n_layers=3).receptive_field == 70


def _gradient_extent(critic: nn.Module, shape: tuple[int, ...], voxel: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per axis, the first/last input index with a non-zero gradient of one output voxel."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = critic(x)
    out[(0, 0, *voxel)].backward()
    nonzero = x.grad[0].abs().sum(0) > 0  # type: ignore[index]
    extents = []
    for axis in range(nonzero.dim()):
        others = tuple(a for a in range(nonzero.dim()) if a != axis)
        hits = nonzero.any(dim=others) if others else nonzero
        index = torch.nonzero(hits).flatten()
        extents.append((int(index.min()), int(index.max())))
    return extents


def test_patchgan_receptive_field_empirical_3d() -> None:
    # Gradient of one interior output voxel is non-zero only inside a 70³ cube: total stride 8, offset
    # −(1 + 2 + 4 + 8 + 8) = −23 with padding 1, so output j covers input [8j − 23, 8j + 46].
    critic = PatchDiscriminator(3, in_channels=2, channels=2, n_layers=3, norm="batch").double().eval()
    extents = _gradient_extent(critic, (1, 2, 80, 80, 80), (3, 4, 4))
    assert extents == [(8 * j - 23, 8 * j + 46) for j in (3, 4, 4)]
    assert all(hi - lo + 1 == 70 for lo, hi in extents)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_patchgan_receptive_field_empirical_2d(n_layers: int) -> None:
    field = receptive_field(n_layers)
    critic = PatchDiscriminator(2, in_channels=1, channels=2, n_layers=n_layers, norm="none").double()
    size = field + 2 ** (n_layers + 1) * 2
    out_size = output_size(size, n_layers)
    centre = out_size // 2
    (lo0, hi0), (lo1, hi1) = _gradient_extent(critic, (1, 1, size, size), (centre, centre))
    assert hi0 - lo0 + 1 == field and hi1 - lo1 + 1 == field
    assert lo0 > 0 and hi0 < size - 1  # the cube was not clipped by the border, so the extent is the full field


def test_patchgan_output_grid_and_channels() -> None:
    assert [output_size(s) for s in (64, 96, 128, 256)] == [6, 10, 14, 30]  # seed-methods §3.2
    assert output_size(128, padding=2) == 19  # Ea-GAN's padding 2
    critic = PatchDiscriminator(3, in_channels=2, channels=4, padding=2)
    assert critic(torch.zeros(2, 2, 32, 32, 32)).shape == (2, 1, *(output_size(32, 3, 2),) * 3)
    critic = PatchDiscriminator(2, in_channels=1, channels=4, n_layers=2)
    assert critic(torch.zeros(1, 1, 48, 40)).shape == (1, 1, output_size(48, 2), output_size(40, 2))


@pytest.mark.parametrize(("n_layers", "padding"), [(2, 1), (3, 1), (3, 2)])
def test_smallest_critic_input_is_where_instance_norm_stops_failing(n_layers: int, padding: int) -> None:
    # Independent reference: torch's own instance norm, which refuses one value per channel in training mode.
    smallest = smallest_input(n_layers, padding)
    critic = PatchDiscriminator(3, 1, channels=2, n_layers=n_layers, norm="instance", padding=padding).train()
    assert critic(torch.zeros(1, 1, *(smallest,) * 3)).shape[2] >= 1
    if smallest > 1:
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            critic(torch.zeros(1, 1, *(smallest - 1,) * 3))
    assert [smallest_input(n) for n in (1, 2, 3)] == [6, 12, 24]


def test_gan_methods_refuse_patches_too_small_for_their_critic() -> None:
    config = load_config("cyclegan3d-cpu", ["data.sampling.patch_size=[16,16,16]"])
    with pytest.raises(ConfigError, match=r"patch_size \[16, 16, 16\] is too small .* at least 24 voxels"):
        build_method(config.method).check_data(config.data)
    fewer = load_config("cyclegan3d-cpu", ["data.sampling.patch_size=[16,16,16]", "method.discriminator_layers=2"])
    build_method(fewer.method).check_data(fewer.data)  # 12 voxels are enough for two layers
    batch_norm = load_config("resunet_patchgan-cpu", ["data.sampling.patch_size=[16,16,16]"])
    build_method(batch_norm.method).check_data(batch_norm.data)  # batch norm pools over the batch too
    instance = load_config("resunet_patchgan-cpu", ["data.sampling.patch_size=[16,16,16]",
                                                    "method.discriminator_norm=instance"])
    with pytest.raises(ConfigError, match="'resunet_patchgan': its 3-layer PatchGAN critic"):
        build_method(instance.method).check_data(instance.data)


def test_parameter_counts_match_the_public_code() -> None:
    # seed-methods.md [RUN] counts (M, 2 decimals) measured on the official code.
    with torch.device("meta"):
        cases = {
            "patchgan 2D, 2 ch": (PatchDiscriminator(2, 2), 2.76),
            "patchgan 3D, 2 ch": (PatchDiscriminator(3, 2), 11.05),
            "patchgan 3D, 3 ch (dEa)": (PatchDiscriminator(3, 3), 11.06),
            "unet_256 2D 3→3": (Pix2PixUNet(2, 3, 3, num_downs=8, channels=64), 54.41),
            "Ea-GAN unet_128 3D": (Pix2PixUNet(3, 1, 1, num_downs=7, channels=64, dropout=0.5), 167.27),
            "3D unet 6 downs ngf 32": (Pix2PixUNet(3, 1, 1, num_downs=6, channels=32), 29.24),
            "3D unet 6 downs ngf 16": (Pix2PixUNet(3, 1, 1, num_downs=6, channels=16), 7.31),
            "resnet_9blocks 2D 3→3": (ResnetGenerator(2, 3, 3, channels=64, n_blocks=9), 11.37),
            "resnet_9blocks 3D": (ResnetGenerator(3, 1, 1, channels=64, n_blocks=9), 34.11),
            "resnet_6blocks 3D": (ResnetGenerator(3, 1, 1, channels=64, n_blocks=6), 23.49),
            "resnet_6blocks 3D ngf 32": (ResnetGenerator(3, 1, 1, channels=32, n_blocks=6), 5.89),
        }
    for name, (network, millions) in cases.items():
        assert abs(count(network) / 1e6 - millions) < 0.01, (name, count(network))


def test_init_gan_weights_is_pix2pix_normal() -> None:
    torch.manual_seed(0)
    net = init_gan_weights(nn.Sequential(nn.Conv3d(1, 64, 4), nn.BatchNorm3d(64)), 0.02)
    conv, norm = net[0].requires_grad_(False), net[1].requires_grad_(False)
    assert abs(float(conv.weight.std()) - 0.02) < 0.002 and float(conv.bias.abs().max()) == 0.0
    assert abs(float(norm.weight.mean()) - 1.0) < 0.01 and float(norm.bias.abs().max()) == 0.0


# --------------------------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_generators_keep_shape_and_tanh_range(spatial_dims: int) -> None:
    torch.manual_seed(0)
    size = (16,) * spatial_dims
    x = torch.randn(2, 1, *size) * 3
    for net in (ResUNet(spatial_dims, 1, 1, channels=(4, 8, 16)), ResnetGenerator(spatial_dims, 1, 1, channels=4,
                                                                                  n_blocks=2),
                Pix2PixUNet(spatial_dims, 1, 1, num_downs=4, channels=4)):
        with torch.no_grad():
            y = net(x)
        assert y.shape == x.shape
        assert float(y.min()) >= -1 and float(y.max()) <= 1


@pytest.mark.parametrize("upsample", ["linear", "nearest", "transposed"])
def test_resunet_levels_and_size_check(upsample: str) -> None:
    net = ResUNet(3, 1, 1, channels=(4, 8, 8, 16), upsample=upsample)  # type: ignore[arg-type]
    assert net.divisor == 8
    assert net(torch.rand(1, 1, 8, 16, 24)).shape == (1, 1, 8, 16, 24)
    with pytest.raises(ValueError, match="multiple of 8"):
        net(torch.rand(1, 1, 12, 16, 16))


@pytest.mark.parametrize(("in_channels", "out_channels"), [(8, 8), (4, 8)])
def test_residual_block_with_zeroed_convs_is_its_shortcut(in_channels: int, out_channels: int) -> None:
    # seed-methods §3.3.1: the residual path adds to the identity / 1³ projection.
    torch.manual_seed(0)
    block = ResidualBlock(3, in_channels, out_channels)
    for module in block.body:
        if isinstance(module, nn.Conv3d):
            nn.init.zeros_(module.weight)
    x = torch.randn(2, in_channels, 6, 6, 6)
    expected = x if in_channels == out_channels else block.shortcut(x)
    torch.testing.assert_close(block(x), expected)
    assert isinstance(block.shortcut, nn.Identity) == (in_channels == out_channels)


def test_pix2pix_unet_dropout_placement() -> None:
    # pix2pix: dropout in the num_downs − 5 inner 8·ngf blocks only.
    for num_downs, expected in ((5, 0), (7, 2), (8, 3)):
        net = Pix2PixUNet(3, 1, 1, num_downs=num_downs, channels=2, dropout=0.5)
        assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == expected


# --------------------------------------------------------------------------------------------------------------
# Sobel / Ea-GAN edges


def test_sobel_kernels_are_eagan_filters() -> None:
    kernels = sobel_kernels(3)
    assert kernels.shape == (3, 1, 3, 3, 3)
    plane = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
    torch.testing.assert_close(kernels[0, 0, 0], plane)
    torch.testing.assert_close(kernels[0, 0, 1], torch.zeros(3, 3))
    torch.testing.assert_close(kernels[0, 0, 2], -plane)
    torch.testing.assert_close(kernels[1, 0, :, 0, :], plane)  # axis 1: difference along the second axis
    torch.testing.assert_close(kernels[2, 0, :, :, 2], -plane)


def test_sobel_impulse_hand_computed() -> None:
    # out[p] = Σ k[i]·in[p + i − 1]; for a unit impulse at c, gradient_a(p) = k_a[c − p + 1] / 4.
    image = torch.zeros(1, 1, 5, 5, 5)
    image[0, 0, 2, 2, 2] = 1.0
    magnitude = sobel_magnitude(image, pad_value=0.0)[0, 0]
    assert float(magnitude[2, 2, 2]) == 0.0  # the centre has zero difference along every axis
    assert math.isclose(float(magnitude[3, 2, 2]), 1.0, abs_tol=1e-6)  # (4, 0, 0)/4
    assert math.isclose(float(magnitude[1, 3, 2]), math.sqrt(0.5), abs_tol=1e-6)  # (2, 2, 0)/4
    assert math.isclose(float(magnitude[3, 1, 3]), math.sqrt(3) / 4, abs_tol=1e-6)  # (1, 1, 1)/4
    assert float(magnitude[0, 0, 0]) == 0.0  # outside the 3³ neighbourhood


def test_sobel_constant_volume() -> None:
    for value in (-1.0, 0.3):
        volume = torch.full((1, 1, 6, 7, 8), value)
        assert float(sobel_magnitude(volume, pad_value=value).abs().max()) < 1e-6  # float summation order only
        interior = sobel_magnitude(volume, pad_value=-1.0)[..., 1:-1, 1:-1, 1:-1]
        assert float(interior.abs().max()) < 1e-6  # the pad only affects the border
        if value != -1.0:  # a mismatched pad does show at the border: (0.3 + 1)·16/4 = 5.2
            assert math.isclose(float(sobel_magnitude(volume, pad_value=-1.0)[0, 0, 0, 3, 3]), 5.2, rel_tol=1e-5)
    # Ea-GAN check: a constant −1 volume (background) maps to −1 everywhere.
    torch.testing.assert_close(eagan_edge_map(torch.full((2, 1, 5, 5, 5), -1.0)), torch.full((2, 1, 5, 5, 5), -1.0))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("slope", [0.01, 0.05, 0.2])
def test_sobel_linear_ramp(axis: int, slope: float) -> None:
    # A ramp of slope a has magnitude 2a·16/4 = 8a inside the volume and edge map tanh(8a)·2 − 1 (seed §4.1).
    coords = torch.arange(8, dtype=torch.float32) * slope - 0.5
    shape = [1, 1, 1]
    shape[axis] = 8
    volume = coords.reshape(shape).expand(8, 8, 8)[None, None].contiguous()
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(sobel_magnitude(volume)[inner], torch.full((1, 1, 6, 6, 6), 8 * slope))
    edges = eagan_edge_map(volume)[inner]
    torch.testing.assert_close(edges, torch.full_like(edges, math.tanh(8 * slope) * 2 - 1))
    # 2D keeps the same 8a.
    plane = coords.reshape(8, 1).expand(8, 8)[None, None].contiguous()
    torch.testing.assert_close(sobel_magnitude(plane)[..., 1:-1, 1:-1], torch.full((1, 1, 6, 6), 8 * slope))


def test_sobel_permutes_with_axes_and_edge_loss() -> None:
    volume = torch.rand(1, 1, 6, 7, 8)
    permuted = volume.permute(0, 1, 4, 2, 3)
    torch.testing.assert_close(sobel_magnitude(permuted), sobel_magnitude(volume).permute(0, 1, 4, 2, 3))
    assert float(edge_l1_loss(volume, volume)) == 0.0
    synthetic = torch.full((1, 1, 6, 6, 6), -1.0, requires_grad=True)
    loss = edge_l1_loss(synthetic, torch.rand(1, 1, 6, 6, 6) * 2 - 1)
    loss.backward()
    assert float(loss.detach()) > 0 and torch.isfinite(synthetic.grad).all()  # type: ignore[arg-type]  # |∇| at 0


def test_eagan_edge_weight_ramp() -> None:
    # Official --rise_sobelLoss: λ = 100/20·epoch for epochs 0–20 of 150 → 0, 5, …, 100, then 100.
    for epoch in range(21):
        assert math.isclose(edge_weight(epoch / 150), 5.0 * epoch, abs_tol=1e-9)
    assert edge_weight(0.5) == 100.0 and edge_weight(1.0) == 100.0
    assert edge_weight(0.05, weight=10.0, ramp_end=0.1) == pytest.approx(5.0)
    assert edge_weight(0.0, ramp_end=0.0) == 100.0  # no ramp


# --------------------------------------------------------------------------------------------------------------
# GAN losses


def test_gan_losses_closed_forms() -> None:
    zeros = torch.zeros(2, 1, 3, 3, 3)
    assert math.isclose(float(discriminator_adversarial_loss(zeros, zeros, "bce")), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(generator_adversarial_loss(zeros, "bce")), math.log(2), rel_tol=1e-6)
    halves = torch.full((2, 1, 3, 3, 3), 0.5)
    assert math.isclose(float(discriminator_adversarial_loss(halves, halves, "lsgan")), 0.25, rel_tol=1e-6)
    assert math.isclose(float(generator_adversarial_loss(halves, "lsgan")), 0.25, rel_tol=1e-6)
    # LSGAN has no activation: a critic that outputs the labels exactly has zero loss.
    real, fake = torch.full((4,), 0.95), torch.full((4,), 0.15)
    assert float(discriminator_adversarial_loss(real, fake, "lsgan", real_label=0.95, fake_label=0.15)) == 0.0
    assert math.isclose(float(generator_adversarial_loss(torch.tensor([3.0]), "bce")),
                        math.log1p(math.exp(-3.0)), rel_tol=1e-6)
    with pytest.raises(ValueError, match="bce"):
        generator_adversarial_loss(zeros, "hinge")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# Image pool


def images(first: int, number: int) -> Tensor:
    """``number`` images (1, 2, 2, 2) whose voxels all equal their index, from ``first`` on."""
    return torch.arange(first, first + number, dtype=torch.float32).reshape(-1, 1, 1, 1, 1).expand(-1, 1, 2, 2, 2)


def ids(batch: Tensor) -> list[int]:
    return [int(v) for v in batch[:, 0, 0, 0, 0]]


def test_image_pool_disabled_and_filling() -> None:
    batch = images(0, 3)
    assert ImagePool(0).query(batch) is batch
    pool = ImagePool(5)
    assert ids(pool.query(batch, torch.Generator().manual_seed(0))) == [0, 1, 2]  # empty pool: input back
    assert len(pool) == 3
    assert ids(pool.query(images(3, 2), torch.Generator().manual_seed(0))) == [3, 4]  # still filling
    assert len(pool) == 5


def test_image_pool_cap_mix_and_determinism() -> None:
    def run(seed: int) -> tuple[list[int], ImagePool]:
        pool, g, seen = ImagePool(50), torch.Generator().manual_seed(seed), []
        for step in range(40):
            seen += ids(pool.query(images(3 * step, 3), g))
        return seen, pool

    seen, pool = run(0)
    assert len(pool) == 50  # capped
    after_fill = seen[50:]
    fresh = [i for i, v in enumerate(after_fill) if v == 50 + i]
    assert 0.3 < len(fresh) / len(after_fill) < 0.7  # about half new images, half from history
    assert any(v < 50 + i for i, v in enumerate(after_fill))  # returns older images
    assert sorted(ids(torch.cat(pool.images))) == sorted(set(ids(torch.cat(pool.images))))  # no duplicates
    assert run(0)[0] == seen  # same generator seed → same draws
    assert run(1)[0] != seen


def test_image_pool_state_round_trip() -> None:
    pool, g = ImagePool(4), torch.Generator().manual_seed(0)
    for step in range(3):
        pool.query(images(2 * step, 2), g)
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    buffer.seek(0)
    restored = ImagePool(4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))  # the trainer loads checkpoints like this
    assert ids(torch.cat(restored.images)) == ids(torch.cat(pool.images))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert ids(restored.query(images(10, 4), g1)) == ids(pool.query(images(10, 4), g2))
    with pytest.raises(ValueError, match="size"):
        ImagePool(3).load_state_dict(pool.state_dict())


# --------------------------------------------------------------------------------------------------------------
# Methods


def small_config(name: str) -> object:
    # 16³ patches at batch 1: the 3-layer PatchGAN with padding 1 would shrink to 1³ before its norm, so the
    # pix2pix-style critics here use 2 layers (34³ receptive field, still larger than the patch).
    if name == "resunet_patchgan":
        return ResUNetPatchGANConfig(channels=(4, 8, 16), discriminator_channels=4, discriminator_layers=2)
    if name == "cyclegan3d":
        return CycleGAN3DConfig(channels=4, n_blocks=2, discriminator_channels=4, discriminator_layers=2)
    if name == "eagan":
        return EaGANConfig(num_downs=4, channels=4, discriminator_channels=4)
    if name == "eagan-dea":
        return EaGANConfig(variant="dea", num_downs=4, channels=4, discriminator_channels=4)
    raise KeyError(name)


METHOD_CASES = ["resunet_patchgan", "cyclegan3d", "eagan", "eagan-dea"]


def test_methods_are_registered() -> None:
    for name, cls in (("resunet_patchgan", ResUNetPatchGAN), ("cyclegan3d", CycleGAN3D), ("eagan", EaGAN)):
        assert METHODS.get(name) is cls
    assert ResUNetPatchGAN.requires_paired_data and EaGAN.requires_paired_data
    assert not CycleGAN3D.requires_paired_data


@pytest.mark.parametrize("case", METHOD_CASES)
def test_train_step_finite_and_updates_every_network(case: str) -> None:
    torch.manual_seed(0)
    method = build_method(small_config(case))  # type: ignore[arg-type]
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in method.networks().items()}
    ctx = context(method)
    losses = method.train_step(random_batch(16, 1), ctx)
    assert losses and all(isinstance(v, float) and math.isfinite(v) for v in losses.values()), losses
    for name, net in method.networks().items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters(), strict=True))
        assert changed, f"{case}: {name} did not change"
    assert all(p.requires_grad for p in method.parameters())  # critics unfrozen again


@pytest.mark.parametrize("case", METHOD_CASES)
def test_translate_shape_range_and_batch_independence(case: str) -> None:
    torch.manual_seed(0)
    method = build_method(small_config(case))  # type: ignore[arg-type]
    ctx = context(method)
    for seed in range(2):  # a couple of steps so BN running statistics move away from (0, 1)
        method.train_step(random_batch(16, 2, seed), ctx)
    method.train()
    source = torch.rand(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    source[2] = 0.0  # an all-background window
    out = method.translate(source)
    assert out.shape == source.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Eval-mode statistics: a window's output does not depend on the other windows in the batch (with train-mode
    # BatchNorm it would), dropout is off (repeatable), and the method is left in training mode.
    torch.testing.assert_close(method.translate(source[:1]), out[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(method.translate(source), out)
    assert method.training
    extreme = method.translate(torch.cat([torch.zeros(1, 1, 16, 16, 16), torch.ones(1, 1, 16, 16, 16)]))
    assert float(extreme.min()) >= 0.0 and float(extreme.max()) <= 1.0


def test_batch_statistics_would_mix_windows() -> None:
    # Control for the test above: the same comparison in train mode does change, so it can fail.
    torch.manual_seed(0)
    method = build_method(small_config("resunet_patchgan"))  # type: ignore[arg-type]
    source = torch.rand(3, 1, 16, 16, 16)
    with torch.no_grad():
        alone, together = method(source[:1]), method(source)[:1]
    assert float((alone - together).abs().max()) > 1e-3


class _ConstantCritic(nn.Module):
    """A critic that outputs ``value`` everywhere (with a parameter, so it can be given an optimiser)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0], 1, 2, 2, 2), self.value) + 0 * self.weight


def test_resunet_patchgan_loss_weights() -> None:
    # seed §3.3.3: with D logits at 0, D loss = ln 2 and the G adversarial term = ln 2; L1 carries weight 100.
    torch.manual_seed(0)
    method = build_method(small_config("resunet_patchgan"))  # type: ignore[arg-type]
    method.discriminator = _ConstantCritic(0.0)
    losses = method.train_step(random_batch(16, 1), context(method))
    assert losses["discriminator"] == pytest.approx(math.log(2))
    assert losses["adversarial"] == pytest.approx(math.log(2))
    assert losses["generator"] == pytest.approx(math.log(2) + 100 * losses["l1"], rel=1e-5)


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_regression_unet_step_minimises_its_configured_distance(loss: str) -> None:
    """method.loss picks the voxel loss: the logged value is |synthetic − target| or its square, averaged."""
    from volsynth.methods.regression_unet import RegressionUNetConfig

    torch.manual_seed(0)
    method = build_method(RegressionUNetConfig(channels=(4, 8), strides=(2,), num_res_units=0, norm=None,
                                               loss=loss, output="linear"))  # type: ignore[arg-type]
    batch = random_batch(8, 1)
    with torch.no_grad():
        error = method(batch.source) - batch.target
    expected = (error.abs() if loss == "l1" else error ** 2).mean().item()
    assert method.train_step(batch, context(method))["loss"] == pytest.approx(expected, rel=1e-5)


def test_eagan_loss_weights_and_ramp_in_step() -> None:
    # LSGAN with D ≡ 0.5: D loss 0.25, G adversarial 0.25; λ_L1 = 300; the edge weight follows the ramp.
    torch.manual_seed(0)
    method = build_method(small_config("eagan"))  # type: ignore[arg-type]
    method.discriminator = _ConstantCritic(0.5)
    ramp_end = method.config.edge_ramp_end
    for progress, expected in ((0.0, 0.0), (ramp_end / 2, 50.0), (0.9, 100.0)):
        losses = method.train_step(random_batch(16, 1), context(method, iteration=round(progress * 1500), total=1500))
        assert losses["edge_weight"] == pytest.approx(expected)
        assert losses["discriminator"] == pytest.approx(0.25) and losses["adversarial"] == pytest.approx(0.25)
        total = 0.25 + 300 * losses["l1"] + expected * losses["edge"]
        assert losses["generator"] == pytest.approx(total, rel=1e-5)


def test_eagan_critic_inputs() -> None:
    gea = build_method(small_config("eagan"))  # type: ignore[arg-type]
    dea = build_method(small_config("eagan-dea"))  # type: ignore[arg-type]
    assert gea.discriminator.model[0].in_channels == 2  # (source, image)
    assert dea.discriminator.model[0].in_channels == 3  # (source, image, edge(image))
    image = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    torch.testing.assert_close(dea.critic_input(image, image)[:, 2:], eagan_edge_map(image))


class _IdentityGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def test_cyclegan_identity_generators_have_zero_cycle_and_identity_loss() -> None:
    torch.manual_seed(0)
    method = build_method(small_config("cyclegan3d"))  # type: ignore[arg-type]
    assert method.target_critic.model[0].in_channels == 1  # unconditional critics
    method.source_to_target, method.target_to_source = _IdentityGenerator(), _IdentityGenerator()
    losses = method.train_step(random_batch(16, 1), context(method))
    assert losses["cycle"] == 0.0 and losses["identity"] == 0.0
    assert losses["generator"] == pytest.approx(losses["adversarial"])
    assert len(method.synthetic_target_pool) == 1 and len(method.synthetic_source_pool) == 1


def test_cyclegan_pools_survive_state_dict() -> None:
    torch.manual_seed(0)
    method = build_method(small_config("cyclegan3d"))  # type: ignore[arg-type]
    method.train_step(random_batch(16, 1), context(method))
    state = method.state_dict()
    assert "synthetic_target_pool._extra_state" in state
    fresh = build_method(small_config("cyclegan3d"))  # type: ignore[arg-type]
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.synthetic_target_pool.images[0], method.synthetic_target_pool.images[0])
    assert set(fresh.networks()) == {"source_to_target", "target_to_source", "target_critic", "source_critic"}


# --------------------------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", ["resunet_patchgan", "cyclegan3d", "eagan", "regression_unet"])
def test_presets_load_and_fit_their_patches(name: str) -> None:
    expected = {  # parameters (M) of each network for the paper presets
        "resunet_patchgan": {"generator": 5.95, "discriminator": 11.05},
        "cyclegan3d": {"source_to_target": 34.11, "target_to_source": 34.11, "target_critic": 11.05,
                       "source_critic": 11.05},
        "eagan": {"generator": 167.27, "discriminator": 11.05},
        "regression_unet": {"generator": 4.74},
    }[name]
    for kind in ("cpu", "paper"):
        config = load_config(CONFIGS / f"{name}-{kind}.yaml")
        assert config.method.name == name and config.data.manifest == ""
        with torch.device("meta"):  # no memory for the 167 M-parameter Ea-GAN generator
            method = build_method(config.method)
        assert all(p % method.patch_divisor == 0 for p in config.data.sampling.patch_size)
        counts = method.parameter_counts()
        if kind == "cpu":  # small enough to train in minutes on 2 CPU cores, in fp32 (bf16 is emulated there)
            sampling = config.data.sampling
            assert all(16 <= p <= 32 for p in sampling.patch_size)
            # voxels seen in training: at most 7,600 steps of 24³ (about 250 s for the regression UNet on one core)
            assert config.train.iterations * sampling.per_step * math.prod(sampling.patch_size) <= 7600 * 24**3
            assert config.train.precision == "fp32"
            assert sum(counts.values()) < 3e6
        else:
            assert {k: round(v / 1e6, 2) for k, v in counts.items()} == expected
