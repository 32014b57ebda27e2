"""Experiments: train the original model and its rewrites side by side and judge each technique's claim.

Example:
    >>> import graphtricks as gt
    >>> result = gt.experiment(MyMLP, "digits", ["dropout.toml"], seeds=3, out="out/dropout")
    >>> result.verdicts()

``graphtricks experiment`` is the command-line form; see ``docs/evidence/`` for a gallery.
"""

from graphtricks.experiments.data import DATASETS, Dataset, load_data
from graphtricks.experiments.errors import DataError, ExperimentError, MissingExtraError
from graphtricks.experiments.panels import CLAIMS, PANELS
from graphtricks.experiments.run import ExperimentResult, experiment
from graphtricks.experiments.techniques import (
    TECHNIQUES,
    TrainConfig,
    autocast,
    clip,
    lr_factor,
    multi_head_loss,
    penalty,
    smoothed_loss,
)
from graphtricks.experiments.variants import Variant, read_variant
from graphtricks.experiments.verdict import verdict

__all__ = [
    "CLAIMS",
    "DATASETS",
    "DataError",
    "Dataset",
    "ExperimentError",
    "ExperimentResult",
    "MissingExtraError",
    "PANELS",
    "TECHNIQUES",
    "TrainConfig",
    "Variant",
    "autocast",
    "clip",
    "experiment",
    "load_data",
    "lr_factor",
    "multi_head_loss",
    "penalty",
    "read_variant",
    "smoothed_loss",
    "verdict",
]
