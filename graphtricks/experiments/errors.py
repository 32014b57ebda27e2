"""Errors of ``graphtricks experiment``: each a :class:`~graphtricks.GraphtricksError` with one clear line."""

from __future__ import annotations

from graphtricks.errors import GraphtricksError

__all__ = ["ExperimentError", "DataError", "MissingExtraError", "REPORT_EXTRA_HINT", "require"]

REPORT_EXTRA_HINT = 'install the report extra: pip install -e ".[report]" (or: pip install matplotlib scikit-learn)'


class ExperimentError(GraphtricksError):
    """An experiment cannot run as asked (a recipe that does not apply, a model that does not fit the data)."""


class DataError(ExperimentError):
    """A data set name or ``npz:FILE`` cannot be used."""


class MissingExtraError(ExperimentError):
    """matplotlib or scikit-learn is missing: the message says how to install them."""


def require(module: str):
    """Import ``module`` (matplotlib, sklearn) or raise :class:`MissingExtraError` with the install line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{module.split('.')[0]} is not installed; {REPORT_EXTRA_HINT}") from e
