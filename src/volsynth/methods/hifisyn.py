"""HiFi-Syn (Yu et al., Medical Image Analysis 2024): DRIT++ with a Brain Memory Bank and three granularity losses.

2D, on axial slices [HFS §3.1, §4.2], trained unpaired on ``(B, 1, H, W, 1)`` slabs of depth 1 with a tissue label
map per side (``data.sampling.labels``). Per iteration, for sources ``m_i`` and targets ``m_j`` of other subjects:

1. contents ``z^c = E^c(m)`` (per-domain encoders ending in a shared block, N(0, 1) noise in training) and
   attributes ``z^a = E^a(m)`` (spatial, per pixel, unit norm; :mod:`volsynth.nets.drit`);
2. first translation: ``m_{i→j} = G_j(z^c_i, z̄^a)`` with ``z̄^a`` read from the memory with the queries ``z^c_i``
   and the **target** domain's values (shared keys, domain-specific values [HFS Fig. 3]); symmetrically ``m_{j→i}``;
3. self-reconstruction ``G_i(z^c_i, z^a_i)`` with the encoder's own attribute [HFS Eq. 14] (or, as an option, the
   memory read of step 2 with the image's own domain: ``self_reconstruction_attribute``);
4. second translation (DRIT++ cross-cycle): ``m̂_i = G_i(z^c_{i→j}, z̄^a)`` with ``z^c_{i→j} = E^c_j(m_{i→j})`` and
   a read of the source domain's values (labels of ``m_i``: the anatomy is the same);
5. generator loss [HFS Eq. 17]: ``λ1·L_cont + λ2·L_dom + λ3·L1_cyc + λ4·L1_self + λ5·L_PGD + λ6·L_SGD + λ7·L_GGD``
   with λ1–4 = 1, 1, 10, 10 (DRIT++'s code) and λ5–7 = 1, 2, 1 [HFS §4.2]; no KL, latent-regression or
   mode-seeking term (not in Eq. 17); optionally (NOT IN PAPER, ``lambda_key_alignment``, off by default) a
   class-key alignment term that pulls both domains' labelled contents towards their class's shared memory keys;
6. memory update (Eqs. 4–6) without gradient from this iteration's detached contents and attributes;
7. domain discriminators (BCE, real vs detached translation, summed as DRIT++) and the content discriminator
   (source contents → 0, target contents → 1; the encoders aim at 0.5 [Eq. 15 as in DRIT++'s code]).

DRIT++'s ``d_iter`` (``content_discriminator_iterations``): on the other iterations only D^c trains. Its lr is
``train.lr × 0.4`` (DRIT++'s lr/2.5); DRIT++ also clips its gradient norm at 5, which the shared trainer step does
not do per optimiser (only ``train.grad_clip`` for all).

Labels: the tissue map (0 background, 1 CSF, 2 GM, 3 WM) is mapped to memory classes (values the memory has no
class for, e.g. the phantom's/BraTS's tumour labels 4–6 with the IXI layout, count as ``unlisted_label_class``,
WM by default, where gliomas grow) and down-sampled to the content resolution by majority vote in 4×4 blocks
[HFS §3.2.2: "down-sampled to 54×54"]. The SGD structures are the memory classes but background. A side without a
label map reads/updates the global items only and adds no SGD term.

Inference (``translate``; labels unseen [HFS Fig. 2]): each source slice is content-encoded (no noise) and its
attribute is the memory read with the **global items only** and the target domain's values, then G_j generates
the target. The paper does not say which attribute it uses at test time; the memory read needs neither a
reference image nor random numbers, so the output is a deterministic function of the checkpoint (``generators``
are accepted and unused). Slices are translated one at a time at their full in-plane size (a multiple of 4).
Slices outside the anatomy (air above or below the head, ``empty_slice_threshold``) are written as 0 without the
networks, which never saw such slices in training.

Scales: data [0, 1] ↔ networks [−1, 1] (``to_network_scale``); L1 terms on [−1, 1] as DRIT++.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.utils import eval_mode
from torch import Tensor, nn

from volsynth.config import DataConfig, InferenceConfig, MethodConfig, TrainConfig
from volsynth.config import require as check
from volsynth.errors import ConfigError
from volsynth.inferers import Inferer, SlabInferer
from volsynth.losses.contrastive import class_key_alignment_loss, ggd_loss, pgd_loss, sgd_loss
from volsynth.losses.gan import adversarial_loss
from volsynth.methods.base import (
    METHODS,
    Batch,
    StepContext,
    TranslationMethod,
    adam,
    fold_slices,
    set_requires_grad,
    to_data_scale,
    to_network_scale,
    unfold_slices,
)
from volsynth.nets.drit import (
    AttributeEncoder,
    ContentDiscriminator,
    ContentEncoders,
    DomainDiscriminator,
    Generators,
    content_discriminator_output_size,
    init_drit_weights,
)
from volsynth.nets.memory_bank import BrainMemoryBank

SOURCE, TARGET = 0, 1  # domain indices: m_i (source modality) and m_j (target modality)
# See ``empty_slice_threshold``. On the 2 mm phantom (3 % Rician noise) air slices have at most 0.1 % of their
# pixels above 0.1; a slice with 20 brain voxels has 0.2 %, so only slivers of < 20 voxels at the very top or bottom
# of the brain are written as air.
EMPTY_SLICE_FRACTION = 0.002
DOWNSAMPLE = ContentEncoders.divisor  # content resolution = image / 4

LOSS_TERMS = ("content_adversarial", "domain_adversarial", "cycle", "self_reconstruction", "pgd", "sgd", "ggd")


@dataclass
class HiFiSynConfig(MethodConfig):
    name: str = "hifisyn"
    # Networks: DRIT++ concat mode at width scale b (DRIT++: 64 → 256-channel content [HFS §4.2: 54×54×256]).
    base_channels: int = 64
    attribute_channels: int = 256  # C: memory value / attribute dimension [HFS §3.2.1: B ∈ R^{T×C}]
    discriminator_channels: int = 64  # D_{m_i}: 64 → 128 → 256 → 512 → 1024 → 1024 → 1024 → 1 [HFS §4.2]
    # Stride-2 convs of D_{m_i} (7 = all, as DRIT++'s Dis; fewer keep patch logits on small slices).
    discriminator_strided_layers: int = 7
    content_noise_std: float = 1.0  # DRIT++'s N(0, 1) noise after the shared content block (training only)
    # D^c: three 7×7 convs with these strides/padding (DRIT++: 2, 2, 2 / 1, which needs a ≥ 212-pixel crop).
    content_discriminator_strides: tuple[int, int, int] = (2, 2, 2)
    content_discriminator_padding: int = 1
    content_discriminator_norm: bool = False  # DRIT++'s code applies no norm there (its IN switch never fires)
    init_std: float | None = 0.02  # DRIT++ gaussian_weights_init N(0, 0.02); null = PyTorch default
    # Brain Memory Bank [HFS §4.2]: structure items per memory class (IXI/UKB: background, CSF, GM, WM) and as
    # many global items (null = their sum: 10 + 10 = 20 items).
    memory_class_items: list[int] = field(default_factory=lambda: [2, 2, 3, 3])
    memory_global_items: int | None = None
    # Weight of the OLD key/value in Eqs. 4–5: printed α_p = 0.01 (default); 0.99 = the "momentum" reading.
    memory_old_weight: float = 0.01
    # τ_r of a memory read (Eq. 1): 1 = the paper's softmax of raw cosines (no temperature). < 1 is a DEVIATION that
    # lets a read pick an item (nets/memory_bank.py says why).
    memory_read_temperature: float = 1.0
    # Label values without their own memory class (e.g. tumour 4–6 with the 4-class layout) count as this one.
    unlisted_label_class: int = 3
    detach_read_weights: bool = False  # true: memory reads pass no gradient to the content queries (as MGUIT)
    # Attribute of the self-reconstruction G_i(z^c_i, ·): "encoder" = E^a_i(m_i), Eq. 14 as printed (default).
    # "memory" (a DEVIATION) = the memory read the translations use (own domain's values, own labels). Why: E^a is
    # spatial here (the bank's per-pixel values need it), so E^a_i(m_i) carries the image's anatomy and λ4 = 10 teaches
    # the generators to decode from it, which no test-time read supplies (benchmarks/RESULTS.md, HiFi-Syn).
    self_reconstruction_attribute: Literal["encoder", "memory"] = "encoder"
    # Loss weights [HFS Eq. 17, §4.2]; λ1–4 as DRIT++'s code.
    lambda_content_adversarial: float = 1.0
    lambda_domain_adversarial: float = 1.0
    lambda_cycle: float = 10.0
    lambda_self_reconstruction: float = 10.0
    lambda_pgd: float = 1.0
    lambda_sgd: float = 2.0
    lambda_ggd: float = 1.0
    # Temperatures τ1–τ3: NOT IN PAPER; 0.07 as SupCon (Khosla et al. 2020), which the paper cites.
    tau_pgd: float = 0.07
    tau_sgd: float = 0.07
    tau_ggd: float = 0.07
    alpha_s: float = 0.5  # rank re-weighting w = exp(−α_s·rank) [HFS Eq. 10]
    contrastive_reduction: Literal["mean", "sum"] = "mean"  # over anchors; the paper prints a sum
    # Optimisation (DRIT++): D^c at lr × 0.4 (lr / 2.5); every d_iter-th iteration trains everything, the others
    # only D^c (DRIT++ d_iter = 3).
    content_discriminator_lr_scale: float = 0.4
    content_discriminator_iterations: int = 3
    # NOT IN PAPER (0 = off, the paper's loss): weight of a class-key alignment term (losses.contrastive
    # .class_key_alignment_loss) on both domains' labelled contents, with its temperature. Why: the content critic
    # matches the two domains' content distributions but not their tissue classes, so the T2 generator cannot read
    # T1 contents (benchmarks/content_probe.py; benchmarks/RESULTS.md, HiFi-Syn, fourth session).
    lambda_key_alignment: float = 0.0
    tau_key_alignment: float = 0.1
    # Inference: a slice with fewer than EMPTY_SLICE_FRACTION (0.2 %) of its source pixels above this (on [0, 1]) lies
    # outside the anatomy (air above the head) and is written as 0 without the networks; null translates every
    # slice. Why: training only sees slices centred on the head, and the encoders' instance norm blows an air
    # slice's noise up into structure (bright stripes above the head in a whole-volume prediction).
    empty_slice_threshold: float | None = 0.1


def weighted_generator_loss(terms: dict[str, Tensor], config: HiFiSynConfig) -> Tensor:
    """Eq. 17: ``Σ λ_k · term_k`` over :data:`LOSS_TERMS` (a missing term is an error)."""
    weights = {
        "content_adversarial": config.lambda_content_adversarial,
        "domain_adversarial": config.lambda_domain_adversarial,
        "cycle": config.lambda_cycle,
        "self_reconstruction": config.lambda_self_reconstruction,
        "pgd": config.lambda_pgd,
        "sgd": config.lambda_sgd,
        "ggd": config.lambda_ggd,
    }
    total = terms[LOSS_TERMS[0]] * weights[LOSS_TERMS[0]]
    for name in LOSS_TERMS[1:]:
        total = total + weights[name] * terms[name]
    if "key_alignment" in terms:  # the option's term, present only when it is on
        total = total + config.lambda_key_alignment * terms["key_alignment"]
    return total


def content_adversarial_encoder_loss(content_logits: Tensor) -> Tensor:
    """Encoder side of the content-adversarial term [HFS Eq. 15, DRIT++]: ``BCE(σ(D^c(z^c)), 0.5)``.

    ``content_logits``: raw D^c outputs, any shape. The gradient w.r.t. D^c's probability is 0 at 0.5 (contents
    that no longer tell their domain); the minimum value is ln 2, not 0.
    """
    logits = content_logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5))


def majority_downsample(labels: Tensor, factor: int, num_classes: int) -> Tensor:
    """``(B, H, W)`` class indices → ``(B, H/f, W/f)`` by majority vote in ``f × f`` blocks (ties: lower class)."""
    one_hot = F.one_hot(labels, num_classes).movedim(-1, 1).float()
    return F.avg_pool2d(one_hot, factor).argmax(dim=1)


@METHODS.register("hifisyn")
class HiFiSyn(TranslationMethod):
    """HiFi-Syn: 2D DRIT++ + Brain Memory Bank + pixel/structure/global contrastive terms, unpaired, slices."""

    config_class = HiFiSynConfig
    requires_paired_data = False
    sampling_kinds = ("slab",)
    description = ("HiFi-Syn (MedIA 2024): 2D DRIT++ with a Brain Memory Bank and PGD/SGD/GGD contrastive terms; "
                   "unpaired axial slices with tissue maps")

    def __init__(self, config: HiFiSynConfig, *, spatial_dims: int = 3) -> None:
        super().__init__(config, spatial_dims=spatial_dims)
        _check_config(config)
        dims = 2  # HiFi-Syn translates 2D slices whatever the volumes' dimensionality
        b, c = config.base_channels, config.attribute_channels
        self.content_encoder = ContentEncoders(dims, 1, b, domains=2, noise_std=config.content_noise_std)
        self.attribute_encoder = nn.ModuleList(AttributeEncoder(dims, 1, b, c) for _ in range(2))
        self.generator = Generators(dims, 1, b, c, domains=2)
        self.domain_discriminator = nn.ModuleList(  # [SOURCE] judges source-modality images, [TARGET] target ones
            DomainDiscriminator(dims, 1, config.discriminator_channels, strided=config.discriminator_strided_layers)
            for _ in range(2))
        self.content_discriminator = ContentDiscriminator(
            dims, 4 * b, config.content_discriminator_strides, config.content_discriminator_padding,
            config.content_discriminator_norm)
        if config.init_std is not None:
            for network in self.networks().values():
                init_drit_weights(network, config.init_std)
        self.memory = BrainMemoryBank(4 * b, c, config.memory_class_items, config.memory_global_items, domains=2,
                                      old_weight=config.memory_old_weight,
                                      read_temperature=config.memory_read_temperature)

    # Hooks ------------------------------------------------------------------------------------------------------------
    @property
    def patch_divisor(self) -> int:
        return DOWNSAMPLE

    @property
    def structures(self) -> list[int]:
        """Memory classes the SGD term contrasts: every class but background (0)."""
        return list(range(1, self.memory.num_classes))

    def networks(self) -> dict[str, nn.Module]:
        return {"content_encoder": self.content_encoder, "attribute_encoder": self.attribute_encoder,
                "generator": self.generator, "domain_discriminator": self.domain_discriminator,
                "content_discriminator": self.content_discriminator}

    def check_data(self, data: DataConfig) -> None:
        super().check_data(data)
        sampling = data.sampling
        if sampling.depth != 1:
            raise ConfigError(f"data.sampling.depth: method '{self.config.name}' translates single 2D slices; set "
                              f"it to 1 (got {sampling.depth!r})")
        if sampling.labels is None:
            raise ConfigError(f"data.sampling.labels: method '{self.config.name}' trains with tissue maps (its "
                              "memory and structure losses use them); set it to 'tissue'")
        content = min(sampling.in_plane) // DOWNSAMPLE
        config = self.config
        if content_discriminator_output_size(content, config.content_discriminator_strides,
                                             config.content_discriminator_padding) < 1:
            raise ConfigError(
                f"data.sampling.in_plane {list(sampling.in_plane)} gives a {content}-pixel content map, too small "
                f"for the content discriminator with method.content_discriminator_strides "
                f"{list(config.content_discriminator_strides)} and padding {config.content_discriminator_padding} "
                "(DRIT++'s 2, 2, 2 / 1 needs in_plane ≥ 212; use strides [2, 1, 1] and padding 3 for small crops)")

    def make_inferer(self, inference: InferenceConfig, data: DataConfig) -> Inferer:
        if inference.steps is not None:
            raise ConfigError(f"inference.steps (--steps): method '{self.config.name}' is deterministic and has no "
                              "sampling steps")
        return SlabInferer(axis=data.sampling.axis, depth=1, batch=inference.sw_batch_size)

    def configure_optimizers(self, train: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        generator = [*self.content_encoder.parameters(), *self.attribute_encoder.parameters(),
                     *self.generator.parameters()]
        return {
            "generator": adam(generator, train),
            "discriminator": adam(self.domain_discriminator.parameters(), train),
            "content_discriminator": adam(self.content_discriminator.parameters(), train,
                                          lr=train.lr * self.config.content_discriminator_lr_scale),
        }

    # Pieces -----------------------------------------------------------------------------------------------------------
    def memory_classes(self, labels: Tensor) -> Tensor:
        """Tissue labels → memory classes (values without a class become ``unlisted_label_class``)."""
        labels = labels.long()
        unlisted = (labels < 0) | (labels >= self.memory.num_classes)
        return torch.where(unlisted, torch.full_like(labels, self.config.unlisted_label_class), labels)

    def content_labels(self, label: Tensor | None) -> Tensor | None:
        """A batch label map ``(B, 1, H, W, D)`` → memory classes at the content resolution ``(B·D, H/4, W/4)``."""
        if label is None:
            return None
        classes = self.memory_classes(fold_slices(label)[:, 0])
        return majority_downsample(classes, DOWNSAMPLE, self.memory.num_classes)

    def encode_content(self, image: Tensor, domain: int, generator: torch.Generator | None = None) -> Tensor:
        return self.content_encoder(image, domain, generator=generator)

    def translate_content(self, content: Tensor, domain: int, labels: Tensor | None) -> Tensor:
        """``G_domain(z^c, z̄^a)`` with the attribute read from the memory (``labels`` None: global items only)."""
        attribute = self.memory.read(content, domain, labels, detach_weights=self.config.detach_read_weights)
        return self.generator(content, attribute, domain)

    def content_discriminator_loss(self, source_content: Tensor, target_content: Tensor) -> Tensor:
        """D^c learns source contents → 0, target contents → 1 (DRIT++'s ``backward_contentD``), on detached maps."""
        return (adversarial_loss(self.content_discriminator(source_content.detach()), False, "bce")
                + adversarial_loss(self.content_discriminator(target_content.detach()), True, "bce"))

    def generator_terms(self, source: Tensor, target: Tensor, source_labels: Tensor | None,
                        target_labels: Tensor | None, generator: torch.Generator | None
                        ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward pass: the seven unweighted terms of Eq. 17, and the tensors the memory/critic steps reuse.

        ``source``/``target``: ``(B, 1, H, W)`` on the network scale; labels ``(B, H/4, W/4)`` memory classes.
        """
        cfg = self.config
        z_source = self.encode_content(source, SOURCE, generator)
        z_target = self.encode_content(target, TARGET, generator)
        a_source = self.attribute_encoder[SOURCE](source)
        a_target = self.attribute_encoder[TARGET](target)
        synthetic_target = self.translate_content(z_source, TARGET, source_labels)  # m_{i→j}
        synthetic_source = self.translate_content(z_target, SOURCE, target_labels)  # m_{j→i}
        if cfg.self_reconstruction_attribute == "memory":
            self_source = self.translate_content(z_source, SOURCE, source_labels)
            self_target = self.translate_content(z_target, TARGET, target_labels)
        else:
            self_source = self.generator(z_source, a_source, SOURCE)
            self_target = self.generator(z_target, a_target, TARGET)
        z_synthetic_target = self.encode_content(synthetic_target, TARGET, generator)  # z^c_{m_{i→j}}
        z_synthetic_source = self.encode_content(synthetic_source, SOURCE, generator)  # z^c_{m_{j→i}}
        cycled_source = self.translate_content(z_synthetic_target, SOURCE, source_labels)
        cycled_target = self.translate_content(z_synthetic_source, TARGET, target_labels)

        b = source.shape[0]
        contents = torch.cat([z_source, z_synthetic_target, z_target, z_synthetic_source])
        subject = torch.arange(b, device=source.device)
        groups = torch.cat([subject, subject, subject + b, subject + b])
        sgd_parts = []
        for original, translated, labels in ((z_source, z_synthetic_target, source_labels),
                                             (z_target, z_synthetic_source, target_labels)):
            if labels is not None:
                sgd_parts.append((original, translated, labels))
        if sgd_parts and self.structures:
            sgd = sgd_loss(torch.cat([p[0] for p in sgd_parts]), torch.cat([p[1] for p in sgd_parts]),
                           torch.cat([p[2] for p in sgd_parts]), self.structures, cfg.tau_sgd, alpha=cfg.alpha_s,
                           reduction=cfg.contrastive_reduction)
        else:
            sgd = contents.sum() * 0.0
        terms = {
            "content_adversarial": (content_adversarial_encoder_loss(self.content_discriminator(z_source))
                                    + content_adversarial_encoder_loss(self.content_discriminator(z_target))),
            "domain_adversarial": (adversarial_loss(self.domain_discriminator[TARGET](synthetic_target), True, "bce")
                                   + adversarial_loss(self.domain_discriminator[SOURCE](synthetic_source), True,
                                                      "bce")),
            "cycle": F.l1_loss(cycled_source.float(), source) + F.l1_loss(cycled_target.float(), target),
            "self_reconstruction": F.l1_loss(self_source.float(), source) + F.l1_loss(self_target.float(), target),
            "pgd": pgd_loss(contents, groups, cfg.tau_pgd, reduction=cfg.contrastive_reduction),
            "sgd": sgd,
            "ggd": ggd_loss(contents, groups, cfg.tau_ggd, reduction=cfg.contrastive_reduction),
        }
        if cfg.lambda_key_alignment > 0:
            terms["key_alignment"] = sum(
                (class_key_alignment_loss(self.memory.similarity(z), self.memory.item_class, labels,
                                          self.memory.num_classes, cfg.tau_key_alignment)
                 for z, labels in ((z_source, source_labels), (z_target, target_labels)) if labels is not None),
                start=z_source.sum() * 0.0)
        kept = {"z_source": z_source, "z_target": z_target, "a_source": a_source, "a_target": a_target,
                "synthetic_target": synthetic_target, "synthetic_source": synthetic_source}
        return terms, kept

    # Duties -----------------------------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        cfg = self.config
        source = to_network_scale(fold_slices(batch.source))
        target = to_network_scale(fold_slices(batch.target))
        source_labels = self.content_labels(batch.source_label)
        target_labels = self.content_labels(batch.target_label)
        d_iter = cfg.content_discriminator_iterations
        if d_iter > 1 and ctx.iteration % d_iter != 0:  # DRIT++: only D^c on the other iterations
            with ctx.autocast():
                with torch.no_grad():
                    z_source = self.encode_content(source, SOURCE, ctx.generator)
                    z_target = self.encode_content(target, TARGET, ctx.generator)
                content_loss = self.content_discriminator_loss(z_source, z_target)
            ctx.step(content_loss, "content_discriminator")
            return {"content_discriminator": float(content_loss.detach())}

        critics = [*self.domain_discriminator, self.content_discriminator]
        set_requires_grad(critics, False)
        try:
            with ctx.autocast():
                terms, kept = self.generator_terms(source, target, source_labels, target_labels, ctx.generator)
                generator_loss = weighted_generator_loss(terms, cfg)
            ctx.step(generator_loss, "generator")
        finally:
            set_requires_grad(critics, True)
        self.memory.update([kept["z_source"], kept["z_target"]], [kept["a_source"], kept["a_target"]],
                           [source_labels, target_labels])

        with ctx.autocast():
            real_source_logits = self.domain_discriminator[SOURCE](source)
            real_target_logits = self.domain_discriminator[TARGET](target)
            synthetic_source_logits = self.domain_discriminator[SOURCE](kept["synthetic_source"].detach())
            synthetic_target_logits = self.domain_discriminator[TARGET](kept["synthetic_target"].detach())
            domain_loss = (adversarial_loss(real_source_logits, True, "bce")
                           + adversarial_loss(synthetic_source_logits, False, "bce")
                           + adversarial_loss(real_target_logits, True, "bce")
                           + adversarial_loss(synthetic_target_logits, False, "bce"))
        ctx.step(domain_loss, "discriminator")
        with ctx.autocast():
            content_loss = self.content_discriminator_loss(kept["z_source"], kept["z_target"])
        ctx.step(content_loss, "content_discriminator")
        logged = {name: float(value.detach()) for name, value in terms.items()}
        logged.update(generator=float(generator_loss.detach()), discriminator=float(domain_loss.detach()),
                      content_discriminator=float(content_loss.detach()))
        return logged

    def forward(self, source: Tensor) -> Tensor:
        """``(N, 1, H, W)`` source slices on [0, 1] → synthetic target slices on [0, 1] (label-free)."""
        content = self.encode_content(to_network_scale(source), SOURCE)
        return to_data_scale(self.translate_content(content, TARGET, None))

    def translate(self, source: Tensor, generators: list[torch.Generator] | None = None) -> Tensor:
        """``(B, 1, H, W, D)`` slabs → synthetic target slabs, slice by slice (deterministic; no labels).

        Slices outside the anatomy (``empty_slice_threshold``) come back as 0 without the networks.
        """
        with eval_mode(self):
            slices = fold_slices(source)
            synthetic = torch.zeros_like(slices)
            threshold = self.config.empty_slice_threshold
            if threshold is None:
                anatomy = torch.ones(slices.shape[0], dtype=torch.bool, device=slices.device)
            else:
                anatomy = (slices > threshold).flatten(1).float().mean(dim=1) >= EMPTY_SLICE_FRACTION
            if anatomy.any():
                synthetic[anatomy] = self(slices[anatomy]).clamp(0, 1).to(synthetic.dtype)
            return unfold_slices(synthetic, source.shape[-1])


def _check_config(config: HiFiSynConfig) -> None:
    """Ranges the dataclass types cannot express (ConfigError names the option)."""

    def require(ok: bool, key: str, what: str, value: object) -> None:
        check(ok, f"method.{key}", what, value)

    for key in ("base_channels", "attribute_channels", "discriminator_channels", "content_discriminator_iterations",
                "discriminator_strided_layers"):
        require(getattr(config, key) >= 1, key, ">= 1", getattr(config, key))
    require(len(config.memory_class_items) >= 1 and all(n >= 1 for n in config.memory_class_items),
            "memory_class_items", "a non-empty list of positive item counts", config.memory_class_items)
    require(config.memory_global_items is None or config.memory_global_items >= 1, "memory_global_items",
            ">= 1 or null", config.memory_global_items)
    require(0 <= config.memory_old_weight < 1, "memory_old_weight", "in [0, 1)", config.memory_old_weight)
    require(0 <= config.unlisted_label_class < len(config.memory_class_items), "unlisted_label_class",
            f"a memory class in [0, {len(config.memory_class_items) - 1}]", config.unlisted_label_class)
    for key in ("tau_pgd", "tau_sgd", "tau_ggd", "tau_key_alignment", "content_discriminator_lr_scale",
                "memory_read_temperature"):
        require(getattr(config, key) > 0, key, "> 0", getattr(config, key))
    threshold = config.empty_slice_threshold
    require(threshold is None or 0 <= threshold < 1, "empty_slice_threshold", "in [0, 1) or null", threshold)
    for key in ("lambda_content_adversarial", "lambda_domain_adversarial", "lambda_cycle",
                "lambda_self_reconstruction", "lambda_pgd", "lambda_sgd", "lambda_ggd", "lambda_key_alignment",
                "alpha_s", "content_noise_std"):
        require(getattr(config, key) >= 0, key, ">= 0", getattr(config, key))
    require(all(s >= 1 for s in config.content_discriminator_strides), "content_discriminator_strides",
            "positive", list(config.content_discriminator_strides))
    require(config.content_discriminator_padding >= 0, "content_discriminator_padding", ">= 0",
            config.content_discriminator_padding)
