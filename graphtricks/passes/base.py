"""The pass framework: the base class every pass extends, its run, selection, and the registry.

A pass is a ``torch.fx`` ``PassBase``: ``call(gm)`` edits one traced region and returns a
``PassResult``. graphtricks passes also edit opaque regions (``call_opaque``: module
attributes, since there is no graph), select what they touch by type and qualified-name
glob, and record one :class:`~graphtricks.report.Change` per edit.

A pass object holds only its settings. Everything about one application — the region tree,
the example inputs, the region being edited, the changes and notes, the pass's own working
data — lives in a :class:`PassRun` the driver hands it (:meth:`GraphtricksPass.run`), and
comes back in it. Run on one ``GraphModule`` alone (``p(gm)``), a pass makes a run of its own
and returns it with the ``PassResult`` (``result.run.changes``). So one pass object can be run
any number of times, and each run reports its own changes.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphtricks.capture import Region, RegionTree
from graphtricks.capture.probe import Observers
from graphtricks.errors import GraphtricksError, PassError
from graphtricks.report import Change

__all__ = ["GraphtricksPass", "NoChangeWarning", "PassNoteWarning", "PASSES", "PassRun", "RunResult", "register_pass", "pass_from_config"]


class NoChangeWarning(UserWarning):
    """A pass matched nothing in the model (so it changed nothing)."""


class PassNoteWarning(UserWarning):
    """A pass left something alone and says why (each of a run's notes, as a warning)."""


PASSES: dict[str, type[GraphtricksPass]] = {}


@dataclass
class PassRun:
    """One application of one pass: what it reads, and where it records what it did.

    Attributes:
        tree: the region tree being rewritten (None when a pass is run on one graph module).
        example_inputs: the model's example inputs, for passes that measure something.
        example_kwargs: the model's example keyword inputs (``model(*example_inputs, **example_kwargs)``).
        region: the region being edited now (set by :meth:`GraphtricksPass.run` region by region).
        changes: one :class:`Change` per edit, in order.
        notes: what the pass left alone and why, one line each.
        skipped: counts of what the pass leaves alone by design (``{"gates": 9}``): report data,
            not notes, so ``--strict`` does not fail a model for its defaults.
        stale_shapes: the pass built something no forward has measured (shapes are recomputed
            before the next pass).
        state: the pass's own working data for this run (plans, measurements).
    """

    tree: RegionTree | None = None
    example_inputs: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    region: Region | None = None
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    stale_shapes: bool = False
    state: SimpleNamespace = field(default_factory=SimpleNamespace)


class RunResult(PassResult):
    """A ``PassResult`` that also carries the run (its changes and notes)."""

    def __new__(cls, graph_module: fx.GraphModule, modified: bool, run: PassRun):
        result = super().__new__(cls, graph_module, modified)
        result.run = run
        return result


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
        self._run: PassRun | None = None  # the run in progress, bound by run() / __call__ only

    # -- the run in progress -------------------------------------------------------------
    @contextlib.contextmanager
    def bound(self, run: PassRun):
        """Make ``run`` the one this pass reads and records into, for the ``with`` block."""
        outer, self._run = self._run, run
        try:
            yield run
        finally:
            self._run = outer

    def _current(self) -> PassRun:
        if self._run is None:
            raise PassError(f"pass {self.name!r} used outside a run; call it on a GraphModule or through rewrite")
        return self._run

    # What a pass reads and writes while it runs: views of the current run.
    region = property(lambda self: self._current().region)
    tree = property(lambda self: self._current().tree)
    example_inputs = property(lambda self: self._current().example_inputs)
    example_kwargs = property(lambda self: self._current().example_kwargs)
    changes = property(lambda self: self._current().changes)
    notes = property(lambda self: self._current().notes)
    skipped = property(lambda self: self._current().skipped)
    state = property(lambda self: self._current().state)

    @property
    def stale_shapes(self) -> bool:
        return self._current().stale_shapes

    @stale_shapes.setter
    def stale_shapes(self, value: bool) -> None:
        self._current().stale_shapes = value

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
        region = self._run.region if self._run is not None else None
        return region.path if region is not None else ""

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

    def run(self, run: PassRun) -> PassRun:
        """Apply this pass to every region of ``run.tree`` that exists now, and return ``run``.

        Regions are visited in tree order, parents before children (``RegionTree.regions``), and
        regions the pass adds are not visited; :meth:`begin` is called once first.

        Raises:
            PassError: the pass failed in a region (named), or is misconfigured for this model.
        """
        with self.bound(run):
            self.begin()
            for region in run.tree.regions():
                run.region = region
                try:
                    if region.kind == "traced":
                        PassBase.__call__(self, region.graph_module)
                    else:
                        self.call_opaque(region)
                except GraphtricksError:
                    raise
                except Exception as e:
                    where = region.path or "<root>"
                    raise PassError(f"pass {self.name!r} failed in region {where}: {type(e).__name__}: {e}") from e
                finally:
                    run.region = None
        return run

    def __call__(self, graph_module: fx.GraphModule) -> RunResult:
        """Run on one ``GraphModule`` (torch.fx's pass protocol); the result carries its run."""
        if self._run is not None:  # inside run(): the region is the run's
            return PassBase.__call__(self, graph_module)
        run = PassRun()
        with self.bound(run):
            self.begin()
            result = PassBase.__call__(self, graph_module)
        return RunResult(result.graph_module, result.modified, run)

    def begin(self) -> None:
        """Called once at the start of each run, before the first region: set up ``self.state``."""

    def observe(self, run: PassRun) -> Observers | None:
        """:meth:`observers` for ``run`` (what it measures is kept in ``run.state``)."""
        with self.bound(run):
            return self.observers(run.tree)

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
