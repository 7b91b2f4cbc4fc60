"""Make-A-Volume: faithfulness to the paper [MAV §2.2–2.3, Eqs. 4–7] and the method contract."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from volsynth.config import DataConfig, InferenceConfig, SamplingConfig, TrainConfig
from volsynth.errors import ConfigError
from volsynth.experiment import load_config
from volsynth.methods import Batch, StepContext, build_method
from volsynth.methods.base import fold_slices
from volsynth.methods.make_a_volume import (
    AutoencoderConfig,
    DenoiserConfig,
    MakeAVolume,
    MakeAVolumeConfig,
    ddim_update,
    ddpm_update,
    epsilon_loss,
    sample_volume_timesteps,
)
from volsynth.nets.volumetric import (
    PseudoConv3d,
    VolumetricUNet,
    sequences_to_slices,
    slices_to_sequences,
)

# ----------------------------------------------------------------------------------------------------------------
# Helpers


def tiny_config(stage: str = "volumetric", **changes: object) -> MakeAVolumeConfig:
    """A few-thousand-parameter model: AE f = 4 (3 levels), UNet with 2 levels → divisor 8."""
    config = MakeAVolumeConfig(
        stage=stage,  # type: ignore[arg-type]
        autoencoder=AutoencoderConfig(channels=(8, 8, 8), num_res_blocks=1, mid_attention=False, norm_num_groups=4,
                                      latent_channels=3, batch=64),
        unet=DenoiserConfig(channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                            num_head_channels=8, norm_num_groups=4),
        steps=5, validation_steps=3,
    )
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def tiny_method(stage: str = "volumetric", *, seed: int = 0, randomise: bool = True, **changes: object
                ) -> MakeAVolume:
    torch.manual_seed(seed)
    method = MakeAVolume(tiny_config(stage, **changes))
    if randomise:
        randomise_2d(method.unet, seed)
    method.latent_scale.fill_(1.0)
    return method


def randomise_2d(unet: VolumetricUNet, seed: int) -> None:
    """MONAI zero-initialises the last conv of every block and the output conv, so a fresh UNet outputs exactly 0
    (every identity test would pass trivially): perturb every 2D parameter instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.spatial_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


