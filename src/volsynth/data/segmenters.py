"""Fixed segmenters for the "real vs synthetic agreement" downstream protocol (Protocol 2).

A segmenter maps one 3D volume to an integer label map of the same shape. Protocol 2 runs the *same*
segmenter on the real target and on the synthetic one and scores the agreement of the two label maps, so a
segmenter only has to be deterministic, not accurate.

Two segmenters ship:

- :class:`GMMTissueSegmenter` (registered as ``"gmm_tissue"``): a 3-class Gaussian mixture on the intensities of
  the brain voxels, giving CSF / GM / WM. It plays the role FSL FAST plays in HiFi-Syn's tissue Dice (FAST is a
  hidden-Markov-random-field Gaussian mixture; this is the same model without the spatial prior and without
  bias-field correction, which is enough to compare two images of the same anatomy).
- :class:`ExternalSegmenter` (``"external"``): runs any command-line tool on temporary NIfTI files, e.g.
  ``TotalSegmentator -i {input} -o {output} --ml`` (the SynthRAD2023 / paper protocol for CT).

Anything with the :class:`Segmenter` attributes and method is a segmenter; register a factory in
:data:`SEGMENTERS` to make it available by name.

Arrays are ``(x, y, z)`` volumes (the toolkit's order); label maps are ``uint16`` with 0 = background.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from volsynth.registry import Registry, suggest

# Tissue labels of the built-in segmenter; equal to the phantom's tissue labels (1 CSF, 2 GM, 3 WM) so a phantom
# tissue map can serve as a reference directly.
TISSUE_LABELS: dict[int, str] = {1: "CSF", 2: "GM", 3: "WM"}

# Order of the mean intensities of CSF / GM / WM, darkest first, per MR contrast (labels as TISSUE_LABELS):
# - T1 (and T1ce, MPRAGE): long-T1 water is dark, myelin-rich WM has the shortest T1 → CSF < GM < WM.
# - T2: long-T2 free water is brightest, WM (short T2) darkest → WM < GM < CSF.
# - FLAIR: T2 weighting with the free-water (CSF) signal nulled by inversion → CSF < WM < GM.
# - PD: proton density CSF (~1.0) > GM (~0.8) > WM (~0.7) → WM < GM < CSF (low contrast; expect lower Dice).
CONTRAST_ORDERS: dict[str, tuple[int, int, int]] = {
    "t1": (1, 2, 3),
    "t1ce": (1, 2, 3),
    "t2": (3, 2, 1),
    "flair": (1, 3, 2),
    "pd": (3, 2, 1),
}


@runtime_checkable
class Segmenter(Protocol):
    """The plug-in interface of Protocol 2.

    Attributes:
        name: short identifier written to the results.
        labels: label value → class name of the classes to score (empty: score every non-zero label found).
        normalise_input: when true, Protocol 2 min-max scales each volume to [0, 1] before ``segment`` (MR: the
            real volume is in scanner units, the synthetic one on [0, 1]); false passes native values (CT in HU
            for a CT segmenter).
    """

    name: str
    labels: dict[int, str]
    normalise_input: bool

    def segment(self, image: np.ndarray, *, mask: np.ndarray | None = None,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), origin: Sequence[float] | None = None,
                direction: Sequence[float] | None = None) -> np.ndarray:
        """Label map of ``image``.

        Args:
            image: ``(x, y, z)`` float volume.
            mask: optional ``(x, y, z)`` boolean region to segment (voxels outside are labelled 0).
            spacing: voxel size in mm along x, y, z.
            origin, direction: physical geometry (ITK convention: origin in mm, direction as 9 row-major
                values); segmenters that look at anatomy orientation (external tools) need them.

        Returns:
            ``(x, y, z)`` integer label map, 0 = background.
        """
        ...


SEGMENTERS: Registry[Callable[..., Segmenter]] = Registry("segmenter")


class SegmenterNotAvailableError(RuntimeError):
    """An external segmentation tool is not installed or not on ``PATH``."""


class SegmenterFailedError(RuntimeError):
    """An external segmentation tool ran but failed or wrote no usable output."""


# --------------------------------------------------------------------------------------------------------------
# built-in: Gaussian mixture tissue segmentation


@SEGMENTERS.register("gmm_tissue")
class GMMTissueSegmenter:
    """CSF / GM / WM by a 3-component Gaussian mixture on the brain-voxel intensities.

    Like FSL FAST (which HiFi-Syn uses for its tissue Dice): a Gaussian mixture initialised by k-means, with a
    spatial prior. Here the k-means is 1D and seeded at the 5th / 50th / 95th intensity percentiles (so it is
    deterministic and works with unbalanced classes), the mixture (scikit-learn ``GaussianMixture``, fixed
    ``random_state``) is fitted to the mask intensities, and FAST's Markov random field is approximated by
    smoothing each class posterior with a Gaussian of ``smoothing_sigma`` voxels before the arg-max (which
    also keeps voxel noise from dominating a real-vs-synthetic comparison). No bias-field correction.

    Components are sorted by mean intensity and named by the contrast's tissue order (:data:`CONTRAST_ORDERS`),
    e.g. for T1 the darkest component is CSF and the brightest WM. Voxels of other tissue (tumour) inside the
    mask are forced into one of the three classes and can capture a component (oedema on FLAIR): leave them out
    of the mask (Protocol 2's ``exclude``).

    Args:
        contrast: MR contrast of the images to segment: ``t1``, ``t1ce``, ``t2``, ``flair`` or ``pd``.
        order: explicit tissue order instead of ``contrast``: the TISSUE_LABELS values (1 CSF, 2 GM, 3 WM) from
            darkest to brightest component.
        smoothing_sigma: Gaussian sigma (voxels) applied to the class posteriors; 0 = voxel-wise arg-max.
        max_fit_voxels: at most this many mask voxels (drawn with a fixed seed) are used to fit; every mask voxel
            is then classified. Keeps a 256³ brain to about a second.
        background_threshold: without a mask, the brain is the voxels above this fraction of the intensity
            range (skull-stripped MR has a zero background).
        random_state: seed of the subsampling, k-means and the mixture.
    """

    name: str = "gmm_tissue"
    normalise_input: bool = True

    def __init__(self, contrast: str = "t1", *, order: Sequence[int] | None = None, smoothing_sigma: float = 1.0,
                 max_fit_voxels: int = 200_000, background_threshold: float = 0.05, random_state: int = 0,
                 max_iter: int = 200) -> None:
        if order is None:
            key = contrast.lower()
            if key not in CONTRAST_ORDERS:
                raise ValueError(f"Unknown contrast '{contrast}' for the GMM tissue segmenter."
                                 f"{suggest(key, list(CONTRAST_ORDERS))} Known: {', '.join(CONTRAST_ORDERS)}; "
                                 f"or pass order=(darkest, middle, brightest) with 1 CSF, 2 GM, 3 WM")
            order = CONTRAST_ORDERS[key]
        order = tuple(int(v) for v in order)
        if sorted(order) != sorted(TISSUE_LABELS):
            raise ValueError(f"order must be a permutation of {tuple(TISSUE_LABELS)} (1 CSF, 2 GM, 3 WM); got {order}")
        if smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be ≥ 0, got {smoothing_sigma}")
        self.contrast = contrast.lower()
        self.order: tuple[int, ...] = order
        self.labels: dict[int, str] = dict(TISSUE_LABELS)
        self.smoothing_sigma = float(smoothing_sigma)
        self.max_fit_voxels = int(max_fit_voxels)
        self.background_threshold = float(background_threshold)
        self.random_state = int(random_state)
        self.max_iter = int(max_iter)
        # Component means (darkest first) of the last fit, on the [0, 1] scale of the masked intensities.
        self.means_: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"GMMTissueSegmenter(contrast={self.contrast!r}, order={self.order}, "
                f"smoothing_sigma={self.smoothing_sigma})")

    def segment(self, image: np.ndarray, *, mask: np.ndarray | None = None,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), origin: Sequence[float] | None = None,
                direction: Sequence[float] | None = None) -> np.ndarray:
        """``(x, y, z)`` map with 1 CSF, 2 GM, 3 WM inside the mask and 0 outside (``spacing`` etc. unused)."""
        from scipy.ndimage import gaussian_filter
        from sklearn.cluster import KMeans
        from sklearn.mixture import GaussianMixture

        image = np.asarray(image, dtype=np.float64)
        if image.ndim != 3:
            raise ValueError(f"expected a 3D (x, y, z) image, got shape {image.shape}")
        if not np.all(np.isfinite(image)):
            raise ValueError("image contains non-finite values")
        if mask is None:
            lo, hi = float(image.min()), float(image.max())
            mask = image > lo + self.background_threshold * (hi - lo)
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != image.shape:
                raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        k = len(self.order)
        values = image[mask]
        if values.size < 10 * k:
            raise ValueError(f"only {values.size} voxels in the brain mask; the tissue GMM needs at least {10 * k}")
        # Scale the brain intensities to [0, 1]: the fit is then independent of scanner units, and the
        # covariance regulariser means the same thing for every image.
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            raise ValueError("the brain voxels have a single intensity; nothing to segment")
        values = (values - lo) / (hi - lo)

        rng = np.random.default_rng(self.random_state)
        fit = values if values.size <= self.max_fit_voxels else \
            rng.choice(values, size=self.max_fit_voxels, replace=False)
        fit = fit.reshape(-1, 1)
        seeds = np.quantile(fit, np.linspace(0.05, 0.95, k)).reshape(k, 1)
        centres = KMeans(k, init=seeds, n_init=1, random_state=self.random_state).fit(fit).cluster_centers_
        gmm = GaussianMixture(n_components=k, covariance_type="full", means_init=np.sort(centres, axis=0),
                              random_state=self.random_state, max_iter=self.max_iter, reg_covar=1e-6).fit(fit)

        rank = np.empty(k, dtype=np.int64)
        rank[np.argsort(gmm.means_.ravel())] = np.arange(k)  # component → position dark (0) … bright (k-1)
        self.means_ = np.sort(gmm.means_.ravel())
        if self.smoothing_sigma > 0:
            # Posterior maps inside the mask's bounding box (outside the mask they are 0 for every class, which
            # does not change any arg-max), smoothed per class.
            box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
            sub_mask = mask[box]
            proba = np.zeros((k, *sub_mask.shape), dtype=np.float32)
            proba[:, sub_mask] = gmm.predict_proba(values.reshape(-1, 1)).T
            for c in range(k):
                proba[c] = gaussian_filter(proba[c], self.smoothing_sigma, mode="constant")
            component = proba[:, sub_mask].argmax(axis=0)
        else:
            component = gmm.predict(values.reshape(-1, 1))
        tissue = np.asarray(self.order, dtype=np.uint16)[rank[component]]
        out = np.zeros(image.shape, dtype=np.uint16)
        out[mask] = tissue
        return out


# --------------------------------------------------------------------------------------------------------------
# external tools

# Install hints for tools we know; the key is the executable's name.
_INSTALL_HINTS: dict[str, str] = {
    "TotalSegmentator": ("install it with `pip install TotalSegmentator` (in this or another environment) and make "
                         "sure its weights are available (they download on first use, or set TOTALSEG_HOME_DIR "
                         "to a folder that holds them; see https://github.com/wasserth/TotalSegmentator)"),
}


@SEGMENTERS.register("external")
class ExternalSegmenter:
    """Run an external command-line segmenter on a temporary NIfTI file.

    ``command`` is a template whose tokens may contain ``{input}`` (the NIfTI written from the image) and
    ``{output}`` (where the tool must write a single integer label map, NIfTI). It is split like a shell line
    (``shlex``) but run *without* a shell, so paths with spaces are safe. Example (TotalSegmentator, CT)::

        ExternalSegmenter("TotalSegmentator -i {input} -o {output} --ml --fast", name="totalseg")

    (``--ml`` makes TotalSegmentator write one multi-label file instead of a folder of masks.)

    Args:
        command: the template, as one string or a list of tokens.
        name: identifier written to the results.
        labels: label value → class name to score; empty = every non-zero label found (per subject).
        normalise_input: min-max scale inputs to [0, 1] before writing (false for CT tools, which want HU).
        timeout: seconds before the tool is killed (None = no limit).
        env: extra environment variables for the tool.
    """

    def __init__(self, command: str | Sequence[str], *, name: str = "external",
                 labels: Mapping[int, str] | None = None, normalise_input: bool = False,
                 timeout: float | None = None, env: Mapping[str, str] | None = None) -> None:
        tokens = shlex.split(command) if isinstance(command, str) else [str(t) for t in command]
        if not tokens:
            raise ValueError("empty command for the external segmenter")
        if not any("{output}" in t for t in tokens):
            raise ValueError(f"the command template must contain '{{output}}' (where the tool writes its label "
                             f"map); got {shlex.join(tokens)!r}")
        self.tokens: list[str] = tokens
        self.name = name
        self.labels: dict[int, str] = {int(k): str(v) for k, v in (labels or {}).items()}
        self.normalise_input = bool(normalise_input)
        self.timeout = timeout
        self.env = dict(env or {})

    def __repr__(self) -> str:
        return f"ExternalSegmenter({shlex.join(self.tokens)!r}, name={self.name!r})"

    @property
    def executable(self) -> str:
        """The command's program (first token)."""
        return self.tokens[0]

    def check_available(self) -> str:
        """Resolve the executable on ``PATH`` (or as a path); raise :class:`SegmenterNotAvailableError` if absent."""
        exe = self.executable
        found = shutil.which(exe)
        if found is None and os.sep in exe and Path(exe).is_file() and os.access(exe, os.X_OK):
            found = exe
        if found is None:
            base = Path(exe).name
            hint = _INSTALL_HINTS.get(base, "install it, put it on PATH, or give its full path in the command")
            raise SegmenterNotAvailableError(
                f"External segmenter '{self.name}' needs the executable '{exe}', which was not found on PATH; {hint}.")
        return found

    def segment(self, image: np.ndarray, *, mask: np.ndarray | None = None,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), origin: Sequence[float] | None = None,
                direction: Sequence[float] | None = None) -> np.ndarray:
        """Write ``image`` (with its geometry) to a temporary NIfTI, run the tool, read its label map back.

        ``mask`` (if given) zeroes the labels outside it afterwards; the tool itself sees the whole image.
        """
        import SimpleITK as sitk

        exe = self.check_available()
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"expected a 3D (x, y, z) image, got shape {image.shape}")
        with tempfile.TemporaryDirectory(prefix="volsynth-seg-") as tmp:
            in_path = Path(tmp) / "input.nii.gz"
            out_path = Path(tmp) / "output.nii.gz"
            itk = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)))  # ITK wants (z, y, x)
            itk.SetSpacing(tuple(float(s) for s in spacing))
            if origin is not None:
                itk.SetOrigin(tuple(float(o) for o in origin))
            if direction is not None:
                itk.SetDirection(tuple(float(d) for d in direction))
            sitk.WriteImage(itk, str(in_path))
            args = [exe] + [t.format(input=str(in_path), output=str(out_path)) for t in self.tokens[1:]]
            try:
                proc = subprocess.run(args, capture_output=True, text=True, timeout=self.timeout, check=False,
                                      env={**os.environ, **self.env})
            except subprocess.TimeoutExpired as err:
                raise SegmenterFailedError(f"'{self.name}' did not finish within {self.timeout} s: "
                                           f"{shlex.join(args)}") from err
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
                raise SegmenterFailedError(f"'{self.name}' exited with status {proc.returncode}: {shlex.join(args)}"
                                           f"\n{tail}")
            if out_path.is_dir():
                raise SegmenterFailedError(f"'{self.name}' wrote a folder at {{output}}, not one label map; "
                                           f"ask the tool for a single multi-label file (TotalSegmentator: --ml)")
            if not out_path.is_file():
                raise SegmenterFailedError(f"'{self.name}' wrote nothing at {{output}} ({out_path}): "
                                           f"{shlex.join(args)}")
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out_path))).transpose(2, 1, 0)
        if labels.shape != image.shape:
            raise SegmenterFailedError(f"'{self.name}' returned a label map of shape {labels.shape} for an image "
                                       f"of shape {image.shape}; it must keep the input grid")
        if np.issubdtype(labels.dtype, np.floating):
            if not np.allclose(labels, np.round(labels)):
                raise SegmenterFailedError(f"'{self.name}' returned non-integer labels")
            labels = np.round(labels)
        out = labels.astype(np.uint16)
        if mask is not None:
            out[~np.asarray(mask, dtype=bool)] = 0
        return out


def build_segmenter(name: str, **options: Any) -> Segmenter:
    """Instantiate the registered segmenter ``name`` with ``options`` (e.g. ``contrast="t2"``)."""
    return SEGMENTERS.get(name)(**options)

