"""The mdagan method: config, presets, adversarial losses, one training step, release-compat defects."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from volsynth.config import PRESET_DIR, ExperimentConfig, TrainConfig
from volsynth.errors import ConfigError
from volsynth.experiment import load_checkpoint, load_config
from volsynth.losses.relativistic import (
    bce_discriminator_loss,
    bce_generator_loss,
    multilevel_loss,
    ragan_discriminator_loss,
    ragan_generator_loss,
)
from volsynth.methods import Batch, StepContext, build_method
from volsynth.methods.mdagan import (
    MDAGAN,
    AdversarialConfig,
    DiscriminatorConfig,
    GeneratorConfig,
    MDAGANConfig,
    PerceptionConfig,
)
from volsynth.nets.vgg import VGGWeightsUnavailable
from volsynth.training.trainer import train

CONFIGS = PRESET_DIR
TINY_G = GeneratorConfig(base_channels=4, growth_rates=(2, 2, 4, 4), rdbs_per_block=1, convs_per_rdb=3)
TINY_D = DiscriminatorConfig(base_channels=4)
NO_PERCEPTION = PerceptionConfig(weight=0.0)


def tiny_config(**changes: object) -> MDAGANConfig:
    base = MDAGANConfig(generator=TINY_G, discriminator=TINY_D, perception=NO_PERCEPTION)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def make_context(method: MDAGAN, precision: str = "fp32") -> StepContext:
    opts = method.configure_optimizers(TrainConfig())
    return StepContext(device=torch.device("cpu"), precision=precision, optimizers=opts,
                       scalers={k: torch.amp.GradScaler("cpu", enabled=False) for k in opts}, grad_clip=None)


def batch(size: int = 16, n: int = 1) -> Batch:
    return Batch(torch.rand(n, 1, size, size, size), torch.rand(n, 1, size, size, size))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# Adversarial losses (pure functions)


def test_ragan_closed_form() -> None:
    bce = torch.nn.functional.softplus  # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x)
    real = torch.tensor([[1.0, 3.0]])
    synthetic = torch.tensor([[0.0, -2.0]])
    mean_r, mean_s = 2.0, -1.0
    expected_d = 0.5 * (bce(-(real - mean_s)).mean() + bce(synthetic - mean_r).mean())
    expected_g = 0.5 * (bce(real - mean_s).mean() + bce(-(synthetic - mean_r)).mean())
    assert ragan_discriminator_loss(real, synthetic).item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert ragan_generator_loss(real, synthetic).item() == pytest.approx(expected_g.item(), rel=1e-6)
    zeros = torch.zeros(2, 1, 4, 4)
    assert ragan_discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert bce_discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert bce_generator_loss(zeros, zeros).item() == pytest.approx(math.log(2))


def test_relativistic_mean_global_vs_batch() -> None:
    real = torch.tensor([[0.0, 4.0], [2.0, 0.0]])
    synthetic = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    glob = ragan_discriminator_loss(real, synthetic, mean="global")
    per_voxel = ragan_discriminator_loss(real, synthetic, mean="batch")
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-(real - synthetic.mean(0, keepdim=True))).mean()
                      + sp(synthetic - real.mean(0, keepdim=True)).mean())
    assert per_voxel.item() == pytest.approx(expected.item(), rel=1e-6)
    assert glob.item() != pytest.approx(per_voxel.item())


def test_ragan_generator_detaches_real_logits() -> None:
    real = torch.randn(2, 1, 4, requires_grad=True)
    synthetic = torch.randn(2, 1, 4, requires_grad=True)
    ragan_generator_loss(real, synthetic).backward()
    assert real.grad is None
    assert synthetic.grad is not None and synthetic.grad.abs().sum() > 0


def test_multilevel_loss_sums_weighted_levels() -> None:
    real = {f"level_{k}": torch.randn(1, 1, 2, 2) for k in range(2)}
    synthetic = {f"level_{k}": torch.randn(1, 1, 2, 2) for k in range(2)}
    value = multilevel_loss("ragan", real, synthetic, (1.0, 3.0), side="discriminator")
    expected = sum(w * ragan_discriminator_loss(real[k], synthetic[k]) for w, k in zip((1.0, 3.0), real, strict=True))
    assert value.item() == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Config and presets


def test_presets_load_and_cpu_preset_builds() -> None:
    cpu = load_config(CONFIGS / "mdagan-cpu.yaml")
    paper = load_config(CONFIGS / "mdagan-paper.yaml")
    assert isinstance(cpu.method, MDAGANConfig) and isinstance(paper.method, MDAGANConfig)
    assert cpu.method.perception.weight == 0.0  # no silent random-VGG "perception" loss
    assert paper.data.sampling.patch_size == (96, 96, 96) and paper.data.sampling.per_step == 3
    assert paper.train.iterations == 100_000 and paper.train.schedule.milestones == [20000, 40000, 60000, 80000]
    assert paper.method.adversarial.weight == pytest.approx(1e-4)
    assert paper.method == MDAGANConfig()  # the dataclass defaults are the paper settings
    method = build_method(cpu.method)
    counts = method.parameter_counts()
    assert set(counts) == {"generator", "discriminator"}
    assert counts["generator"] < 1_000_000


def test_paper_preset_generator_parameter_count() -> None:
    paper = load_config(CONFIGS / "mdagan-paper.yaml", overrides=["method.perception.weight=0"])
    method = build_method(paper.method)
    assert abs(method.parameter_counts()["generator"] - 6_176_846) / 6_176_846 < 0.02
    assert method.parameter_counts()["generator"] == 6_176_846


def test_strict_config_rejects_unknown_adversarial_key() -> None:
    with pytest.raises(ConfigError, match="release_compat"):
        load_config({"method": {"name": "mdagan", "adversarial": {"release_compatt": True}}})
    with pytest.raises(ConfigError, match="mode"):
        load_config({"method": {"name": "mdagan", "adversarial": {"mode": "wgan"}}})


def test_missing_vgg_weights_fail_at_build_time_with_a_how_to(tmp_path: Path) -> None:
    missing = tmp_path / "vgg19.pth"
    config = tiny_config(perception=PerceptionConfig(weight=1.0, weights=str(missing)))
    with pytest.raises(VGGWeightsUnavailable) as info:
        MDAGAN(config)
    assert str(missing) in str(info.value) and "perception.weight=0" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_train_step_updates_generator_and_discriminator() -> None:
    config = tiny_config(perception=PerceptionConfig(weight=1.0, weights="random", slice_fraction=0.1))
    method = MDAGAN(config)
    assert method.perception is not None
    ctx = make_context(method)
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in method.networks().items()}
    logs = method.train_step(batch(16), ctx)
    assert set(logs) == {"l1", "perception", "adv_g", "adv_d", "total"}
    assert all(math.isfinite(v) for v in logs.values()), logs
    assert logs["perception"] > 0 and logs["adv_d"] > 0
    expected_total = logs["l1"] + logs["perception"] + 1e-4 * logs["adv_g"]
    assert logs["total"] == pytest.approx(expected_total, rel=1e-5)
    for name, net in method.networks().items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters(), strict=True))
        assert changed, name
        assert all(p.requires_grad for p in net.parameters()), f"{name} left frozen"
    # The frozen VGG is not a trainable network, not optimised and not checkpointed.
    assert set(method.networks()) == {"generator", "discriminator"}
    optimised = {id(p) for opt in ctx.optimizers.values() for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in method.perception.extractor.parameters())
    state = method.state_dict()
    assert not any("features" in key or key.startswith("perception") for key in state)
    assert sum(v.numel() for v in state.values()) < 1_000_000


def test_adversarial_warm_start_skips_the_discriminator_until_its_iteration() -> None:
    config = tiny_config(adversarial=AdversarialConfig(start_fraction=0.5))
    method = MDAGAN(config)
    ctx = make_context(method)
    ctx.total_iterations = 5  # the first 2.5 iterations without D
    for iteration, adversarial in ((1, False), (2, False), (3, True)):
        ctx.iteration = iteration
        generator = [p.detach().clone() for p in method.generator.parameters()]
        critic = [p.detach().clone() for p in method.discriminator.parameters()]
        logs = method.train_step(batch(16), ctx)
        assert any(not torch.equal(a, b) for a, b in zip(generator, method.generator.parameters(), strict=True))
        critic_moved = any(not torch.equal(a, b) for a, b in zip(critic, method.discriminator.parameters(),
                                                                strict=True))
        assert critic_moved == adversarial, iteration
        assert (logs["adv_d"] != 0 and logs["adv_g"] != 0) == adversarial, logs
        if not adversarial:  # the voxel loss alone
            assert logs["total"] == pytest.approx(logs["l1"], rel=1e-6)
    # Under train.time_box the phase follows the clock when it runs out first: at iteration 1 of 5 with 60 % of the
    # time budget used, D trains.
    ctx.iteration, ctx.time_progress = 1, 0.6
    critic = [p.detach().clone() for p in method.discriminator.parameters()]
    method.train_step(batch(16), ctx)
    assert any(not torch.equal(a, b) for a, b in zip(critic, method.discriminator.parameters(), strict=True))
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="start_fraction"):
            MDAGAN(tiny_config(adversarial=AdversarialConfig(start_fraction=bad)))


def test_generator_spectral_norm_switch_keeps_the_parameters() -> None:
    from torch.nn.utils import parametrize

    with_sn = MDAGAN(tiny_config())
    without = MDAGAN(tiny_config(generator=dataclasses.replace(TINY_G, spectral_norm=False)))
    def normalised(net: nn.Module) -> int:
        return sum(parametrize.is_parametrized(m) for m in net.modules())
    assert normalised(with_sn.generator) > 0 and normalised(without.generator) == 0
    assert normalised(without.discriminator) == normalised(with_sn.discriminator) > 0  # D keeps its own switch
    assert with_sn.parameter_counts() == without.parameter_counts()


def test_bf16_autocast_step() -> None:
    method = MDAGAN(tiny_config(perception=PerceptionConfig(weight=1.0, weights="random", slice_fraction=0.1)))
    logs = method.train_step(batch(16), make_context(method, "bf16"))
    assert all(math.isfinite(v) for v in logs.values()), logs
    assert logs["perception"] > 0


@pytest.mark.parametrize("mode", ["ragan", "bce"])
def test_release_compat_blocks_adversarial_gradient_to_the_generator(mode: str) -> None:
    grads = {}
    for compat in (False, True):
        torch.manual_seed(0)
        method = MDAGAN(tiny_config(adversarial=AdversarialConfig(mode=mode, release_compat=compat)))
        data = batch(8)
        loss = method.generator_adversarial_loss(method.generator(data.source), data.target)
        if loss.requires_grad:
            loss.backward()
        grads[compat] = sum(float(p.grad.abs().sum()) for p in method.generator.parameters() if p.grad is not None)
        assert math.isfinite(loss.item())
    assert grads[False] > 0
    assert grads[True] == 0.0


def test_release_compat_discriminator_ignores_synthetic_logits() -> None:
    # In plain-BCE release mode the synthetic term is inert: D's gradient equals that of ½·BCE(D(real), 1).
    method = MDAGAN(tiny_config(adversarial=AdversarialConfig(mode="bce", release_compat=True)))
    disc = method.discriminator
    assert disc is not None
    disc.eval()  # fixed spectral-norm vectors so two calls give identical logits
    data = batch(8)
    outputs = {k: v.detach() for k, v in method.generator(data.source).items()}
    method.discriminator_loss(outputs, data.target).backward()
    actual = [p.grad.clone() for p in disc.parameters()]
    disc.zero_grad()
    real = disc(method.discriminator_input(data.target))
    sum(0.5 * torch.nn.functional.softplus(-v).mean() for v in real.values()).backward()  # ½·BCE(D_r, 1)
    for a, b in zip(actual, disc.parameters(), strict=True):
        assert torch.allclose(a, b.grad, atol=1e-6)
    # The intended loss does use the synthetic logits.
    method.config.adversarial.release_compat = False
    disc.zero_grad()
    method.discriminator_loss(outputs, data.target).backward()
    assert any(not torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(actual, disc.parameters(), strict=True))


@pytest.mark.parametrize("changes", [
    {"adversarial": AdversarialConfig(mode="none")},
    {"discriminator": DiscriminatorConfig(kind="binary", base_channels=4)},
    {"generator": dataclasses.replace(TINY_G, multires_input=False, multires_output=False),
     "discriminator": DiscriminatorConfig(base_channels=4, multires_input=False)},
], ids=["no-gan", "binary-d", "single-resolution"])
def test_ablation_switches_train(changes: dict[str, object]) -> None:
    method = MDAGAN(tiny_config(**changes))
    ctx = make_context(method)
    logs = method.train_step(batch(16), ctx)
    assert all(math.isfinite(v) for v in logs.values()), logs
    if method.discriminator is None:
        assert set(ctx.optimizers) == {"generator"} and logs["adv_d"] == 0.0
    else:
        assert set(ctx.optimizers) == {"generator", "discriminator"}


def test_single_resolution_generator_feeds_discriminator_a_pyramid() -> None:
    method = MDAGAN(tiny_config(generator=dataclasses.replace(TINY_G, multires_output=False)))
    outputs = method.generator(torch.rand(1, 1, 16, 16, 16))
    assert list(outputs) == ["level_0"]
    levels = method.discriminator_input(outputs)
    assert [tuple(v.shape[2:]) for v in levels.values()] == [(16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3]
    assert torch.equal(levels["level_1"], outputs["level_0"][..., ::2, ::2, ::2])  # nearest, like the L1 targets


def test_translate_is_eval_clipped_full_resolution() -> None:
    method = MDAGAN(tiny_config())
    for head in method.generator.heads.values():
        nn.init.constant_(head.bias, 5.0)  # push the linear output above 1
    method.train()
    out = method.translate(torch.rand(2, 1, 16, 8, 24))
    assert out.shape == (2, 1, 16, 8, 24)
    assert out.min() >= 0 and out.max() <= 1 and not out.requires_grad
    assert method.generator.training  # mode restored
    assert method.patch_divisor == 8


@pytest.mark.slow
def test_trainer_runs_and_resumes_bit_exact(cohort: Path, tmp_path: Path) -> None:
    """The lead's trainer drives mdagan (two optimisers, spectral-norm buffers in the checkpoint) reproducibly."""
    def config(*extra: str) -> ExperimentConfig:
        return load_config(CONFIGS / "mdagan-cpu.yaml", [
            f"data.manifest={cohort}", "data.sampling.patch_size=[16,16,16]", "data.sampling.per_step=1",
            "train.iterations=4",
            "train.checkpoint_every=2", "train.val_every=2", "train.log_every=1", "train.progress=false",
            "method.generator.base_channels=4", "method.generator.growth_rates=[2,2,4,4]",
            "method.generator.rdbs_per_block=1", "inference.overlap=0.25", "inference.sw_batch_size=8",
            # D from the first step: the warm start is a fraction of train.iterations, which the legs change.
            "method.adversarial.start_fraction=0", *extra])

    train(config(), tmp_path / "straight")
    train(config("train.iterations=2"), tmp_path / "resumed")
    train(config(), tmp_path / "resumed", resume=True)
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["model"]
    assert a.keys() == b.keys() and any("parametrizations" in key for key in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
