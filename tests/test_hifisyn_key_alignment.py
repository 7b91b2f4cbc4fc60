"""hifisyn's optional class-key alignment (NOT IN PAPER, off by default): the loss by hand, and the method's term."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from volsynth.errors import ConfigError
from volsynth.losses.contrastive import class_key_alignment_loss
from volsynth.methods import build_method
from volsynth.methods.base import fold_slices, to_network_scale
from volsynth.methods.hifisyn import HiFiSyn, HiFiSynConfig, weighted_generator_loss


def test_class_key_alignment_is_the_cross_entropy_over_class_summed_keys_by_hand() -> None:
    # Items: class 0, class 1, class 1, one global item (left out). Two pixels, labels 0 and 1, τ = 0.5.
    similarity = torch.tensor([[[0.5, 0.1, -0.2, 0.9], [0.0, 0.3, 0.4, -0.5]]])  # (B=1, S=2, T=4)
    item_class = torch.tensor([0, 1, 1, -1])
    labels = torch.tensor([[0, 1]])
    first = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.2) + math.exp(-0.4)))
    second = -math.log((math.exp(0.6) + math.exp(0.8)) / (1.0 + math.exp(0.6) + math.exp(0.8)))
    loss = class_key_alignment_loss(similarity, item_class, labels, 2, temperature=0.5)
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    # The global item does not count: changing its similarity changes nothing.
    moved = similarity.clone()
    moved[..., 3] = -0.9
    assert class_key_alignment_loss(moved, item_class, labels, 2, temperature=0.5).item() == pytest.approx(loss.item())


def _method(**changes: object) -> HiFiSyn:
    torch.manual_seed(0)
    config = dataclasses.replace(HiFiSynConfig(base_channels=4, attribute_channels=8, discriminator_channels=4,
                                               content_discriminator_strides=(2, 1, 1),
                                               content_discriminator_padding=3, content_discriminator_iterations=1),
                                 **changes)  # type: ignore[arg-type]
    method = build_method(config)
    assert isinstance(method, HiFiSyn)
    return method


def test_the_method_adds_the_term_only_when_on_and_weights_it() -> None:
    g = torch.Generator().manual_seed(0)
    source, target = torch.rand(2, 1, 32, 32, 1, generator=g), torch.rand(2, 1, 32, 32, 1, generator=g)
    labels = [torch.randint(0, 4, (2, 1, 32, 32, 1), generator=g) for _ in range(2)]

    def terms_of(method: HiFiSyn) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list]:
        inputs = [to_network_scale(fold_slices(x)) for x in (source, target)]
        classes = [method.content_labels(x) for x in labels]
        terms, kept = method.generator_terms(*inputs, *classes, None)
        return terms, kept, classes

    off, _, _ = terms_of(_method())
    assert "key_alignment" not in off
    method = _method(lambda_key_alignment=0.5, tau_key_alignment=0.2, content_noise_std=0.0)
    terms, kept, classes = terms_of(method)
    memory = method.memory
    by_hand = sum(class_key_alignment_loss(memory.similarity(kept[z]), memory.item_class, c, memory.num_classes, 0.2)
                  for z, c in zip(("z_source", "z_target"), classes, strict=True))
    assert terms["key_alignment"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    without = {k: v for k, v in terms.items() if k != "key_alignment"}
    total = weighted_generator_loss(terms, method.config).item()
    assert total == pytest.approx(weighted_generator_loss(without, method.config).item()
                                  + 0.5 * terms["key_alignment"].item(), rel=1e-6)
    # It trains the content encoders (the correspondence it is for); the bank is a buffer and gets nothing.
    terms["key_alignment"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.content_encoder.parameters())
    assert not memory.keys.requires_grad


@pytest.mark.parametrize("key", ["lambda_key_alignment", "tau_key_alignment"])
def test_negative_weight_or_temperature_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _method(**{key: -1.0})