def randomise_volumetric(unet: VolumetricUNet, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.volumetric_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


def context(method: MakeAVolume, iteration: int = 1, seed: int = 0, lr: float = 1e-3) -> StepContext:
    optimizers = method.configure_optimizers(TrainConfig(lr=lr))
    return StepContext(device=torch.device("cpu"), precision="fp32", optimizers=optimizers,
                       scalers={k: torch.amp.GradScaler("cpu", enabled=False) for k in optimizers},
                       grad_clip=None, iteration=iteration, total_iterations=10,
                       generator=torch.Generator().manual_seed(seed))


def slab_batch(items: int, depth: int, size: int = 16, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    source = torch.rand(items, 1, size, size, depth, generator=generator)
    return Batch(source, (1 - source) ** 2)


def slab_data(depth: int | str, **changes: object) -> DataConfig:
    return DataConfig(sampling=SamplingConfig(kind="slab", depth=depth, in_plane=(32, 32), **changes))  # type: ignore[arg-type]


class CallRecorder:
    """Records (batch size, timesteps, num_slices) of every UNet call."""

    def __init__(self, unet: VolumetricUNet) -> None:
        self.calls: list[tuple[int, torch.Tensor, int | None]] = []
        self.handle = unet.register_forward_pre_hook(self.hook)

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        x, timesteps = args[0], args[1]
        num_slices = args[2] if len(args) > 2 else None
        self.calls.append((x.shape[0], timesteps.detach().clone(), num_slices))


# ----------------------------------------------------------------------------------------------------------------
# Volumetric layers [MAV Eqs. 5–7]


def test_rearrange_round_trip_is_exact_and_keeps_volumes_apart() -> None:
    volumes, slices, channels, height, width = 2, 5, 3, 4, 6
    features = torch.randn(volumes * slices, channels, height, width)
    sequences = slices_to_sequences(features, slices)
    assert sequences.shape == (volumes * height * width, channels, slices)
    assert torch.equal(sequences_to_slices(sequences, slices, height, width), features)
    # element by element: sequence (v, y, x) holds slice j of volume v at position (y, x)
    for v, y, x, j in [(0, 0, 0, 0), (1, 3, 5, 4), (1, 2, 1, 2), (0, 1, 4, 3)]:
        torch.testing.assert_close(sequences[(v * height + y) * width + x, :, j], features[v * slices + j, :, y, x],
                                   rtol=0, atol=0)
    # the wrong factorisation (n outer, b_v inner) puts two volumes in one sequence
    swapped = features.reshape(slices, volumes, channels, height, width).permute(1, 0, 2, 3, 4).reshape(
        volumes * slices, channels, height, width)
    assert not torch.equal(slices_to_sequences(swapped, slices), sequences)
    with pytest.raises(ValueError, match="whole number of volumes"):
        slices_to_sequences(features, 3)


def test_volumetric_layers_sit_after_every_3x3_conv_and_start_as_identity() -> None:
    torch.manual_seed(0)
    plain = DiffusionModelUNet(spatial_dims=2, in_channels=6, out_channels=3, channels=(8, 16),
                               attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4,
                               num_head_channels=8)
    threes = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    wrapped = VolumetricUNet(copy.deepcopy(plain))
    layers = wrapped.volumetric_layers()
    assert len(layers) == len(threes) > 5
    assert all(isinstance(layer, PseudoConv3d) and layer.volumetric.kernel_size == (3,) for layer in layers)
    for layer in layers:
        weight = layer.volumetric.weight
        expected = torch.zeros_like(weight)
        expected[torch.arange(weight.shape[0]), torch.arange(weight.shape[0]), 1] = 1.0
        assert torch.equal(weight, expected) and not layer.volumetric.bias.any()


def test_stage_3_unet_equals_stage_2_unet_bit_for_bit_at_insertion() -> None:
    """[MAV §2.3] identity init: inserting the layers changes nothing (fp32, random weights, inputs and t)."""
    torch.manual_seed(0)
    plain = DiffusionModelUNet(spatial_dims=2, in_channels=6, out_channels=3, channels=(8, 16),
                               attention_levels=(False, True), num_res_blocks=1, norm_num_groups=4,
                               num_head_channels=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    wrapped = VolumetricUNet(copy.deepcopy(plain))
    x = torch.randn(2 * 7, 6, 16, 16, generator=generator)
    t = torch.randint(0, 1000, (2 * 7,), generator=generator)
    with torch.no_grad():
        expected = plain(x, t)
        assert expected.abs().mean() > 1e-3  # not the trivial zero output of a fresh MONAI UNet
        assert torch.equal(wrapped(x, t, num_slices=7), expected)
        assert torch.equal(wrapped(x, t, num_slices=None), expected)
        randomise_volumetric(wrapped, 2)
        assert not torch.allclose(wrapped(x, t, num_slices=7), expected)  # the comparison can fail


def _perturbation_effect(unet: VolumetricUNet, x: torch.Tensor, t: torch.Tensor, num_slices: int, row: int
                         ) -> torch.Tensor:
    """Per output row: max |change| when input row ``row`` is perturbed."""
    changed = x.clone()
    changed[row] += 1.0
    with torch.no_grad():
        return (unet(changed, t, num_slices) - unet(x, t, num_slices)).flatten(1).abs().amax(1)


def test_slices_are_independent_at_init_coupled_after_training_and_volumes_never_mix() -> None:
    method = tiny_method()
    slices, volumes = 5, 2
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(volumes * slices, 6, 8, 8, generator=generator)
    t = torch.full((volumes * slices,), 400)
    effect = _perturbation_effect(method.unet, x, t, slices, row=2)
    assert effect[2] > 0 and torch.count_nonzero(effect) == 1  # at init: slice j depends on slice j only
    randomise_volumetric(method.unet, 4)
    effect = _perturbation_effect(method.unet, x, t, slices, row=2)
    assert effect[1] > 0 and effect[3] > 0  # now neighbouring slices see slice 2 ...
    assert torch.count_nonzero(effect[slices:]) == 0  # ... but never the other volume
    effect = _perturbation_effect(method.unet, x, t, slices, row=slices + 1)
    assert torch.count_nonzero(effect[:slices]) == 0 and effect[slices + 2] > 0
    # bypassed (num_slices None): purely 2D again
    assert torch.count_nonzero(_perturbation_effect(method.unet, x, t, None, row=2)) == 1  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Timesteps, losses, samplers


def test_volume_timestep_sampler_prefers_small_t_as_2T_minus_t() -> None:
    """[MAV §2.3] P(t) ∝ 2T − t: P(t=1)/P(t=T) = 1.999, E[t−1] = 443.93 (uniform: ratio 1, mean 499.5)."""
    T, draws = 1000, 1_000_000
    bins = np.arange(T)

    def ratio_and_mean(samples: torch.Tensor) -> tuple[float, float]:
        counts = np.bincount(samples.numpy(), minlength=T) / draws
        slope, intercept = np.polyfit(bins, counts, 1)  # a line through 1000 bins: noise-free enough at 1e6
        return float(intercept / (intercept + slope * (T - 1))), float(samples.double().mean())

    ratio, mean = ratio_and_mean(sample_volume_timesteps(draws, T, torch.Generator().manual_seed(0)))
    assert ratio == pytest.approx((2 * T - 1) / T, rel=0.05)
    expected_mean = float(sum((2 * T - t) * (t - 1) for t in range(1, T + 1)) / sum(2 * T - t for t in range(1, T + 1)))
    assert expected_mean == pytest.approx(443.926, abs=0.001)  # E[t] = 444.926 for 1-indexed t
    assert mean == pytest.approx(expected_mean, rel=0.01)
    uniform_ratio, uniform_mean = ratio_and_mean(torch.randint(0, T, (draws,), generator=torch.Generator()
                                                               .manual_seed(0)))
    assert uniform_ratio != pytest.approx((2 * T - 1) / T, rel=0.05)
    assert uniform_mean != pytest.approx(expected_mean, rel=0.01)


def test_volumetric_stage_draws_one_t_per_volume_and_slice_stage_one_per_slice() -> None:
    method = tiny_method("volumetric")
    recorder = CallRecorder(method.unet)
    method.train_step(slab_batch(3, 4), context(method))
    size, timesteps, num_slices = recorder.calls[-1]
    assert size == 12 and num_slices == 4
    per_volume = timesteps.reshape(3, 4)
    assert (per_volume == per_volume[:, :1]).all()
    # and the draws follow 2T − t: over 3000 single-slice volumes the mean t is 443.9 ± 5 (uniform: 499.5 ± 5)
    method.train_step(slab_batch(3000, 1, size=8), context(method))
    assert float(recorder.calls[-1][1].float().mean()) == pytest.approx(443.93, abs=25)
    method = tiny_method("slice")
    recorder = CallRecorder(method.unet)
    method.train_step(slab_batch(8, 4), context(method))
    size, timesteps, num_slices = recorder.calls[-1]
    assert size == 32 and num_slices is None and len(set(timesteps.tolist())) > 16


def test_epsilon_loss_is_zero_for_the_true_noise_and_the_dimension_for_zero() -> None:
    """[MAV Eq. 4] ‖ε − ε_θ‖²: 0 when ε_θ = ε; E‖ε‖² = c·h·w when ε_θ = 0."""
    noise = torch.randn(4096, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(epsilon_loss(noise, noise, "sum")) == 0.0
    assert float(epsilon_loss(torch.zeros_like(noise), noise, "sum")) == pytest.approx(3 * 8 * 8, rel=0.01)
    assert float(epsilon_loss(torch.zeros_like(noise), noise)) == pytest.approx(1.0, rel=0.01)
    assert float(epsilon_loss(noise + 0.5, noise)) == pytest.approx(0.25, rel=1e-6)


def test_noise_schedule_is_ldm_linear_in_sqrt_beta() -> None:
    method = tiny_method()
    expected = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(method.ddpm.betas.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(method.ddpm.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_update_matches_monai_ddim_step(eta: float) -> None:
    scheduler = DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False)
    scheduler.set_timesteps(10)  # stride 100: MONAI's previous timestep is t − 100
    generator = torch.Generator().manual_seed(0)
    sample, predicted = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    for t in (900, 500, 0):
        expected, _ = scheduler.step(predicted, t, sample, eta=eta, generator=torch.Generator().manual_seed(5))
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
        alpha_bar = float(scheduler.alphas_cumprod[t])
        alpha_bar_prev = float(scheduler.alphas_cumprod[t - 100]) if t >= 100 else 1.0
        actual = ddim_update(sample, predicted, alpha_bar, alpha_bar_prev, eta=eta, noise=noise)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_ddpm_update_matches_monai_ddpm_step() -> None:
    scheduler = DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False)
    generator = torch.Generator().manual_seed(0)
    sample, predicted = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    for t in (999, 400, 1, 0):
        expected, _ = scheduler.step(predicted, t, sample, generator=torch.Generator().manual_seed(7))
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7))
        actual = ddpm_update(sample, predicted, t, scheduler.betas, scheduler.alphas_cumprod, noise=noise)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_ddim_is_deterministic_and_calls_the_unet_once_per_step_on_every_slice() -> None:
    method = tiny_method("volumetric", steps=7).eval()
    randomise_volumetric(method.unet, 1)
    recorder = CallRecorder(method.unet)
    source = torch.rand(2, 1, 16, 16, 5, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed + b) for b in range(2)]
        with torch.no_grad():
            return method.translate(source, generators)

    first = run(0)
    assert len(recorder.calls) == 7
    assert all(size == 10 and num_slices == 5 for size, _, num_slices in recorder.calls)
    assert [int(t[0]) for _, t, _ in recorder.calls] == sorted({int(t[0]) for _, t, _ in recorder.calls},
                                                               reverse=True)
    assert torch.equal(run(0), first)
    assert not torch.equal(run(10), first)
    # batching does not change a volume: item 1 alone with its own generator
    with torch.no_grad():
        alone = method.translate(source[1:], [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(alone, first[1:], rtol=0, atol=1e-5)


def test_ddpm_sampler_runs_every_timestep() -> None:
    method = tiny_method("slice", sampler="ddpm", timesteps=40).eval()
    recorder = CallRecorder(method.unet)
    with torch.no_grad():
        output = method.translate(torch.rand(1, 1, 16, 16, 2))
    assert len(recorder.calls) == 40 and [int(t[0]) for _, t, _ in recorder.calls] == list(range(39, -1, -1))
    assert output.shape == (1, 1, 16, 16, 2) and 0 <= float(output.min()) and float(output.max()) <= 1


@pytest.mark.parametrize(("sampler", "eta", "timesteps"), [("ddim", 0.0, 1000), ("ddim", 1.0, 1000),
                                                           ("ddpm", 0.0, 60)])
def test_samplers_recover_the_target_with_an_oracle_noise_prediction(sampler: str, eta: float, timesteps: int
                                                                     ) -> None:
    """With ε̂ = the true noise of a known ẑ_0 every chain must end at ẑ_0, i.e. return D(ẑ_0) (the loop, the
    update formulas, the latent scaling and the decoding together)."""
    method = tiny_method("volumetric", sampler=sampler, eta=eta, steps=8, timesteps=timesteps).eval()
    method.latent_scale.fill_(0.7)
    generator = torch.Generator().manual_seed(0)
    source, target = torch.rand(2, 1, 16, 16, 3, generator=generator), torch.rand(2, 1, 16, 16, 3, generator=generator)
    with torch.no_grad():
        clean = method._encode(fold_slices(target)) * 0.7
        expected = ((method.autoencoder.decode(clean / 0.7) + 1) / 2).clamp(0, 1)

    def oracle(noisy: torch.Tensor, condition: torch.Tensor, timestep: int, num_slices: int | None) -> torch.Tensor:
        alpha_bar = float(method.ddpm.alphas_cumprod[timestep])
        return (noisy - alpha_bar**0.5 * clean) / (1 - alpha_bar) ** 0.5

    method.predict_noise = oracle  # type: ignore[method-assign]
    with torch.no_grad():
        synthetic = method.translate(source)
    torch.testing.assert_close(fold_slices(synthetic), expected, rtol=0, atol=1e-4)


def test_inference_steps_override_and_inferers() -> None:
    method = tiny_method("volumetric")
    inferer = method.make_inferer(InferenceConfig(steps=3, sw_batch_size=2), slab_data("all", axis=1))
    assert (inferer.axis, inferer.depth, inferer.batch) == (1, "all", 2)  # type: ignore[attr-defined]
    recorder = CallRecorder(method.unet)
    with torch.no_grad():
        method.translate(torch.rand(1, 1, 8, 8, 3))
    assert len(recorder.calls) == 3
    slice_stage = tiny_method("slice")
    assert slice_stage.make_inferer(InferenceConfig(), slab_data(1)).depth == 1  # type: ignore[attr-defined]
    windowed = tiny_method("volumetric", window=6, window_overlap=2)
    inferer = windowed.make_inferer(InferenceConfig(), slab_data(6))
    assert (inferer.depth, inferer.overlap) == (6, 2)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="ddpm"):
        tiny_method(sampler="ddpm").make_inferer(InferenceConfig(steps=50), slab_data("all"))


# ----------------------------------------------------------------------------------------------------------------
# Architecture, stages and the contract


def test_conditioning_and_shapes() -> None:
    """[MAV §2.2] ε_θ(concat[z_t, z_c]); f = 4 (a 32² slice gives an 8² latent); UNet in = 2c, out = c."""
    method = tiny_method()
    mu, _ = method.autoencoder.encode(torch.rand(2, 1, 32, 32))
    assert mu.shape == (2, 3, 8, 8)
    unet = method.unet.unet
    assert (unet.in_channels, unet.out_channels) == (6, 3)
    generator = torch.Generator().manual_seed(0)
    noisy, condition = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    with torch.no_grad():
        reference = method.predict_noise(noisy, condition, 500, 4)
        assert not torch.allclose(method.predict_noise(noisy, condition + 1.0, 500, 4), reference)
        assert not torch.allclose(method.predict_noise(noisy + 1.0, condition, 500, 4), reference)
    odd = torch.rand(1, 1, 13, 19, 3)  # padded to the divisor inside, cropped back
    with torch.no_grad():
        assert method.translate(odd).shape == odd.shape


def test_volumetric_stage_trains_exactly_the_volumetric_layers() -> None:
    """[MAV §2.3] stage 2 (default): the optimiser holds the 1D convs only; everything else stays bit-identical."""
    method = tiny_method("volumetric")
    optimizer = method.configure_optimizers(TrainConfig())["volumetric"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in method.unet.volumetric_parameters()}
    before = {k: v.clone() for k, v in method.state_dict().items()}
    ctx = context(method)
    method.train_step(slab_batch(1, 6), ctx)
    after = method.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    volumetric = {k for k in before if ".volumetric." in k}
    assert changed and changed <= volumetric
    unfrozen = tiny_method("volumetric", train_unet=True)
    optimizer = unfrozen.configure_optimizers(TrainConfig())["volumetric"]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in unfrozen.unet.parameters())


def test_slice_stage_freezes_the_autoencoder_and_sets_the_latent_scale_once() -> None:
    method = tiny_method("slice")
    method.latent_scale.zero_()
    batch = slab_batch(4, 2)
    autoencoder = {k: v.clone() for k, v in method.autoencoder.state_dict().items()}
    volumetric = [p.clone() for p in method.unet.volumetric_parameters()]
    method.train_step(batch, context(method, seed=5))
    # LDM scale_by_std, recomputed independently: the same posterior means/samples (same generator draws)
    with torch.no_grad():
        mu_source, _ = method.autoencoder.encode(fold_slices(batch.source) * 2 - 1)
        mu_target, sigma_target = method.autoencoder.encode(fold_slices(batch.target) * 2 - 1)
        target = mu_target + sigma_target * torch.randn(mu_target.shape, generator=torch.Generator().manual_seed(5))
    expected = 1.0 / float(torch.cat([mu_source, target]).std())
    assert float(method.latent_scale) == pytest.approx(expected, rel=1e-5)
    method.train_step(slab_batch(4, 2, seed=1), context(method, iteration=2))
    assert float(method.latent_scale) == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(v, method.autoencoder.state_dict()[k]) for k, v in autoencoder.items())
    assert all(torch.equal(a, b) for a, b in zip(volumetric, method.unet.volumetric_parameters(), strict=True))


