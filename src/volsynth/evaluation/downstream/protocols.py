"""``volsynth downstream``: run a protocol on a run folder's predictions and write ``RUN/downstream``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from volsynth.data.segmenters import TISSUE_LABELS, Segmenter
from volsynth.errors import ConfigError, DataError
from volsynth.evaluation.downstream.inputs import RunInputs, load_run_inputs, read_labels
from volsynth.evaluation.downstream.segment import protocol1
from volsynth.evaluation.downstream.tissue import protocol2, tissue_order_from_maps
from volsynth.registry import suggest
from volsynth.run import RunFolder

PROTOCOLS: dict[str, str] = {
    "tissue": "a fixed GMM tissue segmenter on real vs synthetic: CSF, GM and WM Dice and VS [HFS Tab. 3]",
    "segment": "a UNet trained on synthetic images with real labels, tested on real images (+ upper bound)",
    "external": "like tissue, with an external segmentation command (command=..., e.g. TotalSegmentator)",
}

# BraTS label values (the phantom's `label` maps use the same): necrotic core, oedema, enhancing tumour.
BRATS_LABELS: dict[int, str] = {1: "NCR", 2: "ED", 4: "ET"}


def _label_values(paths: dict[str, Path], subjects: list[str]) -> list[int]:
    values: set[int] = set()
    for subject in subjects:
        values |= set(np.unique(read_labels(paths[subject])).tolist())
    return sorted(values - {0})


def _segment(inputs: RunInputs, out: Path, *, upper_bound: bool = True, max_test_subjects: int | None = None,
             **options: Any) -> dict[str, Any]:
    """The seed's split: train on the synthetic test-set volumes with their real labels (``label`` maps, else
    ``tissue`` maps), test on the real volumes of every *other* manifest subject (the seed: fold-0 test cases →
    the other 75 %); with ``label`` maps the headline is whole-foreground Dice (the seed's whole tumour)."""
    label_field = "label" if any(s in inputs.labels for s in inputs.test_subjects) else "tissue"
    labels = inputs.labels if label_field == "label" else inputs.tissue
    train = [s for s in inputs.test_subjects if s in labels]
    test = [s for s in inputs.other_subjects if s in labels][:max_test_subjects]
    if not train or not test:
        raise DataError(f"{inputs.manifest}: --protocol segment needs '{label_field}' maps of the test subjects "
                        f"(training) and of the other subjects (testing); found {len(train)} and {len(test)}")
    if "label_values" not in options:
        values = _label_values(labels, train)
        known = BRATS_LABELS if label_field == "label" else TISSUE_LABELS
        options["label_values"] = {v: known.get(v, str(v)) for v in values}
        if label_field == "label" and "regions" not in options:
            options["regions"] = {"whole": values}
    return protocol1({s: inputs.real[s] for s in train} if upper_bound else None,
                     {s: inputs.synthetic[s] for s in train}, {s: labels[s] for s in train},
                     {s: inputs.real_other[s] for s in test}, {s: labels[s] for s in test}, out_dir=out, **options)


def _tissue_segmenter(inputs: RunInputs, contrast: str | None, options: dict[str, Any]) -> Segmenter:
    from volsynth.data.segmenters import CONTRAST_ORDERS, GMMTissueSegmenter

    if contrast is None and inputs.target.lower() in CONTRAST_ORDERS:
        contrast = inputs.target.lower()
    order = None
    if contrast is None:
        order = tissue_order_from_maps(inputs.real, inputs.tissue)
        if order is None:
            raise ConfigError(f"cannot tell the tissue contrast of target '{inputs.target}' (not a known contrast, "
                              f"no tissue maps to measure it on): pass contrast= one of {', '.join(CONTRAST_ORDERS)}")
    chosen = {k: options.pop(k) for k in ("smoothing_sigma", "max_fit_voxels", "background_threshold",
                                          "random_state") if k in options}
    return GMMTissueSegmenter(contrast or "t1", order=order, **chosen)


def run_downstream(run: str | os.PathLike[str], *, protocol: str = "tissue",
                   out_dir: str | os.PathLike[str] | None = None, iterations: int = 200,
                   contrast: str | None = None, command: str | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Run a downstream protocol on a run folder (``volsynth downstream``); writes into ``RUN/downstream``.

    Args:
        run: a ``volsynth train`` run (a staged run: its final stage's config and splits) whose test subjects
            have predictions (``RUN/predictions``).
        protocol: ``tissue`` (the GMM tissue segmenter on real vs synthetic; brain masks from the manifest when
            present, lesion ``label`` voxels left out), ``segment`` (a UNet trained on the synthetic test-set
            volumes, tested on the real other subjects), or ``external`` (as ``tissue`` with ``command``, a
            template with ``{input}`` and ``{output}``).
        out_dir: default ``RUN/downstream``; results are ``<protocol>.csv`` and ``<protocol>_summary.json``.
        iterations: segmenter training iterations (``segment``).
        contrast: MR contrast of the target for ``tissue`` (t1/t1ce/t2/flair/pd); default the run's target
            modality name, else the order measured on the manifest's tissue maps.
        command: the external tool's command template (``external``).
        progress: progress bars while the ``segment`` protocol trains.
        options: passed on to :func:`protocol1` / :func:`protocol2` / the segmenter.

    Returns:
        The protocol's summary (also written as JSON; :func:`format_summary` prints it).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: unknown downstream protocol.{suggest(protocol, list(PROTOCOLS))}"
                          f" Known: {', '.join(PROTOCOLS)}")
    if protocol == "external" and not command:
        raise ConfigError("--protocol external needs command='TOOL ... {input} ... {output}' (the segmenter's "
                          "command line)")
    out = Path(out_dir) if out_dir is not None else RunFolder.of(run).downstream
    inputs = load_run_inputs(run)
    if protocol == "segment":
        return _segment(inputs, out, iterations=iterations, progress=progress, log=log, **options)

    segmenter: Segmenter
    if protocol == "external":
        from volsynth.data.segmenters import ExternalSegmenter

        chosen = {k: options.pop(k) for k in ("name", "labels", "normalise_input", "timeout", "env") if k in options}
        external = ExternalSegmenter(command, **chosen)  # type: ignore[arg-type]
        external.check_available()  # fail before reading any volume
        segmenter = external
    else:
        segmenter = _tissue_segmenter(inputs, contrast, options)
    if log is not None:
        log(f"{protocol} protocol with {segmenter!r} on {len(inputs.synthetic)} subjects")
    if protocol == "tissue" and "exclude" not in options:
        # Tissue classes are for normal tissue: lesion voxels (the BraTS-style label map) are left out.
        options["exclude"] = {s: inputs.labels[s] for s in inputs.test_subjects if s in inputs.labels} or None
    masks = {s: inputs.masks[s] for s in inputs.test_subjects if s in inputs.masks} or None
    return protocol2(inputs.real, inputs.synthetic, segmenter=segmenter, masks=masks, out_dir=out,
                     protocol=protocol, **options)
