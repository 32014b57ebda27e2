"""The one error hierarchy of graphtricks.

Every error a user can cause is a :class:`GraphtricksError` whose message says what was
wrong, where (module path or node) and what to do. The CLI prints the message as one line
and exits non-zero; library callers catch the class they care about.
"""

from __future__ import annotations

__all__ = [
    "GraphtricksError",
    "SpecError",
    "InputShapeError",
    "CaptureError",
    "PassError",
    "SelectionError",
    "RecipeError",
    "OutputError",
    "SavedModelError",
    "ExportError",
    "ValidationError",
]


class GraphtricksError(Exception):
    """Base class of every error graphtricks raises on purpose."""


class SpecError(GraphtricksError):
    """A model spec names a file, module, attribute or weights file that cannot be used."""


class InputShapeError(GraphtricksError):
    """An input shape is malformed, or the model rejects the example inputs."""


class CaptureError(GraphtricksError):
    """The model could not be captured into a region tree."""


class PassError(GraphtricksError):
    """A pass was configured wrongly or cannot apply where it was asked to."""


class SelectionError(PassError):
    """An include/exclude/block pattern of a pass matches nothing in the model.

    Attributes:
        option: the pass option that held it (``include``, ``exclude``, ``blocks``).
        pattern: the pattern itself.
        hint: the closest names, as ``"; did you mean 'a' or 'b'?"`` (or where to look).
    """

    def __init__(self, message: str, *, option: str = "", pattern: str = "", hint: str = ""):
        super().__init__(message)
        self.option, self.pattern, self.hint = option, pattern, hint


class RecipeError(GraphtricksError):
    """A recipe file is not valid TOML or names an unknown pass or option."""


class OutputError(GraphtricksError):
    """An output folder cannot be written (exists, is a file, is not empty)."""


class SavedModelError(GraphtricksError):
    """A folder is not a readable graphtricks model (missing or truncated files)."""


class ExportError(GraphtricksError):
    """A model could not be exported to ONNX."""


class ValidationError(GraphtricksError):
    """ONNX files or validation inputs cannot be used (missing, truncated, mismatched)."""