def test_autoencoder_stage_trains_on_both_modalities_with_l1_and_kl() -> None:
    method = tiny_method("autoencoder", randomise=False)
    unet = {k: v.clone() for k, v in method.unet.state_dict().items()}
    losses = method.train_step(slab_batch(2, 3), context(method))
    assert set(losses) >= {"loss", "l1", "kl"}
    assert losses["loss"] == pytest.approx(losses["l1"] + 1e-6 * losses["kl"], rel=1e-6)
    assert all(torch.equal(v, method.unet.state_dict()[k]) for k, v in unet.items())
    with pytest.raises(ConfigError, match="slice"):
        method.translate(torch.rand(1, 1, 16, 16, 2))
    with_gan = tiny_method("autoencoder", randomise=False, autoencoder=dataclasses.replace(
        tiny_config().autoencoder, adversarial_weight=0.1, discriminator_channels=8, discriminator_layers=2))
    losses = with_gan.train_step(slab_batch(2, 3), context(with_gan))
    assert "discriminator" in losses and np.isfinite(losses["discriminator"])
    with pytest.raises(ConfigError, match="perceptual"):
        tiny_method(autoencoder=dataclasses.replace(tiny_config().autoencoder, perceptual_weight=1.0))


def test_every_stage_has_the_same_architecture_and_checkpoints_chain(tmp_path: Path) -> None:
    autoencoder = tiny_method("autoencoder", randomise=False, autoencoder=dataclasses.replace(
        tiny_config().autoencoder, adversarial_weight=0.1, discriminator_channels=8, discriminator_layers=2))
    slice_stage, volumetric = tiny_method("slice", seed=1), tiny_method("volumetric", seed=2)
    keys = {k for k in autoencoder.state_dict() if not k.startswith("discriminator.")}
    assert keys == set(slice_stage.state_dict()) == set(volumetric.state_dict())
    slice_stage.load_pretrained(autoencoder.state_dict(), autoencoder.config, "ae.pt")  # drops D's weights
    loaded = slice_stage.autoencoder.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in autoencoder.autoencoder.state_dict().items())
    randomise_volumetric(slice_stage.unet, 3)  # whatever a slice-stage checkpoint holds there ...
    volumetric.load_pretrained(slice_stage.state_dict(), slice_stage.config, "slice.pt")
    probe = torch.randn(6, 6, 8, 8)
    t = torch.full((6,), 300)
    with torch.no_grad():  # ... stage 3 starts exactly at the stage-2 (2D) model
        assert torch.equal(volumetric.unet(probe, t, 3), slice_stage.unet(probe, t, None))
    assert float(volumetric.latent_scale) == float(slice_stage.latent_scale)


