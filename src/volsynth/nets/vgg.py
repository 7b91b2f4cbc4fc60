"""VGG-16/19 feature extractors in plain torch (no torchvision), with torchvision-compatible weight layout.

The module's ``features`` ``Sequential`` uses the same indices as ``torchvision.models.vgg{16,19}().features``,
so the standard ImageNet checkpoints load without key renaming and "relu5_4 = features.35" keeps its meaning.

Weights come from, in order of preference, a local ``.pth`` file or the ImageNet checkpoint in the torch hub
cache (downloaded only when online). Random weights are used only when explicitly requested, because a
perceptual loss or LPIPS with random features measures something else and must never be mistaken for the real one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from volsynth.errors import VolsynthError

# The torchvision ImageNet checkpoints (the same files torchvision downloads); file names carry the hash prefix
# that torch.hub checks.
IMAGENET_URLS: dict[int, str] = {
    16: "https://download.pytorch.org/models/vgg16-397923af.pth",
    19: "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Channel plan per depth; "M" is a 2x2 max-pool (torchvision's cfgs "D" and "E").
_PLANS: dict[int, list[int | str]] = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

# Names of the ReLU outputs by torchvision index, e.g. relu5_4 -> 35 for VGG-19.
def relu_indices(depth: int) -> dict[str, int]:
    """Map ``"relu{block}_{conv}"`` to its index in ``features`` for the given depth."""
    names: dict[str, int] = {}
    index, block, conv = 0, 1, 0
    for item in _PLANS[depth]:
        if item == "M":
            index += 1
            block, conv = block + 1, 0
        else:
            conv += 1
            names[f"relu{block}_{conv}"] = index + 1
            index += 2
    return names


class VGGWeightsUnavailable(VolsynthError, RuntimeError):
    """VGG weights were needed but could not be found or loaded; the message says how to provide them."""


class VGG(nn.Module):
    """The convolutional part of VGG-16/19 (2D, 3-channel input, ImageNet-normalised)."""

    def __init__(self, depth: int = 19) -> None:
        super().__init__()
        if depth not in _PLANS:
            raise ValueError(f"VGG depth must be 16 or 19, got {depth}")
        self.depth = depth
        layers: list[nn.Module] = []
        channels = 3
        for item in _PLANS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)

    def forward_features(self, x: Tensor, taps: Sequence[int]) -> list[Tensor]:
        """Run ``features`` up to ``max(taps)`` and return the outputs after each tapped index.

        Args:
            x: ``(N, 3, H, W)`` ImageNet-normalised images.
            taps: indices into ``features`` (e.g. 35 for VGG-19 relu5_4).
        """
        wanted = set(taps)
        last = max(wanted)
        outputs: dict[int, Tensor] = {}
        for index, layer in enumerate(self.features):
            # In-place ReLUs would overwrite a tapped conv output; tapping a conv is rare, so clone only then.
            x = layer(x)
            if index in wanted:
                outputs[index] = x.clone() if index + 1 <= last else x
            if index == last:
                break
        return [outputs[i] for i in taps]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def load_vgg(depth: int, weights: str | Path) -> VGG:
    """Build a frozen VGG in eval mode with the requested weights.

    Args:
        depth: 16 or 19.
        weights: a local ``.pth`` path (a torchvision state dict, with or without the classifier),
            ``"imagenet"`` (the torchvision checkpoint from the torch hub cache, downloaded only if online),
            or ``"random"`` (explicit opt-in; features then carry no perceptual meaning).

    Raises:
        VGGWeightsUnavailable: the file is missing or corrupt, or the ImageNet checkpoint is neither cached
            nor downloadable.
    """
    model = VGG(depth)
    key = str(weights)
    if key == "random":
        pass
    elif key == "imagenet":
        url = IMAGENET_URLS[depth]
        try:
            state = torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
        except Exception as error:  # offline, proxy, hash mismatch: all mean "not available here"
            cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
            raise VGGWeightsUnavailable(
                f"ImageNet VGG-{depth} weights are not in the torch hub cache ({cache}) and could not be "
                f"downloaded from {url} ({type(error).__name__}: {error}). Download that file on a machine "
                f"with internet and either copy it to {cache} or name it in the config as a local file; "
                "or set the weights to 'random' explicitly (perceptual values are then not comparable)."
            ) from error
        _load_features(model, state, source=url)
    else:
        path = Path(key).expanduser()
        if not path.is_file():
            raise VGGWeightsUnavailable(
                f"VGG-{depth} weights file not found: {path}. Give the path to the torchvision ImageNet "
                f"checkpoint ({IMAGENET_URLS[depth].rsplit('/', 1)[-1]}), 'imagenet' to use the torch hub "
                "cache, or 'random' explicitly."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise VGGWeightsUnavailable(f"VGG weights file {path} could not be read: {error}") from error
        _load_features(model, state, source=str(path))
    model.eval()
    model.requires_grad_(False)
    return model


def _load_features(model: VGG, state: object, *, source: str) -> None:
    if not isinstance(state, dict):
        raise VGGWeightsUnavailable(f"VGG weights in {source} are not a state dict (got {type(state).__name__})")
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    expected = set(model.state_dict())
    missing = sorted(expected - set(features))
    if missing:
        raise VGGWeightsUnavailable(
            f"VGG-{model.depth} weights in {source} lack {len(missing)} feature tensors (first: {missing[0]}); "
            f"is this a VGG-{model.depth} torchvision checkpoint?"
        )
    try:
        model.load_state_dict(features, strict=True)
    except RuntimeError as error:
        raise VGGWeightsUnavailable(f"VGG weights in {source} do not fit VGG-{model.depth}: {error}") from error
