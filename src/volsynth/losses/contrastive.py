"""HiFi-Syn's three granularity-discrimination losses [HFS Eqs. 7–12] on a shared supervised-contrastive core.

All three are the supervised contrastive loss of Khosla et al. (2020) ("SupCon", cited by the paper): for an
anchor ``a`` with positives ``P(a)`` (same group, anchor excluded) and candidates ``A(a)`` = every other sample
(positives stay in the denominator, the anchor does not),

    ℓ_a = −1/|P(a)| · Σ_{p ∈ P(a)} log[ exp(w_a·s_ap/τ) / Σ_{m ∈ A(a)} exp(s_am/τ) ],

with cosine similarities ``s``. The weight ``w_a`` multiplies **only the positive logit of the numerator** (SGD,
Eq. 11, taken literally); the denominator is unweighted. For one positive, ``∂ℓ/∂s_ap = (P⁺ − w)/τ`` with ``P⁺`` the
positive's share of the denominator: a pair with ``w < 1`` is pulled together only until ``P⁺ = w``. ``w ≡ 1`` gives
plain SupCon (PGD, GGD).

- **PGD** (Eq. 7): per pixel ``n``, the content vectors at ``n`` of every image of the batch; the same subject's
  original and translated contents are positives, other subjects' contents are negatives.
- **SGD** (Eqs. 8–11): per structure ``s`` (tissue class), the content map masked by the label (Eq. 8); the
  deformation ``d_s = Σ_{x,y} |z^{c,s}_{m_i} − z^{c,s}_{m_{i→j}}|`` (Eq. 9) is ranked per subject, descending and
  0-based, into ``w_s = exp(−α_s·rank)`` (Eq. 10: the most deformed structure gets 1). The similarity of two
  structures is the cosine of their masked-average-pooled vectors (flattened masks of different structures are
  disjoint, so their cosine would be exactly 0; Hu et al. 2021, the cited inspiration, pools). Positives: the same
  subject's same structure in the other view; negatives: its other structures and every structure of other
  subjects.
- **GGD** (Eq. 12): the whole content map (flattened) of each image; same subject positive, others negative.

The paper prints a sum over anchors; ``reduction="mean"`` (the default) averages over anchors that have a positive,
since a sum over 2916 pixels would swamp the other terms. τ1–τ3 are not given in the paper: 0.07 (SupCon's value)
is the default in the method config, NOT IN PAPER.

Shapes: ``N`` samples, ``D`` feature channels, ``S`` spatial positions. Similarities are unitless cosines in
[−1, 1]; losses are in nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]


def cosine_similarity_matrix(features: Tensor) -> Tensor:
    """``(..., N, D)`` → ``(..., N, N)`` pairwise cosine similarities (float32)."""
    unit = F.normalize(features.float(), dim=-1, eps=1e-8)
    return unit @ unit.transpose(-1, -2)


def supervised_contrastive_from_similarity(similarity: Tensor, groups: Tensor, temperature: float, *,
                                           positive_weight: Tensor | None = None,
                                           reduction: Reduction = "mean") -> Tensor:
    """The SupCon core on precomputed similarities.

    Args:
        similarity: ``(..., N, N)`` cosine similarities; leading dims are independent problems (pixels for PGD).
        groups: ``(N,)`` integer group of each sample; same group = positive pair (a sample is never its own).
        temperature: τ > 0.
        positive_weight: ``(..., N)`` or ``(N,)`` weight ``w_a`` of anchor ``a``'s positive logits (numerator only,
            Eq. 11 as printed); ``None`` = 1. Treated as a constant (no gradient through it).
        reduction: ``mean`` over anchors with ≥ 1 positive (and over leading dims), ``sum`` over them, or
            ``none`` for ``(..., N)`` per-anchor losses (0 for anchors without a positive).

    Returns:
        The loss in nats (scalar unless ``reduction="none"``).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = similarity.shape[-1]
    if similarity.shape[-2] != n or groups.shape != (n,):
        raise ValueError(f"similarity {tuple(similarity.shape)} and groups {tuple(groups.shape)} do not match")
    logits = similarity.float() / temperature
    eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
    positive = (groups.view(-1, 1) == groups.view(1, -1)) & ~eye  # (N, N)
    count = positive.sum(dim=-1)  # (N,)
    # Denominator: every sample but the anchor, positives included, unweighted.
    log_denominator = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=-1)  # (..., N)
    weight = torch.ones(()) if positive_weight is None else positive_weight.detach().float()
    weight = weight.to(similarity.device)
    mean_positive_logit = (logits * positive).sum(dim=-1) / count.clamp(min=1)  # (..., N)
    per_anchor = -weight * mean_positive_logit + log_denominator
    has_positive = (count > 0).expand_as(per_anchor)
    per_anchor = torch.where(has_positive, per_anchor, torch.zeros_like(per_anchor))
    if reduction == "none":
        return per_anchor
    total = per_anchor.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / has_positive.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def supervised_contrastive_loss(features: Tensor, groups: Tensor, temperature: float, *,
                                positive_weight: Tensor | None = None, reduction: Reduction = "mean") -> Tensor:
    """SupCon on ``(N, D)`` feature vectors (cosine similarity) with ``(N,)`` groups; see the core for the rest."""
    return supervised_contrastive_from_similarity(cosine_similarity_matrix(features), groups, temperature,
                                                  positive_weight=positive_weight, reduction=reduction)


