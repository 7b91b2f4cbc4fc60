"""Synthetic multi-contrast brain phantom cohort (``volsynth phantom``).

Every subject is built from the ICBM152 2009a template that nilearn ships inside its package (T1 template,
grey- and white-matter probability maps; no download):

1. **Anatomy.** Brain mask = template T1 > 0 (the template is skull-stripped), GM and WM probabilities /255,
   CSF = mask − GM − WM clipped to [0, 1]; the maps are resampled once per spacing (cached in-process).
2. **Deformation.** A cubic B-spline free-form deformation (control points every 30 mm, coefficients bounded
   so the map cannot fold) composed with a random global scaling about the brain centre, applied identically
   to all tissue maps so every contrast of a subject stays aligned.
3. **Lesions** (probability ``lesion_probability`` per subject): 1–3 irregular tumour-like lesions, each a
   necrotic core inside an enhancing rim inside oedema, with one-voxel partial-volume edges. Lesion
   fractions take over the normal-tissue fractions, so the six fractions always sum to 1 inside the brain.
4. **Signal.** Per-tissue T1/T2/PD (BrainWeb 1.5 T, jittered per subject) through the spin-echo and
   inversion-recovery equations, mixed by tissue fraction (partial volume), scaled so the brightest normal
   tissue of each contrast is :data:`REFERENCE_INTENSITY`.
5. **Corruption.** A smooth multiplicative bias field and Rician noise, drawn independently per contrast.
6. **Ideal image.** The Rician mean E[noisy | anatomy, bias] of every contrast (:func:`rician_mean`): the best
   any prediction of the noisy image can do in mean squared error, i.e. the physical ceiling of a translation
   scored against a noisy target (``volsynth evaluate`` scores it next to the predictions).

Array order is nibabel's (x, y, z) with an axis-aligned, isotropic RAS affine (the template's orientation).
Every random draw comes from its own seeded stream, so subject *k* is the same whatever the number of subjects or
the requested contrasts, and adding lesions changes nothing else.

Modules: :mod:`.anatomy` (template, grid, deformation), :mod:`.lesions`, :mod:`.signal` (tissue parameters, pulse
sequences, bias field, Rician mean), :mod:`.fields` (random streams and smooth fields), :mod:`.subject`
(:func:`simulate_subject`), :mod:`.files` (NIfTI bytes, atomic writes, output-folder checks), :mod:`.montage`,
:mod:`.cohort` (:func:`make_phantom_cohort`).
"""

from volsynth.data.phantom.cohort import PHANTOM_VERSION, make_phantom_cohort
from volsynth.data.phantom.files import nifti_bytes
from volsynth.data.phantom.montage import montage_png
from volsynth.data.phantom.signal import (
    BASE_TISSUE_PARAMS,
    CONTRASTS,
    REFERENCE_INTENSITY,
    SEG_LABELS,
    SEQUENCES,
    TISSUE_LABELS,
    TISSUES,
    PulseSequence,
    TissueParams,
    rician_mean,
    tissue_signal,
)
from volsynth.data.phantom.subject import SUBJECT_PREFIX, PhantomSubject, simulate_subject, subject_name

__all__ = [
    "BASE_TISSUE_PARAMS",
    "CONTRASTS",
    "PHANTOM_VERSION",
    "REFERENCE_INTENSITY",
    "SEG_LABELS",
    "SEQUENCES",
    "SUBJECT_PREFIX",
    "TISSUES",
    "TISSUE_LABELS",
    "PhantomSubject",
    "PulseSequence",
    "TissueParams",
    "make_phantom_cohort",
    "montage_png",
    "nifti_bytes",
    "rician_mean",
    "simulate_subject",
    "subject_name",
    "tissue_signal",
]