def test_check_data_accepts_slabs_and_the_stage_depths() -> None:
    for stage in ("autoencoder", "slice"):
        tiny_method(stage).check_data(slab_data(1))
        tiny_method(stage).check_data(slab_data(4))
    tiny_method("volumetric").check_data(slab_data("all"))
    with pytest.raises(ConfigError, match=r"data\.sampling\.depth.*volumetric"):
        tiny_method("volumetric").check_data(slab_data(1))
    with pytest.raises(ConfigError, match=r"data\.sampling\.kind"):
        tiny_method("slice").check_data(DataConfig())
    with pytest.raises(ConfigError, match=r"data\.sampling\.in_plane"):
        tiny_method("slice").check_data(DataConfig(sampling=SamplingConfig(kind="slab", in_plane=(36, 36))))
    windowed = tiny_method("volumetric", window=8)
    windowed.check_data(slab_data(8))
    with pytest.raises(ConfigError, match=r"data\.sampling\.depth.*window"):
        windowed.check_data(slab_data("all"))


def test_validation_scores_per_stage() -> None:
    rng = np.random.default_rng(0)
    source = rng.random((16, 16, 9)).astype(np.float32)
    target = (1 - source) ** 2
    method = tiny_method("autoencoder", randomise=False)
    inferer = method.make_inferer(InferenceConfig(), slab_data(1))
    scores = method.validation_scores(source, target, inferer, device=torch.device("cpu"))
    assert {"ssim", "psnr", "mae"} <= set(scores) and all(np.isfinite(v) for v in scores.values())
    method = tiny_method("volumetric", validation_slices=4)
    recorder = CallRecorder(method.unet)
    scores = method.validation_scores(source, target, method.make_inferer(InferenceConfig(), slab_data("all")),
                                      device=torch.device("cpu"))
    assert "ssim" in scores and len(recorder.calls) == 3  # validation_steps DDIM steps
    assert all(size == 4 and num_slices == 4 for size, _, num_slices in recorder.calls)


