"""LPIPS (Zhang et al. 2018, ``lpips`` package v0.1, ``net="vgg"``) in plain torch, slice-wise on volumes.

The distance between two ``(N, 3, H, W)`` images in [-1, 1]:

1. ScalingLayer: ``(x - shift) / scale`` with shift ``[-.030, -.088, -.188]``, scale ``[.458, .448, .450]``.
2. VGG-16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (``features`` indices 3, 8, 15, 22, 29).
3. Each activation unit-normalised over channels: ``f / (||f||_2 + 1e-10)``.
4. Squared difference, weighted by the learned non-negative 1×1 "lin" weights of that layer (``learned``
   variant; the ``baseline`` variant, the package's ``lpips=False``, sums the channels with weight 1).
5. Spatial mean per layer, sum over the five layers.

Weight rules (the same as the flagship's perception loss, see :mod:`volsynth.nets.vgg`): the VGG backbone
comes from a local file, the ImageNet checkpoint in the torch hub cache, or ``"random"`` only when asked for
by name; the lin weights from the ``lpips`` package's ``weights/v0.1/vgg.pth`` (a local path or ``"hub"``).
When either is unavailable, :func:`build_lpips` raises :class:`LPIPSUnavailable` and callers must report the
metric as unavailable, never as 0.

Volumes (as the 3D-mDAUNet authors' release, juhha/3D-mADUNet ``example/evaluate_lpips.ipynb``): every slice of
each of the three views, including background slices, grey repeated to 3 channels, the mean per view and then
the mean of the view means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from volsynth.registry import suggest

if TYPE_CHECKING:
    from volsynth.nets.vgg import VGG

LPIPS_VGG_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LPIPS_VGG_FILE_NAME = "lpips_vgg_v0.1.pth"
# VGG-16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the lpips package's vgg16 slices end there).
VGG16_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# lpips.pretrained_networks ScalingLayer constants (v0.1).
SCALING_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
SCALING_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
VARIANTS: tuple[str, ...] = ("learned", "baseline")
VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
# Axis held fixed for each view of an (x, y, z) array.
_VIEW_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
# Four 2×2 max-pools precede relu5_3, so each slice side must be at least 2**4 pixels.
MIN_SLICE_SIDE = 16


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot be computed with real weights here; ``reason`` names the missing file and the fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LPIPSConfig:
    """Where the LPIPS weights come from and how volumes are sliced.

    Attributes:
        backbone_weights: VGG-16 weights: ``"imagenet"`` (torch hub cache, downloaded only when online), a
            local torchvision-format ``.pth`` path, or ``"random"`` (explicit opt-in; values are then not
            LPIPS and not comparable with published numbers).
        linear_weights: the lpips package's ``weights/v0.1/vgg.pth`` as a local path, ``"hub"`` (torch hub
            cache as ``lpips_vgg_v0.1.pth``, downloaded only when online), or ``None`` (no learned weights:
            only the ``baseline`` variant can run).
        variant: ``"learned"`` (LPIPS proper, default) or ``"baseline"`` (uniform channel weights, the
            package's ``lpips=False``; ``linear_weights`` is then not used).
        views: which views of the volume to slice.
        batch_size: slices per forward pass.
        max_slices_per_view: ``None`` = every slice; otherwise that many evenly spaced slices (a speed knob;
            values are then not the seed's protocol).
        device: torch device for the network.
    """

    backbone_weights: str | Path = "imagenet"
    linear_weights: str | Path | None = "hub"
    variant: str = "learned"
    views: tuple[str, ...] = VIEWS
    batch_size: int = 32
    max_slices_per_view: int | None = None
    device: str = "cpu"

    def describe(self) -> dict[str, object]:
        """JSON-friendly description for summary files."""
        return {
            "backbone": "vgg16",
            "backbone_weights": str(self.backbone_weights),
            "linear_weights": None
            if self.variant == "baseline" or self.linear_weights is None
            else str(self.linear_weights),
            "variant": self.variant,
            "views": list(self.views),
            "max_slices_per_view": self.max_slices_per_view,
        }


class LPIPS(nn.Module):
    """LPIPS-VGG distance between batches of 2D images.

    Args:
        backbone: a frozen VGG-16 (:class:`volsynth.nets.vgg.VGG` with ``depth=16``).
        linear: five ``(1, C, 1, 1)`` non-negative weight tensors (the lpips ``lin0..lin4``) for the learned
            variant, or ``None`` for the baseline variant (every channel weighted 1).
    """

    def __init__(self, backbone: VGG, linear: Sequence[Tensor] | None) -> None:
        super().__init__()
        if backbone.depth != 16:
            raise ValueError(f"LPIPS-VGG uses a VGG-16 backbone, got depth {backbone.depth}")
        self.backbone = backbone
        self.register_buffer("shift", torch.tensor(SCALING_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALING_SCALE).view(1, 3, 1, 1))
        self.variant = "learned" if linear is not None else "baseline"
        if linear is not None:
            if len(linear) != len(VGG16_TAPS):
                raise ValueError(f"expected {len(VGG16_TAPS)} lin weight tensors, got {len(linear)}")
            for i, (w, c) in enumerate(zip(linear, VGG16_TAP_CHANNELS, strict=True)):
                if tuple(w.shape) != (1, c, 1, 1):
                    raise ValueError(f"lin{i} weight must have shape (1, {c}, 1, 1), got {tuple(w.shape)}")
                self.register_buffer(f"lin{i}", w.detach().to(torch.float32).clone())
        self.eval()
        self.requires_grad_(False)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Distance per image pair.

        Args:
            x0, x1: ``(N, 3, H, W)`` images scaled to [-1, 1] (the lpips package's default input convention),
                ``H, W >= 16``.

        Returns:
            ``(N,)`` LPIPS distances (0 for identical images).
        """
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[1] != 3:
            raise ValueError(
                f"expected two (N, 3, H, W) batches of equal shape, got {tuple(x0.shape)} and "
                f"{tuple(x1.shape)}"
            )
        n = x0.shape[0]
        # One backbone pass for both inputs.
        both = (torch.cat([x0, x1]) - self.shift) / self.scale
        feats = self.backbone.forward_features(both, VGG16_TAPS)
        total = x0.new_zeros(n)
        for i, f in enumerate(feats):
            f = f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + 1e-10)
            diff = (f[:n] - f[n:]) ** 2
            if self.variant == "learned":
                per_pixel = F.conv2d(diff, getattr(self, f"lin{i}"))
            else:
                per_pixel = diff.sum(dim=1, keepdim=True)
            total = total + per_pixel.mean(dim=(1, 2, 3))
        return total


def _load_linear_weights(source: str | Path) -> list[Tensor]:
    key = str(source)
    if key == "hub":
        try:
            state = torch.hub.load_state_dict_from_url(
                LPIPS_VGG_URL, file_name=LPIPS_VGG_FILE_NAME, map_location="cpu", progress=False
            )
        except Exception as error:  # offline, proxy, corrupt cache: all mean "not available here"
            cache = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_VGG_FILE_NAME
            raise LPIPSUnavailable(
                f"LPIPS lin weights are not in the torch hub cache ({cache}) and could not be downloaded "
                f"from {LPIPS_VGG_URL} ({type(error).__name__}: {error}). Download that file elsewhere and "
                f"copy it to {cache}, or pass its local path as the linear weights."
            ) from error
        origin = LPIPS_VGG_URL
    else:
        path = Path(key).expanduser()
        if not path.is_file():
            raise LPIPSUnavailable(
                f"LPIPS lin weights file not found: {path}. It is the lpips package's weights/v0.1/vgg.pth "
                f"({LPIPS_VGG_URL}); give its local path or 'hub'."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise LPIPSUnavailable(f"LPIPS lin weights file {path} could not be read: {error}") from error
        origin = str(path)
    if not isinstance(state, dict):
        raise LPIPSUnavailable(
            f"LPIPS lin weights in {origin} are not a state dict (got {type(state).__name__})"
        )
    weights: list[Tensor] = []
    for i, c in enumerate(VGG16_TAP_CHANNELS):
        name = f"lin{i}.model.1.weight"
        w = state.get(name)
        if not isinstance(w, Tensor):
            raise LPIPSUnavailable(
                f"LPIPS lin weights in {origin} lack '{name}'; is this lpips v0.1 vgg.pth?"
            )
        if tuple(w.shape) != (1, c, 1, 1):
            raise LPIPSUnavailable(
                f"LPIPS lin weights in {origin}: '{name}' has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)"
            )
        if not torch.isfinite(w).all() or (w < 0).any():
            # The lpips training clamps these to >= 0; anything else is not the published file.
            raise LPIPSUnavailable(
                f"LPIPS lin weights in {origin}: '{name}' has negative or non-finite values"
            )
        weights.append(w.to(torch.float32))
    return weights


def build_lpips(config: LPIPSConfig | None = None) -> LPIPS:
    """Build the LPIPS-VGG model under ``config``'s weight rules, on ``config.device``.

    Raises:
        LPIPSUnavailable: the backbone or lin weights cannot be loaded (missing/corrupt file, offline and not
            cached), or the learned variant was asked for without lin weights. The reason names the file.
        ValueError: an unknown variant.
    """
    # Imported here so this module (and metrics-only evaluation) imports without the network code.
    from volsynth.nets.vgg import VGGWeightsUnavailable, load_vgg

    config = config or LPIPSConfig()
    if config.variant not in VARIANTS:
        raise ValueError(
            f"Unknown LPIPS variant '{config.variant}'.{suggest(config.variant, VARIANTS)} Known variants: "
            f"{', '.join(VARIANTS)}"
        )
    linear: list[Tensor] | None = None
    if config.variant == "learned":
        if config.linear_weights is None:
            raise LPIPSUnavailable(
                "LPIPS (learned) needs the lpips lin weights (weights/v0.1/vgg.pth) but none were given; "
                "pass their path or 'hub', or ask for the 'baseline' variant explicitly."
            )
        linear = _load_linear_weights(config.linear_weights)
    try:
        backbone = load_vgg(16, config.backbone_weights)
    except VGGWeightsUnavailable as error:
        raise LPIPSUnavailable(f"LPIPS VGG-16 backbone unavailable: {error}") from error
    return LPIPS(backbone, linear).to(torch.device(config.device))


def _slice_indices(n: int, limit: int | None) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"max_slices_per_view must be >= 1 or None, got {limit}")
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(int))


