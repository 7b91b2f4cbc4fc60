"""volsynth: 3D cross-modality medical image translation.

Layout: ``data`` (I/O, discovery, preprocessing, patches, phantom), ``nets`` (building blocks and networks),
``losses`` (pure loss functions), ``methods`` (one file per translation method, registered by name),
``training`` (the one trainer), ``inference`` (sliding-window prediction), ``evaluation`` (metrics, downstream
tasks, reports) and ``cli`` (the ``volsynth`` command).
"""

__version__ = "0.1.0"
