"""3D multi-resolution Dense-Attention UNet (3D-mDAUNet), the generator of Ha et al. (WACV 2025).

Re-implemented after the authors' release (juhha/3D-mADUNet: ``AttentionDenseUNet`` with the configuration of its
``options/*.yaml``: nearest down/up-sampling, multi-resolution input, deep supervision). With ``base_channels=16``
and growth rates (8, 16, 32, 32) it has exactly 6,176,846 parameters (counted from the release's layer list).

Data flow (c = ``base_channels``, widths c/2c/4c/8c at 1, 1/2, 1/4, 1/8 resolution)::

    input pyramid L0..L3 (linear resampling of L0) ── SN conv 1→c per level ("feature convs")
    E0: RRDB(c) → conv → LReLU                                        x1 [c]
    E1: [feat(L1), down(x1)] → RRDB → conv → LReLU                     x2 [2c]
    E2: [feat(L2), down(x2)] → RRDB → conv → LReLU                     x3 [4c]
    E3: [feat(L3), down(x3)] → RRDB → conv → LReLU                     x4 [8c]   → head level_3
    D2: CBAM([up(x4), x3]) → 3 × (SN conv → LReLU)                     [4c]      → head level_2
    D1: CBAM([up(D2), x2]) → 3 × (SN conv → LReLU)                     [2c]      → head level_1
    D0: CBAM([up(D1), x1]) → 3 × (SN conv → LReLU)                     [c]       → head level_0

Heads are plain linear 3×3×3 convs (no activation, no spectral norm) unless ``output_activation`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from volsynth.nets.blocks import CBAM, RRDB, check_divisible, conv, make_pyramid, resize, scaled_size

OutputActivation = Literal["none", "clip", "sigmoid"]

LEVELS = 4
DIVISOR = 2 ** (LEVELS - 1)


def level_key(level: int) -> str:
    """Dictionary key of a resolution level: ``level_0`` is full resolution, ``level_k`` is ``1 / 2**k``."""
    return f"level_{level}"


class MDAUNet(nn.Module):
    """Multi-resolution Dense-Attention UNet generator.

    Args:
        spatial_dims: 2 or 3.
        in_channels / out_channels: image channels (1 for grey MR/CT).
        base_channels: width c of level 0; levels use c, 2c, 4c, 8c (the paper: 16).
        growth_rates: RDB growth per encoder level (the paper: 8, 16, 32, 32).
        rdbs_per_block / convs_per_rdb: RRDB topology (the paper: 3 RDBs of 5 convs).
        residual_scale: RDB/RRDB residual scaling (0.2, ESRGAN).
        cbam_reductions: channel-attention reductions of the three decoder merges, deepest first (8, 4, 2).
        multires_input: add the input pyramid's level 1..3 features to encoder levels 1..3 (Table 2 "MR-input").
        multires_output: four output heads (deep supervision, Table 2 "MR-output"); off → only ``level_0``.
        downsample / upsample: ``nearest`` (the paper) or ``linear`` resampling between levels.
        input_pyramid: resampling that builds the input pyramid when a plain tensor is passed (the release:
            trilinear).
        output_activation: ``none`` (linear heads, the default; see below), ``clip`` (hard clamp to [0, 1],
            the release applies this before every loss) or ``sigmoid``.
        negative_slope: LeakyReLU slope (0.2).
        spectral_norm: spectral normalisation on the feature and decoder convs, as the release (default on).

    Deliberate deviation from the release (its trainer and README): the release clamps every level to
    [0, 1] *before* the losses; if the freshly initialised linear output is <= 0 everywhere, the clamp zeroes all
    gradients and training never starts (the README's "restart if the first samples are black"). The default
    here is ``none``: losses see the linear output and only inference (:meth:`MDAGAN.translate`) clips. ``clip``
    remains available to reproduce the release.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1, *,
                 base_channels: int = 16, growth_rates: Sequence[int] = (8, 16, 32, 32), rdbs_per_block: int = 3,
                 convs_per_rdb: int = 5, residual_scale: float = 0.2, cbam_reductions: Sequence[int] = (8, 4, 2),
                 multires_input: bool = True, multires_output: bool = True, downsample: str = "nearest",
                 upsample: str = "nearest", input_pyramid: str = "linear",
                 output_activation: OutputActivation = "none", negative_slope: float = 0.2,
                 spectral_norm: bool = True) -> None:
        super().__init__()
        if len(growth_rates) != LEVELS:
            raise ValueError(f"growth_rates needs {LEVELS} values (one per level), got {list(growth_rates)}")
        if len(cbam_reductions) != LEVELS - 1:
            raise ValueError(f"cbam_reductions needs {LEVELS - 1} values, got {list(cbam_reductions)}")
        if output_activation not in ("none", "clip", "sigmoid"):
            raise ValueError(f"output_activation must be none, clip or sigmoid, got {output_activation!r}")
        self.spatial_dims = spatial_dims
        self.multires_input = multires_input
        self.multires_output = multires_output
        self.downsample_mode = downsample
        self.upsample_mode = upsample
        self.input_pyramid_mode = input_pyramid
        self.output_activation = output_activation
        c = base_channels
        widths = [c * 2**k for k in range(LEVELS)]
        self.widths = tuple(widths)

        def act() -> nn.Module:
            return nn.LeakyReLU(negative_slope)

        # Feature convs (SN unless spectral_norm is off): level 0 always, levels 1..3 only with multi-resolution input.
        feature_levels = LEVELS if multires_input else 1
        self.feature_convs = nn.ModuleList(conv(spatial_dims, in_channels, c, spectral=spectral_norm)
                                           for _ in range(feature_levels))

        encoder = []
        for level in range(LEVELS):
            width_in = c if level == 0 else widths[level - 1] + (c if multires_input else 0)
            encoder.append(nn.Sequential(
                RRDB(spatial_dims, width_in, growth_rates[level], rdbs_per_block, convs_per_rdb,
                     residual_scale=residual_scale, negative_slope=negative_slope),
                conv(spatial_dims, width_in, widths[level]),
                act(),
            ))
        self.encoder = nn.ModuleList(encoder)

        # Decoder, deepest first: merge width = up-sampled deeper width + skip width.
        merges, decoder = [], []
        for index, level in enumerate(range(LEVELS - 2, -1, -1)):
            merged = widths[level + 1] + widths[level]
            merges.append(CBAM(spatial_dims, merged, cbam_reductions[index]))
            decoder.append(nn.Sequential(
                conv(spatial_dims, merged, widths[level], spectral=spectral_norm), act(),
                conv(spatial_dims, widths[level], widths[level], spectral=spectral_norm), act(),
                conv(spatial_dims, widths[level], widths[level], spectral=spectral_norm), act(),
            ))
        self.merges = nn.ModuleList(merges)
        self.decoder = nn.ModuleList(decoder)

        # Output heads keyed by level; plain linear convs (as the release).
        head_levels = range(LEVELS) if multires_output else range(1)
        self.heads = nn.ModuleDict({level_key(k): conv(spatial_dims, widths[k], out_channels) for k in head_levels})

    @property
    def output_levels(self) -> tuple[str, ...]:
        """Keys of the returned dictionary, full resolution first."""
        return tuple(sorted(self.heads.keys()))

    def _activate(self, x: Tensor) -> Tensor:
        if self.output_activation == "clip":
            return x.clamp(0.0, 1.0)
        if self.output_activation == "sigmoid":
            return torch.sigmoid(x)
        return x

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Translate a patch.

        Args:
            x: ``(B, in_channels, *spatial)`` with every spatial size a multiple of 8, or a dict
                ``{"level_0": ..., "level_1": ..., ...}`` of a precomputed input pyramid (missing levels are
                built from ``level_0``).

        Returns:
            ``{"level_0": (B, out_channels, *spatial), "level_1": (..., spatial / 2), "level_2": 1/4,
            "level_3": 1/8}`` (only ``level_0`` when ``multires_output`` is off); values on the target's
            intensity scale (nominally [0, 1]; unbounded with ``output_activation="none"``).
        """
        levels = dict(x) if isinstance(x, Mapping) else {level_key(0): x}
        source = levels[level_key(0)]
        if source.dim() != self.spatial_dims + 2:
            raise ValueError(f"MDAUNet({self.spatial_dims}D) expects a (B, C, {self.spatial_dims} spatial) tensor, "
                             f"got shape {tuple(source.shape)}")
        shape = source.shape[2:]
        check_divisible(shape, DIVISOR, "MDAUNet")
        if self.multires_input:
            missing = [k for k in range(1, LEVELS) if level_key(k) not in levels]
            if missing:
                # The release builds the missing levels by trilinear interpolation of the full-res input.
                pyramid = make_pyramid(source, LEVELS, self.input_pyramid_mode)
                for k in missing:
                    levels[level_key(k)] = pyramid[level_key(k)]

        skips: list[Tensor] = []
        h = source
        for level in range(LEVELS):
            if level == 0:
                h = self.feature_convs[0](source)
            else:
                h = resize(h, scaled_size(shape, level), self.downsample_mode)
                if self.multires_input:
                    # Order [multi-res feature, down-sampled feature] as in the release.
                    h = torch.cat([self.feature_convs[level](levels[level_key(level)]), h], dim=1)
            h = self.encoder[level](h)
            skips.append(h)

        outputs: dict[str, Tensor] = {}
        deepest = level_key(LEVELS - 1)
        if deepest in self.heads:
            outputs[deepest] = self._activate(self.heads[deepest](h))
        for index, level in enumerate(range(LEVELS - 2, -1, -1)):
            h = resize(h, scaled_size(shape, level), self.upsample_mode)
            h = self.decoder[index](self.merges[index](torch.cat([h, skips[level]], dim=1)))
            key = level_key(level)
            if key in self.heads:
                outputs[key] = self._activate(self.heads[key](h))
        return dict(sorted(outputs.items()))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (spectral-norm ``u``/``v`` are buffers and do not count)."""
    return sum(p.numel() for p in module.parameters())