def test_presets_build_the_complete_model_and_count_parameters() -> None:
    # the paper's widths (384 M parameters) are counted in benchmarks/make_a_volume.py; here they are narrowed
    narrow = {"make_a_volume-cpu": [], "make_a_volume-paper": ["method.autoencoder.channels=[32, 32, 32]",
                                                               "method.unet.channels=[32, 64, 96, 128]"]}
    for name, divisor in (("make_a_volume-cpu", 16), ("make_a_volume-paper", 32)):
        config = load_config(name, narrow[name])
        assert config.method.stage == "volumetric"
        assert [s.name for s in config.stages] == ["autoencoder", "slice", "volumetric"]
        assert config.data.sampling.kind == "slab" and config.data.sampling.axis == 2
        method = build_method(config.method)
        assert method.patch_divisor == divisor
        counts = method.parameter_counts()
        assert 0 < counts["volumetric"] < counts["unet"]
        method.check_data(config.data)
        for stage in config.stages:  # each stage's data settings pass the stage's own check
            overrides = [f"{k}={json.dumps(v)}" for k, v in stage.overrides.items()]
            staged = load_config(name, [*overrides, *narrow[name]])
            build_method(staged.method).check_data(staged.data)
    assert load_config("make_a_volume-paper").data.sampling.in_plane == (256, 256)


