"""Full-volume inference with MONAI's sliding window and Gaussian blending (the paper's settings)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from volsynth.methods.base import TranslationMethod, autocast


def translate_array(method: TranslationMethod, source: np.ndarray, *, roi_size: Sequence[int], overlap: float = 0.625,
                    sigma_scale: float = 0.125, sw_batch_size: int = 4, blend: str = "gaussian",
                    precision: str = "fp32", device: torch.device | None = None) -> np.ndarray:
    """Translate a preprocessed ``(X, Y, Z)`` source array on [0, 1] → synthetic ``(X, Y, Z)`` float32 on [0, 1].

    Windows of ``roi_size`` overlap by ``overlap`` (fraction) and are blended with a Gaussian of
    ``sigma_scale × roi`` (MONAI ``sliding_window_inference``); ``sw_batch_size`` windows run per forward pass
    (batched windows keep the CPU's cores busy). ``precision="bf16"`` runs the network under bf16 autocast.
    """
    if source.ndim != 3:
        raise ValueError(f"expected a 3D (X, Y, Z) array, got shape {source.shape}")
    divisor = method.patch_divisor
    roi = tuple(int(r) for r in roi_size)
    if any(r % divisor for r in roi):
        raise ValueError(f"roi_size {roi} must be a multiple of {divisor} for {type(method).__name__}")
    device = device or next(method.parameters()).device
    was_training = method.training
    method.eval()
    tensor = torch.from_numpy(np.array(source, dtype=np.float32, copy=True))[None, None].to(device)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return method.translate(window).float()

    try:
        with torch.inference_mode():
            output = sliding_window_inference(
                tensor, roi_size=roi, sw_batch_size=sw_batch_size, predictor=predictor, overlap=overlap,
                mode=blend, sigma_scale=sigma_scale, padding_mode="constant", cval=0.0, progress=False,
            )
    finally:
        method.train(was_training)
    return output[0, 0].clamp(0, 1).cpu().numpy().astype(np.float32)
