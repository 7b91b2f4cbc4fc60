"""Downstream ("synthetic-to-real") evaluation: does a synthetic volume work where the real one would?

Two protocols, named as on the command line (``volsynth downstream --protocol …``), in the result files
(``RUN/downstream/<protocol>.csv`` and ``<protocol>_summary.json``) and in the summaries' ``protocol`` field:

- ``tissue`` (the seed paper's Protocol 2, :func:`protocol2`): one fixed segmenter on the real and the synthetic
  volume, and the agreement of its two outputs per class: CSF, GM and WM Dice and volumetric similarity, each on
  its own, as HiFi-Syn's tissue table [HFS Tab. 3], and their mean. ``external`` is the same with any
  command-line tool (TotalSegmentator on CT, as the seed).
- ``segment`` (the seed paper's Protocol 1, :func:`protocol1`): a UNet trained on *synthetic* images with the
  *real* labels, tested on *real* images; the upper bound trains on the real images.

Modules: :mod:`.inputs` (volumes and run folders), :mod:`.tissue`, :mod:`.segment`, :mod:`.results` (file names,
CSV/JSON, the printed table), :mod:`.protocols` (:func:`run_downstream`). Of these modules only the ``segment``
UNet's training and inference import torch.
"""

from volsynth.evaluation.downstream.inputs import RunInputs, VolumeInput, find_predictions, load_run_inputs
from volsynth.evaluation.downstream.protocols import PROTOCOLS, run_downstream
from volsynth.evaluation.downstream.results import column, format_summary, result_files
from volsynth.evaluation.downstream.segment import protocol1
from volsynth.evaluation.downstream.tissue import protocol2

__all__ = [
    "PROTOCOLS",
    "RunInputs",
    "VolumeInput",
    "column",
    "find_predictions",
    "format_summary",
    "load_run_inputs",
    "protocol1",
    "protocol2",
    "result_files",
    "run_downstream",
]
