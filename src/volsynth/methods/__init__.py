"""Translation methods, one self-contained file each, registered by name in :data:`METHODS`."""

from volsynth.methods.base import METHODS, Batch, StepContext, TranslationMethod, build_method

# Importing a method module registers it.
from volsynth.methods import regression_unet  # noqa: F401  isort: skip
from volsynth.methods import resunet_patchgan  # noqa: F401  isort: skip
from volsynth.methods import cyclegan3d  # noqa: F401  isort: skip
from volsynth.methods import eagan  # noqa: F401  isort: skip
from volsynth.methods import mdagan  # noqa: F401  isort: skip
from volsynth.methods import hifisyn  # noqa: F401  isort: skip
from volsynth.methods import make_a_volume  # noqa: F401  isort: skip

__all__ = ["METHODS", "Batch", "StepContext", "TranslationMethod", "build_method"]
