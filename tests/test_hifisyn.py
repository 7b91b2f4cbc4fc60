"""HiFi-Syn [HFS]: contrastive losses (Eqs. 7–12), DRIT++ networks, the method contract, and end-to-end runs."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from volsynth.config import DataConfig, InferenceConfig, SamplingConfig, TrainConfig
from volsynth.errors import ConfigError
from volsynth.experiment import load_config
from volsynth.inferers import SlabInferer
from volsynth.losses.contrastive import (
    ggd_loss,
    masked_average_pool,
    pgd_loss,
    rank_weights,
    sgd_contrastive,
    sgd_loss,
    structure_deformation,
    structure_masked_content,
    supervised_contrastive_from_similarity,
    supervised_contrastive_loss,
)
from volsynth.methods import Batch, StepContext, build_method
from volsynth.methods.base import fold_slices, to_network_scale
from volsynth.methods.hifisyn import (
    LOSS_TERMS,
    HiFiSyn,
    HiFiSynConfig,
    content_adversarial_encoder_loss,
    majority_downsample,
    weighted_generator_loss,
)
from volsynth.nets.drit import ContentDiscriminator, ContentEncoders, DomainDiscriminator

TAU = 0.07


def tiny_config(**changes: object) -> HiFiSynConfig:
    base = HiFiSynConfig(base_channels=4, attribute_channels=8, discriminator_channels=4,
                         content_discriminator_strides=(2, 1, 1), content_discriminator_padding=3,
                         content_discriminator_iterations=1)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def tiny_method(**changes: object) -> HiFiSyn:
    torch.manual_seed(0)
    method = build_method(tiny_config(**changes))
    assert isinstance(method, HiFiSyn)
    return method


def context(method: HiFiSyn, iteration: int = 1, seed: int = 0) -> StepContext:
    optimizers = method.configure_optimizers(TrainConfig(lr=1e-3, betas=(0.5, 0.999)))
    return StepContext(device=torch.device("cpu"), precision="fp32", optimizers=optimizers,
                       scalers={k: torch.amp.GradScaler("cpu", enabled=False) for k in optimizers}, grad_clip=None,
                       iteration=iteration, generator=torch.Generator().manual_seed(seed))


def tiny_batch(seed: int = 0, size: int = 32, b: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 7, (b, 1, size, size, 1), generator=g)  # phantom labels incl. tumour 4–6
    return Batch(torch.rand(b, 1, size, size, 1, generator=g), torch.rand(b, 1, size, size, 1, generator=g), None,
                 labels, torch.randint(0, 4, (b, 1, size, size, 1), generator=g))


# ---------------------------------------------------------------------------------------------------------------
# Contrastive core and the three granularities


def test_rank_weights_are_descending_zero_based() -> None:
    weights = rank_weights(torch.tensor([[3.0, 1.0, 2.0]]), alpha=0.5)
    expected = torch.tensor([[1.0, math.exp(-1.0), math.exp(-0.5)]])
    assert torch.allclose(weights, expected, rtol=0, atol=1e-7)
    assert torch.all((weights > 0) & (weights <= 1))
    # An absent structure takes no rank: the others close up, it gets 0.
    present = torch.tensor([[True, False, True]])
    assert torch.allclose(rank_weights(torch.tensor([[3.0, 9.0, 2.0]]), 0.5, present),
                          torch.tensor([[1.0, 0.0, math.exp(-0.5)]]), atol=1e-7)


def test_sgd_with_unit_weights_is_plain_supcon_and_the_ggd_call() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(8, 5, generator=g)
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    sgd = sgd_contrastive(features, groups, torch.ones(8), TAU)
    assert torch.allclose(sgd, ggd_loss(features, groups, TAU), atol=1e-6)
    assert torch.allclose(sgd, supervised_contrastive_loss(features, groups, TAU), atol=1e-6)
    # ... and a weight below 1 changes it.
    assert not torch.allclose(sgd, sgd_contrastive(features, groups, torch.full((8,), 0.5), TAU), atol=1e-3)


@pytest.mark.parametrize(("negatives", "tau"), [(1, 0.5), (4, 0.5), (9, 1.0), (9, 0.25)])
def test_supcon_closed_form_on_orthogonal_vectors(negatives: int, tau: float) -> None:
    # Anchor e0, its positive e0 (cosine 1), K negatives e1..eK (cosine 0 with the anchor). (τ ≥ 0.25 keeps the
    # value well above float32 resolution: at τ = 0.07 it is ≈ K·e^{−14}.)
    eye = torch.eye(negatives + 1)
    features = torch.cat([eye[:1], eye[:1], eye[1:]])
    groups = torch.tensor([0, 0, *range(1, negatives + 1)])
    per_anchor = supervised_contrastive_loss(features, groups, tau, reduction="none")
    expected = -1 / tau + math.log(math.exp(1 / tau) + negatives)
    assert per_anchor[0].item() == pytest.approx(expected, rel=1e-5)
    # Excluding the positive from the denominator would give log(K) instead.
    assert abs(per_anchor[0].item() - math.log(negatives)) > 1e-2
    # Anchors without a positive carry 0 and do not enter the mean.
    assert torch.all(per_anchor[2:] == 0)
    mean = supervised_contrastive_loss(features, groups, tau)
    assert mean.item() == pytest.approx(expected, rel=1e-5)


def test_weight_scales_only_the_positive_logit_so_weak_pairs_are_pushed_apart() -> None:
    # Anchor 0, positive 1 with cosine 0.9, three negatives at cosine 0.
    similarity = torch.zeros(5, 5)
    similarity[0, 1] = similarity[1, 0] = 0.9
    similarity.fill_diagonal_(1.0)
    similarity.requires_grad_(True)
    groups = torch.tensor([0, 0, 1, 2, 3])
    weight = torch.full((5,), 0.3)
    loss = supervised_contrastive_from_similarity(similarity, groups, TAU, positive_weight=weight,
                                                  reduction="none")[0]
    loss.backward()
    share = math.exp(0.9 / TAU) / (math.exp(0.9 / TAU) + 3)  # P⁺ > 0.3
    assert similarity.grad is not None
    gradient = similarity.grad[0, 1].item()
    assert gradient > 0  # the literal Eq. 11 pushes this positive pair apart
    assert gradient == pytest.approx((share - 0.3) / TAU, rel=1e-5)
    # w·(−log p) would always pull (negative gradient): the literal form is what is implemented.
    assert loss.item() == pytest.approx(-0.3 * 0.9 / TAU + math.log(math.exp(0.9 / TAU) + 3), rel=1e-5)


def test_structure_masking_and_deformation() -> None:
    g = torch.Generator().manual_seed(2)
    content = torch.randn(2, 3, 4, 4, generator=g)
    labels = torch.randint(0, 4, (2, 4, 4), generator=g)
    masked = structure_masked_content(content, labels, [1, 2, 3])  # (B, L, C, H, W)
    for k, s in enumerate([1, 2, 3]):
        inside = (labels == s).unsqueeze(1).expand_as(content)
        assert torch.all(masked[:, k][~inside] == 0)
        assert torch.equal(masked[:, k][inside], content[inside])
    assert torch.all(structure_deformation(masked, masked.clone()) == 0)
    shifted = structure_masked_content(content + 1.0, labels, [1, 2, 3])
    area = torch.stack([(labels == s).sum(dim=(1, 2)) for s in (1, 2, 3)], dim=1).float()
    assert torch.allclose(structure_deformation(masked, shifted), 3 * area)  # Σ_{x,y,c} |1| = C · area
    pooled, present = masked_average_pool(content, labels, [1, 2, 3])
    b, s = 1, 2
    region = labels[b] == 3
    assert torch.allclose(pooled[b, s], content[b][:, region].mean(dim=1), atol=1e-6)
    assert torch.equal(present, area > 0)


def test_pgd_is_a_supcon_problem_per_pixel() -> None:
    g = torch.Generator().manual_seed(3)
    contents = torch.randn(6, 4, 3, 2, generator=g)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    by_pixel = [supervised_contrastive_loss(contents[:, :, y, x], groups, TAU)
                for y in range(3) for x in range(2)]
    assert pgd_loss(contents, groups, TAU).item() == pytest.approx(torch.stack(by_pixel).mean().item(), rel=1e-5)
    assert pgd_loss(contents, groups, TAU, reduction="sum").item() == pytest.approx(
        sum(float(v) * 6 for v in by_pixel), rel=1e-5)


def test_sgd_ignores_background_pixels_and_prefers_aligned_structures() -> None:
    g = torch.Generator().manual_seed(4)
    content = torch.randn(2, 4, 6, 6, generator=g)
    labels = torch.randint(0, 4, (2, 6, 6), generator=g)
    translated = content + 0.05 * torch.randn(2, 4, 6, 6, generator=g)
    loss = sgd_loss(content, translated, labels, [1, 2, 3], TAU)
    noise = torch.where((labels == 0).unsqueeze(1), torch.randn(2, 4, 6, 6, generator=g), torch.zeros(()))
    assert sgd_loss(content + noise, translated + noise, labels, [1, 2, 3], TAU).item() == pytest.approx(
        loss.item(), rel=1e-6)
    scrambled = torch.randn(2, 4, 6, 6, generator=g)
    assert sgd_loss(content, scrambled, labels, [1, 2, 3], TAU) > loss


def test_content_adversarial_encoder_gradient_vanishes_at_one_half() -> None:
    logits = torch.zeros(3, 1, 2, 2, requires_grad=True)  # σ(0) = 0.5
    loss = content_adversarial_encoder_loss(logits)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    off = torch.full((3, 1, 2, 2), 1.5, requires_grad=True)
    content_adversarial_encoder_loss(off).backward()
    assert off.grad is not None and torch.all(off.grad > 0)  # pushed back towards 0.5


def test_generator_loss_is_the_eq17_weighted_sum() -> None:
    config = HiFiSynConfig()
    ones = {name: torch.tensor(1.0) for name in LOSS_TERMS}
    assert weighted_generator_loss(ones, config).item() == pytest.approx(26.0)
    values = dict(zip(LOSS_TERMS, (2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0), strict=True))
    terms = {name: torch.tensor(v) for name, v in values.items()}
    by_hand = 1 * 2 + 1 * 3 + 10 * 5 + 10 * 7 + 1 * 11 + 2 * 13 + 1 * 17
    assert weighted_generator_loss(terms, config).item() == pytest.approx(by_hand)
    with pytest.raises(KeyError):
        weighted_generator_loss({k: v for k, v in terms.items() if k != "sgd"}, config)


def test_train_step_minimises_the_weighted_sum_with_mocked_critics(monkeypatch: pytest.MonkeyPatch) -> None:
    method = tiny_method()

    class Constant(nn.Module):  # a critic that always answers logit 0 (probability 0.5)
        def __init__(self) -> None:
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=1, keepdim=True) * 0.0 + self.offset

    method.domain_discriminator = nn.ModuleList([Constant(), Constant()])
    method.content_discriminator = Constant()  # type: ignore[assignment]
    method.configure_optimizers = lambda train: {  # type: ignore[method-assign]
        "generator": torch.optim.SGD(method.generator.parameters(), lr=0.0),
        "discriminator": torch.optim.SGD(method.domain_discriminator.parameters(), lr=0.0),
        "content_discriminator": torch.optim.SGD(method.content_discriminator.parameters(), lr=0.0)}
    logged = method.train_step(tiny_batch(), context(method))
    assert logged["content_adversarial"] == pytest.approx(2 * math.log(2), rel=1e-5)
    assert logged["domain_adversarial"] == pytest.approx(2 * math.log(2), rel=1e-5)
    weights = (1, 1, 10, 10, 1, 2, 1)
    assert logged["generator"] == pytest.approx(sum(w * logged[k] for w, k in zip(weights, LOSS_TERMS, strict=True)),
                                                rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Networks


def test_paper_width_shapes_and_discriminator_layouts() -> None:
    torch.manual_seed(0)
    encoders = ContentEncoders(2, 1, 64)
    with torch.no_grad():
        content = encoders.eval()(torch.rand(1, 1, 216, 216), 0)
    assert content.shape == (1, 256, 54, 54)  # [HFS §4.2]
    domain = DomainDiscriminator(2, 1, 64)
    convs = [m for m in domain.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1024, 1024, 1024, 1]
    assert [c.kernel_size[0] for c in convs] == [3, 3, 3, 3, 3, 3, 3, 1]
    critic = ContentDiscriminator(2, 256)
    kernels = [m.kernel_size[0] for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [7, 7, 7, 4, 1]
    with torch.no_grad():
        assert critic(content).shape == (1, 1, 1, 1)
    # DRIT++'s parameter counts (1-channel, both domains): content encoders 9.01 M, D^c 10.68 M.
    assert round(sum(p.numel() for p in encoders.parameters()) / 1e4) == 901
    assert round(sum(p.numel() for p in critic.parameters()) / 1e4) == 1068


def test_tiny_method_shapes_and_memory_layout() -> None:
    method = tiny_method()
    assert method.memory.num_items == 20
    assert (method.memory.num_structure_items, method.memory.num_global_items) == (10, 10)
    x = torch.rand(2, 1, 32, 40)
    with torch.no_grad():
        content = method.content_encoder.eval()(x, 0)
        attribute = method.attribute_encoder[0](x)
        image = method.generator(content, method.memory.read(content, 1), 1)
    assert content.shape == (2, 16, 8, 10) and attribute.shape == (2, 8, 8, 10)
    assert torch.allclose(attribute.norm(dim=1), torch.ones(2, 8, 10), atol=1e-5)
    assert image.shape == (2, 1, 32, 40) and image.abs().max() <= 1


def test_labels_map_tumour_to_white_matter_and_downsample_by_majority() -> None:
    method = tiny_method()
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    assert method.memory_classes(labels).tolist() == [0, 1, 2, 3, 3, 3, 3, 3]
    grid = torch.zeros(1, 4, 8, dtype=torch.long)
    grid[0, :, :4] = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [1, 3, 3, 3], [0, 0, 0, 1]])  # 1 ×6, 2 ×4, …
    grid[0, :, 4:] = 2
    assert majority_downsample(grid, 4, 4).tolist() == [[[1, 2]]]
    assert method.structures == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# Method contract


def sampling(**changes: object) -> DataConfig:
    base = SamplingConfig(kind="slab", axis=2, depth=1, in_plane=(32, 32), labels="tissue")
    return DataConfig(sampling=dataclasses.replace(base, **changes))  # type: ignore[arg-type]


def test_check_data_refuses_what_hifisyn_cannot_train_on() -> None:
    method = tiny_method()
    method.check_data(sampling())
    with pytest.raises(ConfigError, match=r"data\.sampling\.depth"):
        method.check_data(sampling(depth=3))
    with pytest.raises(ConfigError, match=r"data\.sampling\.labels"):
        method.check_data(sampling(labels=None))
    with pytest.raises(ConfigError, match=r"data\.sampling\.kind"):
        method.check_data(sampling(kind="patch"))
    with pytest.raises(ConfigError, match=r"data\.sampling\.in_plane"):
        method.check_data(sampling(in_plane=(30, 32)))
    paper = HiFiSyn(HiFiSynConfig(base_channels=1, attribute_channels=2, discriminator_channels=1))
    with pytest.raises(ConfigError, match="content_discriminator_strides"):
        paper.check_data(sampling(in_plane=(64, 64)))  # DRIT++'s D^c needs ≥ 212 pixels
    paper.check_data(sampling(in_plane=(216, 216)))
    with pytest.raises(ConfigError, match="unlisted_label_class"):
        HiFiSyn(tiny_config(unlisted_label_class=4))


def test_make_inferer_is_single_slices_along_the_configured_axis() -> None:
    method = tiny_method()
    inferer = method.make_inferer(InferenceConfig(sw_batch_size=5), sampling(axis=1))
    assert inferer == SlabInferer(axis=1, depth=1, batch=5)
    with pytest.raises(ConfigError, match=r"inference\.steps"):
        method.make_inferer(InferenceConfig(steps=10), sampling())


def test_translation_is_label_free_deterministic_and_leaves_the_memory_alone() -> None:
    method = tiny_method()
    method.train_step(tiny_batch(), context(method))
    state = copy.deepcopy(method.state_dict())
    method.train()
    source = torch.rand(3, 1, 36, 28, 2)
    generators = [torch.Generator().manual_seed(k) for k in range(3)]
    with torch.inference_mode():
        first = method.translate(source, generators)
        second = method.translate(source, None)
    assert method.training  # mode restored
    assert first.shape == source.shape and torch.equal(first, second)
    assert first.min() >= 0 and first.max() <= 1
    for name, tensor in method.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # Slice by slice: a slab's slices are translated independently.
    with torch.inference_mode():
        alone = method.translate(source[..., 1:2])
    assert torch.allclose(alone[..., 0], first[..., 1], atol=1e-6)
    # The whole-volume path runs through the slab inferer without labels.
    volume = np.random.default_rng(0).random((20, 24, 5)).astype(np.float32)
    output = method.infer(volume, method.make_inferer(InferenceConfig(), sampling()))
    assert output.shape == volume.shape and np.isfinite(output).all()


def test_train_step_updates_the_memory_without_gradient_and_keeps_it_out_of_optimisers() -> None:
    method = tiny_method()
    ctx = context(method)
    optimised = {id(p) for opt in ctx.optimizers.values() for group in opt.param_groups for p in group["params"]}
    assert not any(id(t) in optimised for t in method.memory.buffers())
    assert list(method.memory.parameters()) == []
    assert all(not name.startswith("memory.") for name, _ in method.named_parameters())
    keys = method.memory.keys.clone()
    logged = method.train_step(tiny_batch(), ctx)
    assert set(LOSS_TERMS) <= set(logged) and all(math.isfinite(v) for v in logged.values())
    assert not torch.equal(method.memory.keys, keys)
    assert torch.allclose(method.memory.keys.norm(dim=-1), torch.ones(20), atol=1e-6)
    assert method.memory.keys.grad is None and not method.memory.keys.requires_grad


def test_d_iter_trains_only_the_content_discriminator_between_full_steps() -> None:
    method = tiny_method(content_discriminator_iterations=3)
    before = copy.deepcopy(method.state_dict())
    logged = method.train_step(tiny_batch(), context(method, iteration=1))
    assert set(logged) == {"content_discriminator"}
    after = method.state_dict()
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"content_discriminator"}
    full = method.train_step(tiny_batch(), context(method, iteration=3))
    assert set(LOSS_TERMS) <= set(full)


def test_steps_resume_bit_exactly_including_the_memory() -> None:
    """Method-level resume: state (weights, memory, optimisers) saved after step 1 gives the same step 2."""
    batches = [tiny_batch(seed) for seed in (1, 2)]
    straight = tiny_method(content_discriminator_iterations=2)
    ctx = context(straight)
    for iteration, batch in enumerate(batches, start=1):
        ctx.iteration = iteration
        ctx.generator.manual_seed(100 + iteration)  # the trainer reseeds per iteration
        straight.train_step(batch, ctx)

    first = tiny_method(content_discriminator_iterations=2)
    ctx_first = context(first, iteration=1)
    ctx_first.generator.manual_seed(101)
    first.train_step(batches[0], ctx_first)
    saved = {"model": copy.deepcopy(first.state_dict()),
             "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in ctx_first.optimizers.items()}}
    torch.manual_seed(999)  # the resumed process starts from other random weights
    resumed = build_method(tiny_config(content_discriminator_iterations=2))
    resumed.load_state_dict(saved["model"])
    ctx_resumed = context(resumed, iteration=2)
    for key, optimizer in ctx_resumed.optimizers.items():
        optimizer.load_state_dict(saved["optimizers"][key])
    ctx_resumed.generator.manual_seed(102)
    resumed.train_step(batches[1], ctx_resumed)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert any(name.startswith("memory.") for name in straight.state_dict())


def test_presets_load_and_describe_the_paper() -> None:
    paper = load_config("hifisyn-paper")
    assert isinstance(paper.method, HiFiSynConfig)
    assert paper.data.sampling.in_plane == (216, 216) and paper.data.sampling.depth == 1
    assert paper.data.sampling.labels == "tissue" and paper.data.sampling.kind == "slab"
    assert paper.train.lr == 1e-4 and paper.train.betas == (0.5, 0.999)
    method = paper.method
    assert (method.lambda_pgd, method.lambda_sgd, method.lambda_ggd) == (1.0, 2.0, 1.0)
    assert (method.lambda_content_adversarial, method.lambda_domain_adversarial, method.lambda_cycle,
            method.lambda_self_reconstruction) == (1.0, 1.0, 10.0, 10.0)
    assert method.memory_old_weight == 0.01 and method.memory_class_items == [2, 2, 3, 3]
    assert method.self_reconstruction_attribute == "encoder"  # Eq. 14 as printed
    cpu = load_config("hifisyn-cpu")
    assert cpu.method.self_reconstruction_attribute == "memory"  # the CPU preset's measured deviation
    cpu_method = build_method(cpu.method)
    cpu_method.check_data(cpu.data)
    counts = sum(cpu_method.parameter_counts().values())
    assert counts < 3_000_000


# ---------------------------------------------------------------------------------------------------------------
# End to end with the trainer (phantom cohort)


def _phantom(tmp_path: Path, n: int, splits: list[str]) -> Path:
    from volsynth.data.phantom import make_phantom_cohort

    manifest = make_phantom_cohort(tmp_path / "phantom", n, seed=3, spacing=4.0, contrasts=("t1", "t2"),
                                   montage=False)
    raw = json.loads(manifest.read_text())
    for entry, split in zip(raw["subjects"], splits, strict=True):
        entry["split"] = split
    manifest.write_text(json.dumps(raw))
    return manifest


def _overrides(manifest: Path, iterations: int) -> list[str]:
    return [f"data.manifest={manifest}", "data.source=t1", "data.target=t2", "data.split.mode=manifest",
            f"train.iterations={iterations}", "train.val_every=100000", "train.checkpoint_every=1",
            "train.progress=false"]


@pytest.mark.slow
def test_one_iteration_train_and_resume_are_bit_exact_with_the_trainer(tmp_path: Path) -> None:
    from volsynth.experiment import load_checkpoint
    from volsynth.training.trainer import train

    manifest = _phantom(tmp_path, 3, ["train", "train", "val"])
    overrides = [*_overrides(manifest, 2), "method.content_discriminator_iterations=2"]
    train(load_config("hifisyn-cpu", overrides), tmp_path / "straight")
    train(load_config("hifisyn-cpu", [*overrides, "train.iterations=1"]), tmp_path / "resumed")
    train(load_config("hifisyn-cpu", overrides), tmp_path / "resumed", resume=True)
    straight = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["model"]
    assert straight.keys() == resumed.keys()
    assert {"memory.keys", "memory.values"} <= set(straight)
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def _volumes(manifest: Path, subject: int) -> dict[str, np.ndarray]:
    import nibabel as nib

    root = manifest.parent
    entry = json.loads(manifest.read_text())["subjects"][subject]

    def read(path: str) -> np.ndarray:
        return np.asarray(nib.load(root / path).dataobj, dtype=np.float32)

    def scaled(a: np.ndarray) -> np.ndarray:  # the toolkit's min-max normalisation; pad x, y to multiples of 8
        a = (a - a.min()) / (a.max() - a.min())
        return np.pad(a, ((0, -a.shape[0] % 8), (0, -a.shape[1] % 8), (0, 0)))

    tissue = read(entry["tissue"]).astype(np.int64)
    tissue = np.pad(tissue, ((0, -tissue.shape[0] % 8), (0, -tissue.shape[1] % 8), (0, 0)))
    return {"t1": scaled(read(entry["images"]["t1"])), "t2": scaled(read(entry["images"]["t2"])), "tissue": tissue}


def _tissue_dice(synthetic: np.ndarray, real: np.ndarray, brain: np.ndarray) -> float:
    from volsynth.data.segmenters import GMMTissueSegmenter

    segmenter = GMMTissueSegmenter("t2")
    a, b = segmenter.segment(synthetic, mask=brain), segmenter.segment(real, mask=brain)
    return float(np.mean([2 * np.sum((a == k) & (b == k)) / max(1, np.sum(a == k) + np.sum(b == k))
                          for k in (1, 2, 3)]))


def _synthetic_scores(run: Path, test: dict[str, np.ndarray], *, checkpoint: str = "last.pt"
                      ) -> tuple[float, float]:
    """(brain L1, mean tissue Dice vs the real T2) of a run's translation of the test subject's T1."""
    from volsynth.experiment import load_method

    method, config, _ = load_method(run / "checkpoints" / checkpoint)
    synthetic = method.infer(test["t1"], method.make_inferer(config.inference, config.data))
    brain = test["tissue"] > 0
    return float(np.abs(synthetic - test["t2"])[brain].mean()), _tissue_dice(synthetic, test["t2"], brain)


def _untrained_scores(preset: str, test: dict[str, np.ndarray]) -> float:
    config = load_config(preset)
    torch.manual_seed(config.seed)  # the trainer's initialisation
    method = build_method(config.method)
    synthetic = method.infer(test["t1"], method.make_inferer(config.inference, config.data))
    brain = test["tissue"] > 0
    return float(np.abs(synthetic - test["t2"])[brain].mean())


@pytest.mark.slow
def test_hifisyn_cpu_training_reduces_reconstruction_and_translation_error(tmp_path: Path) -> None:
    """What 150 CPU iterations do show: the cycle/self-reconstruction terms fall and the unpaired T1 → T2
    translation of a held-out subject gets much closer to its real T2 than the untrained network's."""
    from volsynth.training.trainer import train

    manifest = _phantom(tmp_path, 4, ["train", "train", "train", "test"])
    train(load_config("hifisyn-cpu", [*_overrides(manifest, 150), "train.checkpoint_every=100000",
                                      "train.log_every=1"]), tmp_path / "run")
    import csv

    with (tmp_path / "run/log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    first = np.mean([float(r["self_reconstruction"]) + float(r["cycle"]) for r in rows[:20]])
    last = np.mean([float(r["self_reconstruction"]) + float(r["cycle"]) for r in rows[-20:]])
    test = _volumes(manifest, 3)
    before = _untrained_scores("hifisyn-cpu", test)
    after, dice = _synthetic_scores(tmp_path / "run", test)
    print(f"L1 cycle+self first/last 20 iterations {first:.3f}/{last:.3f}; held-out brain L1 untrained {before:.4f} "
          f"trained {after:.4f}; tissue Dice {dice:.3f}")
    assert last < 0.6 * first
    assert after < 0.7 * before


@pytest.mark.parametrize("mode", ["encoder", "memory"])
def test_self_reconstruction_attribute_is_the_encoder_map_or_the_memory_read(mode: str) -> None:
    """Eq. 14 as printed decodes E^a(m); the "memory" option decodes the read the translations use, so no gradient
    of the self-reconstruction reaches the attribute encoders."""
    method = tiny_method(self_reconstruction_attribute=mode, content_noise_std=0.0)
    batch = tiny_batch()
    source = to_network_scale(fold_slices(batch.source))
    target = to_network_scale(fold_slices(batch.target))
    source_labels = method.content_labels(batch.source_label)
    target_labels = method.content_labels(batch.target_label)
    terms, kept = method.generator_terms(source, target, source_labels, target_labels, None)
    if mode == "memory":
        by_hand = [method.translate_content(kept["z_source"], 0, source_labels),
                   method.translate_content(kept["z_target"], 1, target_labels)]
    else:
        by_hand = [method.generator(kept["z_source"], kept["a_source"], 0),
                   method.generator(kept["z_target"], kept["a_target"], 1)]
    expected = (by_hand[0] - source).abs().mean() + (by_hand[1] - target).abs().mean()
    assert terms["self_reconstruction"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["self_reconstruction"].backward()
    grads = [p.grad for p in method.attribute_encoder.parameters()]
    if mode == "memory":
        assert all(g is None for g in grads)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_air_slices_are_written_as_zero_without_the_networks() -> None:
    """A slice with fewer than 0.2 % of its pixels above empty_slice_threshold is air: 0 comes back, and the other
    slices equal the networks' own translation of them; with the threshold off every slice goes through."""
    g = torch.Generator().manual_seed(1)
    source = torch.rand(1, 1, 32, 32, 3, generator=g)
    source[..., 1] *= 0.09  # air: noise below the threshold everywhere
    source[..., 2] *= 0.09
    source[0, 0, :2, :1, 2] = 0.9  # 2 of 1,024 pixels (0.195 %) above it: still air
    method = tiny_method()
    synthetic = method.translate(source)
    assert torch.count_nonzero(synthetic[..., 1:]) == 0
    with torch.no_grad():
        by_hand = method.eval()(source[..., 0]).clamp(0, 1)
    assert torch.allclose(synthetic[..., 0], by_hand, atol=1e-6) and by_hand.abs().sum() > 0
    source[0, 0, :3, :1, 2] = 0.9  # 3 pixels (0.29 %): anatomy, translated
    assert torch.count_nonzero(method.translate(source)[..., 2]) > 0
    every = tiny_method(empty_slice_threshold=None).translate(source)
    assert torch.count_nonzero(every[..., 1]) > 0
    with pytest.raises(ConfigError, match="empty_slice_threshold"):
        tiny_method(empty_slice_threshold=1.5)