# --------------------------------------------------------------------------------------------------------------
# PGD [Eq. 7]


def pgd_loss(contents: Tensor, groups: Tensor, temperature: float = 0.07, *, reduction: Reduction = "mean") -> Tensor:
    """Pixel-level granularity discrimination [HFS Eq. 7].

    Args:
        contents: ``(N, C, *S)`` content maps of N images (e.g. ``[z^c_{m_i}, z^c_{m_{i→j}}, z^c_{m_j},
            z^c_{m_{j→i}}]``), all the same size.
        groups: ``(N,)`` subject of each image; images of one subject are positives at every pixel.
        temperature: τ1.
        reduction: over (pixel, image) anchors.

    Returns:
        The loss in nats: for every pixel ``n`` a SupCon problem over the N content vectors at ``n``.
    """
    vectors = contents.float().flatten(2).permute(2, 0, 1)  # (S, N, C)
    return supervised_contrastive_from_similarity(cosine_similarity_matrix(vectors), groups, temperature,
                                                  reduction=reduction)


# --------------------------------------------------------------------------------------------------------------
# SGD [Eqs. 8–11]


def structure_masked_content(content: Tensor, labels: Tensor, structures: Sequence[int]) -> Tensor:
    """Eq. 8: ``z^{c,s} = z^c ⊙ 1[G = s]`` for every structure: ``(B, C, *S)``, ``(B, *S)`` → ``(B, L, C, *S)``."""
    masks = torch.stack([labels == s for s in structures], dim=1).unsqueeze(2)  # (B, L, 1, *S)
    return content.unsqueeze(1) * masks.to(content.dtype)


def structure_deformation(masked_source: Tensor, masked_translated: Tensor) -> Tensor:
    """Eq. 9: ``d_s = Σ_{x,y} |z^{c,s}_{m_i} − z^{c,s}_{m_{i→j}}|`` (L1 over channels and pixels): ``(B, L, C, *S)``
    twice → ``(B, L)``, in content units."""
    return (masked_source.float() - masked_translated.float()).abs().flatten(2).sum(dim=-1)


