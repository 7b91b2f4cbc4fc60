"""HiFi-Syn's Brain Memory Bank (BMB) [HFS §3.2.1, Eqs. 1–6, Fig. 3, §4.2].

``T`` items, each a key ``k_t`` (shared by the domains, unit norm, in content-query space) and one value per domain
``b^t_{m}`` (unit norm, in attribute space). The items come in two equal halves [HFS §4.2]:

- **structure items**, owned by a tissue class and read/updated only by queries carrying that label (IXI/UKB:
  2 background, 2 CSF, 3 GM, 3 WM);
- **global items**, without a label (IXI/UKB: 10), read and updated by every query; at test time, when no
  annotation exists, they are the only items read [HFS Fig. 2, Fig. 3].

**Read** (Eqs. 1–3): ``w^{n,t} = softmax_t(cos(q^n, k_t))`` over the items the query may use (its class's items
plus the global items in training, the global items only without labels), with **no temperature** (as printed;
``read_temperature`` τ_r ≠ 1 divides the cosines by τ_r, a deviation, see below); the retrieved
attribute is ``z̄^n = Σ_t w^{n,t} b^t_{m}`` with the values of the domain being generated (keys are shared, so an
i → j translation reads ``b_{m_j}`` with queries from ``z^c_{m_i}``).

**Update** (Eqs. 4–6), without gradient, after the networks' step:

- a query updates the item it is closest to (the arg-max of its read weights within its allowed items: "all
  queries that identify the item as the close ones");
- ``u^{n,t} = softmax_n(cos(q^n, k_t))`` over the queries assigned to item ``t`` (so the ``u`` of an item sum to 1
  over its queries, per domain);
- ``k_t ← normalise(α·k_t + (1 − α)·Σ_d Σ_n u_d^{n,t} q̂_d^n)`` with the L2-normalised queries ``q̂`` of both
  domains (keys live on the unit sphere, and a raw content vector has norm ≈ √C, which would make α meaningless);
- ``b^t_{m_d} ← normalise(α·b^t_{m_d} + (1 − α)·Σ_n u_d^{n,t} a_d^n)`` with the per-pixel attribute features
  ``a`` of the attribute encoder (Eq. 5 prints the retrieved z̄, a mix of the values themselves, which adds no
  information);
- an item no query is assigned to keeps its key (and, per domain, its value) exactly; an absent class's items are
  therefore unchanged.

``α`` is ``old_weight``. As printed, α_p = 0.01 multiplies the *old* item, so each update keeps 1 % of it, while
the text speaks of a momentum that prevents abrupt changes (which reads as 0.99 on the old item). The printed
0.01 is the default (the equation is unambiguous and this toolkit follows the print where it is explicit); 0.99
gives the momentum reading.

Why a read temperature exists: a softmax of raw cosines (in [−1, 1]) can favour an item over another by at most e²
≈ 7.4, so with the paper's 10 global items the largest read weight is bounded by 0.45 and, measured on the phantom,
sits near 0.15: every pixel reads nearly the same average attribute and the read carries no anatomy.
``read_temperature`` < 1 (as the τ of SupCon and of the paper's own contrastive terms) lets a read pick an item.

Keys, values and the item layout are buffers: they travel with ``state_dict`` (checkpoints, bit-exact resume) and
never enter an optimiser.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GLOBAL = -1  # item_class of a global (label-free) item


class BrainMemoryBank(nn.Module):
    """Keys ``(T, key_dim)`` shared by the domains, values ``(domains, T, value_dim)``, item classes ``(T,)``.

    Args:
        key_dim: query (content) channels.
        value_dim: attribute channels C.
        class_items: number of structure items per class, indexed by class (IXI/UKB: ``(2, 2, 3, 3)`` for
            background, CSF, GM, WM [HFS §4.2]).
        global_items: number of global items; ``None`` = ``sum(class_items)`` (the paper's symmetric halves).
        domains: number of domains with their own values.
        old_weight: α of Eqs. 4–5, the weight of the old key/value (printed 0.01; 0.99 = the momentum reading).
        read_temperature: τ_r dividing the cosines of a read (Eq. 1); 1 = the paper's softmax without temperature.
        generator: draws the initial keys/values (unit-norm Gaussian directions); ``None`` = torch's global RNG.
    """

    def __init__(self, key_dim: int, value_dim: int, class_items: Sequence[int] = (2, 2, 3, 3),
                 global_items: int | None = None, domains: int = 2, old_weight: float = 0.01,
                 read_temperature: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        class_items = [int(n) for n in class_items]
        if not class_items or any(n < 1 for n in class_items):
            raise ValueError(f"class_items must be a non-empty list of positive counts, got {class_items}")
        n_global = sum(class_items) if global_items is None else int(global_items)
        if n_global < 1:
            raise ValueError(f"global_items must be ≥ 1 (test-time reads use them), got {global_items}")
        if not 0.0 <= old_weight < 1.0:
            raise ValueError(f"old_weight must be in [0, 1), got {old_weight}")
        if not read_temperature > 0:
            raise ValueError(f"read_temperature must be > 0, got {read_temperature}")
        self.old_weight = float(old_weight)
        self.read_temperature = float(read_temperature)
        self.num_classes = len(class_items)
        self.domains = int(domains)
        owner = [c for c, n in enumerate(class_items) for _ in range(n)] + [GLOBAL] * n_global
        total = len(owner)
        self.register_buffer("item_class", torch.tensor(owner, dtype=torch.long))
        self.register_buffer("keys", F.normalize(torch.randn(total, key_dim, generator=generator), dim=1))
        self.register_buffer("values", F.normalize(torch.randn(domains, total, value_dim, generator=generator),
                                                   dim=2))

    # Layout ---------------------------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.item_class.numel())

    @property
    def num_structure_items(self) -> int:
        return int((self.item_class != GLOBAL).sum())

    @property
    def num_global_items(self) -> int:
        return int((self.item_class == GLOBAL).sum())

    def allowed_items(self, labels: Tensor | None, shape: Sequence[int] | None = None) -> Tensor:
        """Items each query may use, ``(*Q, T)`` bool: its class's items and the global items.

        ``labels``: class indices ``(*Q)`` (long, in ``[0, num_classes)``), or ``None`` (no annotation: the global
        items only; ``shape`` gives ``Q``).
        """
        is_global = self.item_class == GLOBAL
        if labels is None:
            if shape is None:
                raise ValueError("allowed_items needs labels or a shape")
            return is_global.expand(*shape, self.num_items)
        if labels.dtype.is_floating_point:
            raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be memory classes in [0, {self.num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return (labels.unsqueeze(-1) == self.item_class) | is_global

    # Read -----------------------------------------------------------------------------------------------------------
    def similarity(self, queries: Tensor) -> Tensor:
        """Cosine similarity [Eq. 2] of every query with every key: ``(B, C, *S)`` → ``(B, *S, T)``."""
        q = F.normalize(queries.float().movedim(1, -1), dim=-1, eps=1e-8)
        return q @ F.normalize(self.keys, dim=-1, eps=1e-8).t()  # keys are unit norm; normalising keeps it a cosine

    def read_weights(self, queries: Tensor, labels: Tensor | None = None) -> Tensor:
        """Eq. 1: ``(B, *S, T)`` softmax over the allowed items of each query of cos / τ_r (τ_r = 1: the paper's,
        no temperature); each row sums to 1.

        ``labels``: ``(B, *S)`` memory classes of the queries, or ``None`` for the global items only.
        """
        similarity = self.similarity(queries) / self.read_temperature
        allowed = self.allowed_items(labels, similarity.shape[:-1])
        return torch.softmax(similarity.masked_fill(~allowed, float("-inf")), dim=-1)

    def read(self, queries: Tensor, domain: int, labels: Tensor | None = None, *,
             detach_weights: bool = False) -> Tensor:
        """Eq. 3: retrieved attributes ``(B, value_dim, *S)`` from domain ``domain``'s values.

        Gradients reach the queries through the read weights (unless ``detach_weights``), never the memory.
        """
        weights = self.read_weights(queries, labels)
        if detach_weights:
            weights = weights.detach()
        return (weights @ self.values[domain]).movedim(-1, 1)

    # Update ---------------------------------------------------------------------------------------------------------
    def assignment(self, queries: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Flattened ``(N, T)`` similarities and the item each query updates (``(N,)``, arg-max within allowed)."""
        similarity = self.similarity(queries)
        allowed = self.allowed_items(labels, similarity.shape[:-1])
        flat = similarity.reshape(-1, self.num_items)
        closest = flat.masked_fill(~allowed.reshape(-1, self.num_items), float("-inf")).argmax(dim=-1)
        return flat, closest

    def update_weights(self, similarity: Tensor, closest: Tensor) -> Tensor:
        """Eq. 6: ``(N, T)`` weights ``u^{n,t}`` = softmax over the queries assigned to item ``t`` of their cosine
        with ``k_t``; 0 for the other queries. A column sums to 1 (or is all 0 when no query is assigned)."""
        assigned = F.one_hot(closest, self.num_items).bool()
        logits = similarity.masked_fill(~assigned, float("-inf"))
        weights = torch.softmax(logits, dim=0)
        return torch.where(assigned.any(dim=0, keepdim=True), weights, torch.zeros_like(weights))

    @torch.no_grad()
    def update(self, queries: Sequence[Tensor], attributes: Sequence[Tensor],
               labels: Sequence[Tensor | None]) -> dict[str, Tensor]:
        """Eqs. 4–6 for every domain at once (``queries[d]``: ``(B, key_dim, *S)`` content of domain ``d``;
        ``attributes[d]``: ``(B, value_dim, *S)`` its attribute features; ``labels[d]``: ``(B, *S)`` classes or
        ``None``). Returns the per-domain assignment counts ``(domains, T)`` (for logging/tests)."""
        if not (len(queries) == len(attributes) == len(labels) == self.domains):
            raise ValueError(f"update needs one query map, attribute map and label map per domain ({self.domains})")
        alpha = self.old_weight
        key_sum = torch.zeros_like(self.keys)
        key_touched = torch.zeros(self.num_items, dtype=torch.bool, device=self.keys.device)
        values = self.values.clone()
        counts = torch.zeros(self.domains, self.num_items, dtype=torch.long, device=self.keys.device)
        for domain, (query, attribute, label) in enumerate(zip(queries, attributes, labels, strict=True)):
            if query.shape[2:] != attribute.shape[2:] or query.shape[0] != attribute.shape[0]:
                raise ValueError(f"queries {tuple(query.shape)} and attributes {tuple(attribute.shape)} differ")
            similarity, closest = self.assignment(query.detach(), None if label is None else label.detach())
            u = self.update_weights(similarity, closest)  # (N, T)
            q = F.normalize(query.detach().float().movedim(1, -1).reshape(-1, query.shape[1]), dim=-1, eps=1e-8)
            a = F.normalize(attribute.detach().float().movedim(1, -1).reshape(-1, attribute.shape[1]), dim=-1,
                            eps=1e-8)
            touched = u.sum(dim=0) > 0
            counts[domain] = torch.bincount(closest, minlength=self.num_items)
            key_sum += u.t() @ q
            key_touched |= touched
            new_value = F.normalize(alpha * self.values[domain] + (1 - alpha) * (u.t() @ a), dim=-1, eps=1e-8)
            values[domain] = torch.where(touched.unsqueeze(-1), new_value, self.values[domain])
        new_keys = F.normalize(alpha * self.keys + (1 - alpha) * key_sum, dim=-1, eps=1e-8)
        # Assign new tensors (not in-place): a read's autograd graph may still hold the old ones.
        self.keys = torch.where(key_touched.unsqueeze(-1), new_keys, self.keys)
        self.values = values
        return {"assigned": counts}