# ----------------------------------------------------------------------------------------------------------------
# End to end (the stage runner, the trainer and predict)


def _phantom_with_splits(root: Path, splits: tuple[str, ...], spacing: float) -> Path:
    from volsynth.data.phantom import make_phantom_cohort

    manifest = make_phantom_cohort(root, len(splits), seed=3, spacing=spacing, lesion_probability=0.0,
                                   contrasts=("t1", "t2"), montage=False)
    raw = json.loads(manifest.read_text())
    for entry, split in zip(raw["subjects"], splits, strict=True):
        entry["split"] = split
    raw["source"], raw["target"] = "t1", "t2"
    manifest.write_text(json.dumps(raw))
    return manifest


def test_stage_chain_then_predict_keeps_geometry(tmp_path: Path) -> None:
    """autoencoder → slice (init_from) → volumetric (init_from), a few iterations each; predict from the last."""
    from volsynth.data.io import read_volume
    from volsynth.experiment import load_checkpoint
    from volsynth.inference.predict import predict
    from volsynth.training.stages import plan, train_stages

    manifest = _phantom_with_splits(tmp_path / "phantom", ("train", "val", "test"), spacing=6.0)
    overrides = [f"data.manifest={manifest}", "data.split.mode=manifest", "data.spacing=[6.0, 6.0, 6.0]",
                 "train.iterations=3", "train.val_every=3", "train.checkpoint_every=3", "train.progress=false",
                 "method.validation_steps=2"]
    plans = plan("make_a_volume-cpu", overrides)
    assert plans is not None and [p.name for p in plans] == ["autoencoder", "slice", "volumetric"]
    train_stages(plans, tmp_path / "run")
    folders = [tmp_path / "run" / p.folder for p in plans]
    scales = [float(load_checkpoint(f / "checkpoints/last.pt")["model"]["latent_scale"]) for f in folders]
    assert scales[0] == 0 and scales[1] > 0 and scales[2] == scales[1]  # set once, in the slice stage
    outputs = predict(folders[-1] / "checkpoints/last.pt", manifest, tmp_path / "predictions",
                      subjects=["Phantom_00002"], seed=1, steps=3, progress=False)
    assert len(outputs) == 1
    source = read_volume(load_manifest_path(manifest, "Phantom_00002"))
    synthetic = read_volume(outputs[0])
    assert synthetic.same_grid(source) and np.isfinite(synthetic.array).all()
    with pytest.raises(ConfigError, match="slice"):  # the autoencoder stage alone cannot translate
        predict(folders[0] / "checkpoints/last.pt", manifest, tmp_path / "p0", subjects=["Phantom_00002"],
                progress=False)