def rank_weights(deformation: Tensor, alpha: float = 0.5, present: Tensor | None = None) -> Tensor:
    """Eq. 10: ``w_s = exp(−α·rank(d_s))`` per row, rank descending and 0-based among the present structures.

    ``deformation``: ``(B, L)``; ``present``: ``(B, L)`` bool (default all). The most deformed structure gets
    ``w = 1``, the next ``e^{−α}`` …; absent structures get 0 (they take no part). Ties keep the lower index
    first. No gradient flows through the weights.
    """
    d = deformation.detach().float()
    if present is None:
        present = torch.ones_like(d, dtype=torch.bool)
    order = torch.sort(d.masked_fill(~present, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(d.shape[-1], device=d.device).expand_as(order))
    weights = torch.exp(-alpha * rank.float())
    return torch.where(present, weights, torch.zeros_like(weights))


def masked_average_pool(content: Tensor, labels: Tensor, structures: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean content vector of every structure: ``(B, C, *S)``, ``(B, *S)`` → pooled ``(B, L, C)`` and
    ``present`` ``(B, L)`` (structures with at least one pixel)."""
    masks = torch.stack([labels == s for s in structures], dim=1).flatten(2).to(content.dtype)  # (B, L, S)
    area = masks.sum(dim=-1)  # (B, L)
    pooled = masks @ content.flatten(2).transpose(1, 2)  # (B, L, C)
    return pooled / area.clamp(min=1).unsqueeze(-1), area > 0


def sgd_contrastive(features: Tensor, groups: Tensor, weights: Tensor, temperature: float = 0.07, *,
                    reduction: Reduction = "mean") -> Tensor:
    """Eq. 11 on prepared structure vectors: ``(N, D)`` features, ``(N,)`` groups (subject, structure) and
    ``(N,)`` weights ``w`` of each anchor's positive logit. With ``w ≡ 1`` it equals :func:`ggd_loss`."""
    return supervised_contrastive_loss(features, groups, temperature, positive_weight=weights, reduction=reduction)


def sgd_loss(source_content: Tensor, translated_content: Tensor, labels: Tensor, structures: Sequence[int],
             temperature: float = 0.07, *, alpha: float = 0.5, reduction: Reduction = "mean") -> Tensor:
    """Structure-level granularity discrimination [HFS Eqs. 8–11].

    Args:
        source_content: ``(B, C, *S)`` contents ``z^c_{m}`` of B subjects (stack both domains' images here).
        translated_content: ``(B, C, *S)`` contents ``z^c_{m→}`` of their translations (same anatomy).
        labels: ``(B, *S)`` structure labels at the content resolution (the source's; shared by its translation).
        structures: the label values that are structures (e.g. CSF, GM, WM; no background).
        temperature: τ2.
        alpha: α_s of Eq. 10 (0.5).
        reduction: over (view, subject, structure) anchors.

    Returns:
        The loss in nats (0 when no structure is present).
    """
    b = source_content.shape[0]
    masked_source = structure_masked_content(source_content, labels, structures)
    masked_translated = structure_masked_content(translated_content, labels, structures)
    pooled_source, present = masked_average_pool(source_content, labels, structures)
    pooled_translated, _ = masked_average_pool(translated_content, labels, structures)
    weights = rank_weights(structure_deformation(masked_source, masked_translated), alpha, present)  # (B, L)
    group = torch.arange(b * len(structures), device=labels.device).view(b, len(structures))
    keep = present.flatten()
    features = torch.cat([pooled_source.flatten(0, 1)[keep], pooled_translated.flatten(0, 1)[keep]])
    groups = torch.cat([group.flatten()[keep]] * 2)
    anchor_weights = torch.cat([weights.flatten()[keep]] * 2)
    if features.shape[0] < 2:
        return source_content.sum() * 0.0
    return sgd_contrastive(features, groups, anchor_weights, temperature, reduction=reduction)


# --------------------------------------------------------------------------------------------------------------
# GGD [Eq. 12]


def ggd_loss(contents: Tensor, groups: Tensor, temperature: float = 0.07, *, reduction: Reduction = "mean") -> Tensor:
    """Global-level granularity discrimination [HFS Eq. 12]: SupCon (w = 1) on whole content features.

    Args:
        contents: ``(N, ...)`` one content feature per image (a ``(C, *S)`` map is flattened).
        groups: ``(N,)`` subject of each image (same subject: positive).
        temperature: τ3.
        reduction: over anchors.
    """
    return supervised_contrastive_loss(contents.flatten(1), groups, temperature, reduction=reduction)


# --------------------------------------------------------------------------------------------------------------
# Class-key alignment (NOT IN PAPER; an option of hifisyn, off by default)


def class_key_alignment_loss(similarity: Tensor, item_class: Tensor, labels: Tensor, num_classes: int,
                             temperature: float = 0.1) -> Tensor:
    """Cross-entropy of each content pixel's tissue class, read from its cosine to the memory's class keys.

    Why: the memory bank's keys are shared by both domains and updated from both domains' contents by class, so
    they are class prototypes common to the two content encoders. Pulling every labelled content pixel towards its
    own class's keys (and away from the other classes') gives the encoders the correspondence the content
    discriminator cannot: that one matches the two domains' distributions, which still allows pairing CSF with WM
    (benchmarks/RESULTS.md, HiFi-Syn, fourth session).

    Args:
        similarity: ``(B, *S, T)`` cosine of every content pixel with every key (unitless, [−1, 1]).
        item_class: ``(T,)`` class of each item; negative = a global (label-free) item, left out.
        labels: ``(B, *S)`` class of each pixel in ``[0, num_classes)``.
        num_classes: K; every class needs at least one item.
        temperature: τ of the logits ``cos / τ``.

    Returns:
        Mean over pixels of ``−log p(label)``, where ``p(k) ∝ Σ_{t: class t = k} exp(cos_t / τ)`` (nats).
    """
    structure = item_class >= 0
    owners = item_class[structure]
    logits = similarity[..., structure] / temperature
    per_class = torch.stack([torch.logsumexp(logits[..., owners == k], dim=-1) for k in range(num_classes)], dim=1)
    return F.cross_entropy(per_class, labels.long())