def lpips_views(
    synthetic: np.ndarray,
    target: np.ndarray,
    *,
    model: LPIPS,
    views: Sequence[str] = VIEWS,
    batch_size: int = 32,
    max_slices_per_view: int | None = None,
) -> dict[str, float]:
    """Mean LPIPS over the slices of each view of two ``(x, y, z)`` volumes on the [0, 1] scale.

    Every slice is used, background slices included (as the 3D-mDAUNet release's LPIPS notebook), unless
    ``max_slices_per_view`` asks for evenly spaced ones. Views: ``axial`` = fixed z, ``coronal`` = fixed y, ``sagittal``
    = fixed x. Slices are mapped to [-1, 1] (``2 v - 1``; values outside [0, 1] are not clipped) and grey is repeated to
    3 channels.

    Returns:
        ``{view: mean LPIPS over its slices}``.
    """
    if np.shape(synthetic) != np.shape(target):
        raise ValueError(
            f"synthetic and target must have the same shape, got {np.shape(synthetic)} and {np.shape(target)}"
        )
    if np.ndim(target) != 3:
        raise ValueError(f"expected (x, y, z) volumes, got shape {np.shape(target)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for view in views:
        if view not in _VIEW_AXIS:
            raise ValueError(f"Unknown view '{view}'.{suggest(view, VIEWS)} Known views: {', '.join(VIEWS)}")
    syn = np.asarray(synthetic, dtype=np.float32)
    tgt = np.asarray(target, dtype=np.float32)
    if not (np.isfinite(syn).all() and np.isfinite(tgt).all()):
        raise ValueError("LPIPS inputs contain NaN or Inf")
    device = model.shift.device
    out: dict[str, float] = {}
    with torch.no_grad():
        for view in views:
            axis = _VIEW_AXIS[view]
            plane = [s for a, s in enumerate(tgt.shape) if a != axis]
            if min(plane) < MIN_SLICE_SIDE:
                raise ValueError(
                    f"{view} slices are {plane[0]}x{plane[1]}; LPIPS-VGG needs at least "
                    f"{MIN_SLICE_SIDE}x{MIN_SLICE_SIDE} (four 2x2 poolings before relu5_3)"
                )
            idx = _slice_indices(tgt.shape[axis], max_slices_per_view)
            # (n_slices, H, W) stacks with the fixed axis first.
            s_stack = np.moveaxis(syn, axis, 0)[idx]
            t_stack = np.moveaxis(tgt, axis, 0)[idx]
            total = 0.0
            for start in range(0, len(idx), batch_size):
                a = torch.from_numpy(np.ascontiguousarray(s_stack[start : start + batch_size])).to(device)
                b = torch.from_numpy(np.ascontiguousarray(t_stack[start : start + batch_size])).to(device)
                a = (a * 2 - 1).unsqueeze(1).expand(-1, 3, -1, -1)
                b = (b * 2 - 1).unsqueeze(1).expand(-1, 3, -1, -1)
                total += float(model(a, b).double().sum())
            out[view] = total / len(idx)
    return out


def lpips_volume(
    synthetic: np.ndarray,
    target: np.ndarray,
    *,
    model: LPIPS | LPIPSConfig,
    views: Sequence[str] = VIEWS,
    batch_size: int = 32,
    max_slices_per_view: int | None = None,
) -> float:
    """LPIPS of a volume pair: the mean over ``views`` of the per-view slice means (see :func:`lpips_views`).

    Averaging view means (rather than pooling all slices) matches the per-view reporting of the
    3D-mDAUNet release (juhha/3D-mADUNet ``example/evaluate_lpips.ipynb``) and keeps each view's weight equal on
    non-cubic volumes.

    Args:
        synthetic, target: ``(x, y, z)`` volumes on the [0, 1] scale, every side >= 16 voxels.
        model: an :class:`LPIPS` from :func:`build_lpips`, or an :class:`LPIPSConfig` to build one (build once
            and pass the model when scoring many volumes).

    Raises:
        LPIPSUnavailable: ``model`` is a config whose weights cannot be loaded.
    """
    if isinstance(model, LPIPSConfig):
        model = build_lpips(model)
    per_view = lpips_views(
        synthetic,
        target,
        model=model,
        views=views,
        batch_size=batch_size,
        max_slices_per_view=max_slices_per_view,
    )
    return float(np.mean(list(per_view.values())))
