"""HiFi-Syn's Brain Memory Bank [HFS Eqs. 1–6]: layout, read, update, no gradient, checkpointing."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from volsynth.nets.memory_bank import GLOBAL, BrainMemoryBank


def bank(**changes: object) -> BrainMemoryBank:
    options: dict[str, object] = {"key_dim": 6, "value_dim": 5, "class_items": (2, 2, 3, 3),
                                  "generator": torch.Generator().manual_seed(0)}
    options.update(changes)
    return BrainMemoryBank(**options)  # type: ignore[arg-type]


def random_inputs(seed: int, b: int = 2, size: int = 5, classes: tuple[int, ...] = (0, 1, 2, 3)
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, 6, size, size, generator=g)
    attributes = torch.randn(b, 5, size, size, generator=g)
    choice = torch.tensor(classes)[torch.randint(0, len(classes), (b, size, size), generator=g)]
    return queries, attributes, choice


def test_layout_is_the_papers_twenty_items_and_brats_thirty_eight() -> None:
    memory = bank()
    assert memory.num_items == 20
    assert memory.num_structure_items == memory.num_global_items == 10
    counts = torch.bincount(memory.item_class[memory.item_class != GLOBAL], minlength=4).tolist()
    assert counts == [2, 2, 3, 3]  # background, CSF, GM, WM [HFS §4.2]
    brats = bank(class_items=(2, 2, 3, 3, 3, 3, 3))
    assert (brats.num_items, brats.num_structure_items, brats.num_global_items) == (38, 19, 19)
    assert memory.keys.shape == (20, 6) and memory.values.shape == (2, 20, 5)


def test_keys_and_values_stay_unit_norm_after_every_update() -> None:
    memory = bank()
    for step in range(5):
        q_i, a_i, l_i = random_inputs(2 * step)
        q_j, a_j, l_j = random_inputs(2 * step + 1)
        memory.update([q_i * 7.0, q_j], [a_i * 0.1, a_j], [l_i, None if step % 2 else l_j])
        assert torch.allclose(memory.keys.norm(dim=-1), torch.ones(20), atol=1e-6)
        assert torch.allclose(memory.values.norm(dim=-1), torch.ones(2, 20), atol=1e-6)


def test_reads_stay_in_the_own_class_plus_global_items_and_sum_to_one_over_items() -> None:
    memory = bank()
    queries, _, labels = random_inputs(3)
    weights = memory.read_weights(queries, labels)  # (B, H, W, T)
    assert weights.shape == (2, 5, 5, 20)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 5, 5), atol=1e-6)
    # The sum over queries (the printed upper limit N) is not 1: the softmax runs over items.
    assert not torch.allclose(weights.sum(dim=(0, 1, 2)), torch.ones(20), atol=1e-2)
    owner = memory.item_class
    allowed = (labels.unsqueeze(-1) == owner) | (owner == GLOBAL)
    assert torch.all(weights[~allowed] == 0)
    assert torch.all(weights[allowed] > 0)
    # No labels (test time): global items only.
    free = memory.read_weights(queries, None)
    assert torch.all(free[..., owner != GLOBAL] == 0)
    assert torch.allclose(free.sum(dim=-1), torch.ones(2, 5, 5), atol=1e-6)
    # Eq. 1 by hand for one query: softmax of cosines over its allowed items, no temperature.
    q = queries[1, :, 2, 3]
    cos = F.cosine_similarity(q.unsqueeze(0), memory.keys, dim=1)
    mask = allowed[1, 2, 3]
    expected = torch.zeros(20)
    expected[mask] = torch.softmax(cos[mask], dim=0)
    assert torch.allclose(weights[1, 2, 3], expected, atol=1e-6)
    # Eq. 3: the read is the weighted sum of the domain's values.
    read = memory.read(queries, 1, labels)
    assert torch.allclose(read[1, :, 2, 3], expected @ memory.values[1], atol=1e-6)


def test_cosine_read_is_invariant_to_query_and_key_scale() -> None:
    memory = bank()
    queries, _, labels = random_inputs(4)
    before = memory.read_weights(queries, labels)
    scale = torch.rand(2, 1, 5, 5) * 10 + 0.1  # a different positive factor per query
    memory.keys = memory.keys * 0.2
    after = memory.read_weights(queries * scale, labels)
    assert torch.allclose(before, after, atol=1e-6)


def test_update_weights_sum_to_one_over_the_assigned_queries() -> None:
    memory = bank()
    queries, _, labels = random_inputs(5, b=3, size=6)
    similarity, closest = memory.assignment(queries, labels)
    u = memory.update_weights(similarity, closest)  # (N, T)
    assigned = torch.bincount(closest, minlength=20) > 0
    assert assigned.sum() >= 5
    assert torch.allclose(u.sum(dim=0)[assigned], torch.ones(int(assigned.sum())), atol=1e-6)
    assert torch.all(u.sum(dim=0)[~assigned] == 0)
    # Only the queries assigned to an item weigh in its update; Eq. 6 by hand for one item.
    t = int(torch.nonzero(assigned)[0])
    members = closest == t
    assert torch.all(u[~members, t] == 0)
    assert torch.allclose(u[members, t], torch.softmax(similarity[members, t], dim=0), atol=1e-6)
    # Assignment = arg-max of the read weights within the allowed items.
    weights = memory.read_weights(queries, labels).reshape(-1, 20)
    assert torch.equal(closest, weights.argmax(dim=-1))


def test_absent_classes_keep_their_items_exactly() -> None:
    memory = bank()
    keys, values = memory.keys.clone(), memory.values.clone()
    q_i, a_i, l_i = random_inputs(6, classes=(0, 2))
    q_j, a_j, l_j = random_inputs(7, classes=(0, 2))
    memory.update([q_i, q_j], [a_i, a_j], [l_i, l_j])
    absent = (memory.item_class == 1) | (memory.item_class == 3)
    assert torch.equal(memory.keys[absent], keys[absent])
    assert torch.equal(memory.values[:, absent], values[:, absent])
    assert not torch.equal(memory.keys[~absent], keys[~absent])  # the present classes did change


def test_assigned_queries_equal_to_the_key_are_a_fixed_point() -> None:
    memory = bank()
    t = int(torch.nonzero(memory.item_class == 2)[0])  # a GM item
    key, value_i, value_j = memory.keys[t].clone(), memory.values[0, t].clone(), memory.values[1, t].clone()
    labels = torch.full((1, 3, 3), 2)
    queries = key.view(1, 6, 1, 1).expand(1, 6, 3, 3) * 4.0  # every query is the key (up to scale)
    memory.update([queries, queries], [value_i.view(1, 5, 1, 1).expand(1, 5, 3, 3),
                                       value_j.view(1, 5, 1, 1).expand(1, 5, 3, 3)], [labels, labels])
    assert torch.allclose(memory.keys[t], key, atol=1e-6)
    assert torch.allclose(memory.values[0, t], value_i, atol=1e-6)
    assert torch.allclose(memory.values[1, t], value_j, atol=1e-6)


@pytest.mark.parametrize("old_weight", [0.01, 0.99])
def test_old_weight_is_the_weight_of_the_old_item(old_weight: float) -> None:
    memory = bank(old_weight=old_weight)
    queries, attributes, _ = random_inputs(8, b=1, size=1)
    labels = torch.full((1, 1, 1), 3)
    t = int(memory.read_weights(queries, labels).flatten().argmax())
    key, value = memory.keys[t].clone(), memory.values[0, t].clone()
    memory.update([queries, queries[:0]], [attributes, attributes[:0]], [labels, labels[:0]])
    q = F.normalize(queries.flatten(), dim=0)
    a = F.normalize(attributes.flatten(), dim=0)
    assert torch.allclose(memory.keys[t], F.normalize(old_weight * key + (1 - old_weight) * q, dim=0), atol=1e-6)
    assert torch.allclose(memory.values[0, t], F.normalize(old_weight * value + (1 - old_weight) * a, dim=0),
                          atol=1e-6)


def test_no_gradient_reaches_the_bank() -> None:
    memory = bank()
    assert list(memory.parameters()) == []
    keys, values = memory.keys.clone(), memory.values.clone()
    queries, _, labels = random_inputs(9)
    queries.requires_grad_(True)
    memory.read(queries, 0, labels).square().sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0  # the queries do learn through the read
    assert not memory.keys.requires_grad and memory.keys.grad is None and memory.values.grad is None
    assert torch.equal(memory.keys, keys) and torch.equal(memory.values, values)
    _, attributes, _ = random_inputs(10)
    memory.update([queries, queries], [attributes.requires_grad_(True), attributes], [labels, labels])
    assert not memory.keys.requires_grad and not memory.values.requires_grad
    # Detached reads pass nothing back.
    fresh = queries.detach().requires_grad_(True)
    out = memory.read(fresh, 0, labels, detach_weights=True)
    assert not out.requires_grad


def test_bank_survives_state_dict_save_and_load_bit_exactly() -> None:
    memory = bank()
    q, a, labels = random_inputs(11)
    memory.update([q, q], [a, a], [labels, labels])
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    restored = bank(generator=torch.Generator().manual_seed(123))
    assert not torch.equal(restored.keys, memory.keys)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name, tensor in memory.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    # ... and both continue identically.
    q2, a2, l2 = random_inputs(12)
    memory.update([q2, q2], [a2, a2], [l2, l2])
    restored.update([q2, q2], [a2, a2], [l2, l2])
    assert torch.equal(restored.keys, memory.keys) and torch.equal(restored.values, memory.values)


def test_bad_layouts_and_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="old_weight"):
        bank(old_weight=1.0)
    with pytest.raises(ValueError, match="class_items"):
        bank(class_items=(2, 0))
    memory = bank()
    queries, _, labels = random_inputs(13)
    with pytest.raises(ValueError, match="memory classes"):
        memory.read_weights(queries, labels + 4)
    assert math.isclose(float(memory.read_weights(queries, labels).sum()), 50.0, rel_tol=1e-5)


def test_read_temperature_divides_the_cosines_and_one_is_the_papers_read() -> None:
    """τ_r = 1 is the printed softmax of raw cosines (hand-computed here); τ_r = 0.1 is softmax(cos / 0.1)."""
    queries, _, labels = random_inputs(4, b=1, size=3)
    for tau in (1.0, 0.1):
        memory = bank(read_temperature=tau)
        q = F.normalize(queries.movedim(1, -1), dim=-1)
        cosine = q @ memory.keys.t()
        own = labels.unsqueeze(-1) == memory.item_class
        allowed = own | (memory.item_class == GLOBAL)
        expected = torch.where(allowed, torch.exp(cosine / tau), torch.zeros_like(cosine))
        expected = expected / expected.sum(-1, keepdim=True)
        torch.testing.assert_close(memory.read_weights(queries, labels), expected, rtol=1e-5, atol=1e-6)
    # A colder read is sharper: the largest global weight grows (the paper's cosines cap the ratio at e²).
    warm = bank().read_weights(queries).amax(-1)
    cold = bank(read_temperature=0.05).read_weights(queries).amax(-1)
    assert bool((cold > warm).all()) and float(warm.max()) < math.exp(2) / (math.exp(2) + 9)
    with pytest.raises(ValueError, match="read_temperature"):
        bank(read_temperature=0.0)