def load_manifest_path(manifest: Path, subject: str) -> Path:
    from volsynth.data.manifest import load_manifest

    path = load_manifest(manifest).by_name()[subject].image("t1")
    assert path is not None
    return path


@pytest.mark.slow
def test_three_cpu_stages_learn_t1_to_t2_on_the_phantom(tmp_path: Path) -> None:
    """After the three CPU stages the validation L1 beats predicting the mean target intensity."""
    from volsynth.data.cache import prepare_subject
    from volsynth.data.manifest import load_manifest
    from volsynth.data.preprocess import Preprocessor
    from volsynth.experiment import load_method
    from volsynth.training.stages import plan, train_stages

    # 8 mm voxels: whole 32² slices (the preset's own 5 mm / 48² takes about twice as long)
    manifest = _phantom_with_splits(tmp_path / "phantom", ("train", "train", "val"), spacing=8.0)
    overrides = [f"data.manifest={manifest}", "data.split.mode=manifest", "data.spacing=[8.0, 8.0, 8.0]",
                 "data.sampling.in_plane=[32, 32]", "train.progress=false", "train.val_every=1000"]
    plans = plan("make_a_volume-cpu", overrides)
    assert plans is not None
    train_stages(plans, tmp_path / "run")
    method, config, _ = load_method(tmp_path / "run" / plans[-1].folder / "checkpoints/last.pt")
    preprocessor = Preprocessor(config.data, spacing=config.data.spacing, divisor=method.shape_divisor(config.data))
    val = prepare_subject(load_manifest(manifest).by_name()["Phantom_00002"], source="t1", target="t2",
                          preprocessor=preprocessor, cache_dir=tmp_path / "cache")
    source, target = np.asarray(val.source), np.asarray(val.target)
    synthetic = method.infer(source, method.make_inferer(config.inference, config.data), device=torch.device("cpu"),
                             seed=0)
    l1 = float(np.abs(synthetic - target).mean())
    mean_baseline = float(np.abs(target - target.mean()).mean())
    print(f"validation L1: trained {l1:.4f}, predict-the-mean {mean_baseline:.4f}")
    assert l1 < mean_baseline
