"""Capture: an ``nn.Module`` becomes a *region tree* of traced graphs and opaque modules.

``regions`` builds the tree (``capture``); ``tracing`` traces one region in both modes and finds
the modules whose own code depends on the mode (``mode_reads`` counts the reads of
``training``); ``probe`` runs hooked forwards that leave the model as they found it, ``shapes``
records shapes on every traced node, ``modes`` snapshots train/eval flags, and ``summary`` says
what a captured model is made of (``graphtricks inspect``).
"""

from graphtricks.capturing.regions import (
    Region,
    RegionTree,
    capture,
    expand_containers,
    model_rejected,
)

__all__ = ["Region", "RegionTree", "capture", "expand_containers", "model_rejected"]
