"""The pass framework: the base class every pass extends, selection, and the registry.

A pass is a ``torch.fx`` ``PassBase``: ``call(gm)`` edits one traced region and returns a
``PassResult``. graphtricks passes also edit opaque regions (``call_opaque``: module
attributes, since there is no graph), select what they touch by type and qualified-name
glob, and record one :class:`~graphtricks.report.Change` per edit.
"""

from __future__ import annotations

import fnmatch
from typing import Any, ClassVar

from torch.fx.passes.infra.pass_base import PassBase

from graphtricks.capture import Region
from graphtricks.capture.probe import Observers
from graphtricks.errors import PassError
from graphtricks.report import Change

__all__ = ["GraphtricksPass", "NoChangeWarning", "PASSES", "register_pass", "pass_from_config"]


class NoChangeWarning(UserWarning):
    """A pass matched nothing in the model (so it changed nothing)."""


PASSES: dict[str, type[GraphtricksPass]] = {}


def register_pass(cls: type[GraphtricksPass]) -> type[GraphtricksPass]:
    """Class decorator: make a pass available by its ``name`` to recipes and the CLI."""
    PASSES[cls.name] = cls
    return cls


class GraphtricksPass(PassBase):
    """Base class of graphtricks passes.

    Subclasses set ``name`` (registry key), ``preserves_eval`` (True when eval-mode output is
    unchanged, which the conformance tests then check), implement ``call`` for traced regions
    and, where it makes sense, ``call_opaque`` for opaque ones, and return their settings
    from ``options`` so a recipe can replay them.

    Args:
        include: qualified-name globs; when given, only matching places are edited.
        exclude: qualified-name globs of places never edited.
    """

    name: ClassVar[str] = ""
    preserves_eval: ClassVar[bool] = False

    def __init__(self, *, include: tuple[str, ...] | list[str] = (), exclude: tuple[str, ...] | list[str] = ()):
        super().__init__()
        for pattern in (*include, *exclude):
            if not isinstance(pattern, str) or not pattern:
                raise PassError(f"{self.name}: include/exclude patterns must be non-empty strings, got {pattern!r}")
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.changes: list[Change] = []
        self.notes: list[str] = []
        # Passes record shapes on the nodes they add; one that builds something whose shapes it
        # cannot know (a new opaque region) sets this, and shapes are recomputed before the next pass.
        self.stale_shapes = False
        self.region: Region | None = None
        # Set by ``rewrite`` while the pass runs: the whole tree and the example inputs, for
        # passes that measure something on the model (e.g. output drift of a swap).
        self.tree = None
        self.example_inputs: tuple = ()

    # -- configuration -------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The pass's own settings (without include/exclude), as recipe values."""
        return {}

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this pass: ``{"pass": name, **options, include, exclude}``."""
        out: dict[str, Any] = {"pass": self.name, **self.options()}
        if self.include:
            out["include"] = list(self.include)
        if self.exclude:
            out["exclude"] = list(self.exclude)
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {**self.options(), "include": self.include, "exclude": self.exclude}.items() if v or v == 0)
        return f"{type(self).__name__}({args})"

    # -- selection ---------------------------------------------------------------------
    def selects(self, where: str) -> bool:
        """True when the qualified name ``where`` passes the include/exclude globs."""
        if self.include and not any(fnmatch.fnmatchcase(where, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(where, p) for p in self.exclude)

    @property
    def prefix(self) -> str:
        """The qualified name of the region being edited ("" at the root or when run alone)."""
        return self.region.path if self.region is not None else ""

    def qualify(self, name: str) -> str:
        """A region-local name made model-level."""
        return f"{self.prefix}.{name}" if self.prefix and name else (name or self.prefix)

    def record(self, where: str, action: str, what: str, **kwargs: Any) -> Change:
        """Record one edit made by this pass."""
        change = Change(self.name, where, action, what, **kwargs)
        self.changes.append(change)
        return change

    # -- running ---------------------------------------------------------------------
    # ``call(graph_module) -> PassResult`` stays abstract, as in ``PassBase``.

    def call_opaque(self, region: Region) -> bool:
        """Edit the direct built-in children of an opaque region; returns True if modified."""
        return False

    def skip_reason(self) -> str | None:
        """Why this pass will change nothing whatever the model (e.g. p=0), or None."""
        return None

    def observers(self, tree) -> Observers | None:
        """What this pass wants to measure during the rewrite's shape forward, or None.

        ``rewrite`` asks only when every earlier pass keeps eval outputs (``preserves_eval``),
        so what the observers see then is what the pass would see when it runs.
        """
        return None


def pass_from_config(config: dict[str, Any]) -> GraphtricksPass:
    """Build a pass from a recipe entry ``{"pass": name, **options}``.

    Raises:
        RecipeError: the pass name or an option is unknown or invalid.
    """
    from graphtricks.errors import RecipeError

    config = dict(config)
    name = config.pop("pass", None)
    if name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASSES))}")
    cls = PASSES[name]
    try:
        return cls(**config)
    except TypeError as e:
        raise RecipeError(f"pass {name!r}: {e}".replace("__init__() ", "")) from e
    except PassError as e:
        raise RecipeError(str(e)) from e
