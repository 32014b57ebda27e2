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
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from graphtricks.capturing import Region, RegionTree
from graphtricks.capturing.probe import Observers
from graphtricks.errors import GraphtricksError, PassError, SelectionError
from graphtricks.fxgraph.nodes import node_where, stack_types
from graphtricks.report import Change
from graphtricks.suggest import did_you_mean

__all__ = [
    "GraphtricksPass", "NoChangeWarning", "PassNoteWarning", "SelectionWarning", "PASSES", "PassRun", "RunResult",
    "SelectionNames", "as_patterns", "register_pass", "pass_from_config", "selection_names",
]


class NoChangeWarning(UserWarning):
    """A pass matched nothing in the model (so it changed nothing)."""


class PassNoteWarning(UserWarning):
    """A pass left something alone and says why (each of a run's notes, as a warning)."""


class SelectionWarning(UserWarning):
    """A selection pattern of a pass built with ``strict=False`` matches nothing in the model."""


# -- selections: patterns given by the user, checked against the model's names ----------------
def as_patterns(value: Any, what: str) -> tuple[str, ...]:
    """A selection given as one string or a list of strings, as a tuple of patterns.

    A string is one pattern (iterating it would select by single characters: ``"layer1.*"``
    would be eight patterns, one of them ``*``); anything but strings is refused.

    Raises:
        PassError: ``value`` is not a string or a list of non-empty strings (names ``what``).
    """
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise PassError(f"{what} must be a string or a list of strings, got {type(value).__name__} {value!r}")
    patterns = tuple(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise PassError(f"{what} patterns must be non-empty strings, got {pattern!r}")
    return patterns


def selection_names(tree: RegionTree) -> list[str]:
    """Every qualified name a selection can match: modules, blocks inlined in a trace, graph nodes."""
    names = [name for name, _ in tree.model.named_modules() if name]
    for region in tree.regions():
        if region.kind == "traced":
            names += map(region.qualify, stack_types(region.graph_module.graph))
            names += [node_where(region.path, n) for n in region.graph_module.graph.nodes if n.op.startswith("call_")]
    return list(dict.fromkeys(names))


def _glob_matches(pattern: str, name: str) -> bool:
    """``fnmatch`` with the arguments in selection order (``fnmatchcase`` takes the name first)."""
    return fnmatch.fnmatchcase(name, pattern)


class SelectionNames:
    """The names selections are checked against over one rewrite, read from the tree lazily.

    A name counts once it existed at any point of the rewrite: a later pass may select what an
    earlier one built (a residual block's ``body``), or name what an earlier one replaced.
    The tree is read again only when a pattern matches none of the names known so far.

    Args:
        tree: the region tree being rewritten.
        now: read its names now (before the passes edit it), not at the first check.
    """

    def __init__(self, tree: RegionTree, *, now: bool = False):
        self.tree = tree
        self._names: dict[str, None] | None = None
        if now:
            self._read()

    def _read(self) -> None:
        self._names = {**(self._names or {}), **dict.fromkeys(selection_names(self.tree))}

    def matched(self, pattern: str, matches: Callable[[str, str], bool]) -> bool:
        """True when ``matches(pattern, name)`` holds for a name of the model."""
        if self._names is None:
            self._read()
        elif any(matches(pattern, n) for n in self._names):
            return True
        else:
            self._read()  # the tree as the earlier passes left it
        return any(matches(pattern, n) for n in self._names)

    def hint(self, pattern: str) -> str:
        """The closest names to ``pattern``, as ``"; did you mean ..."``, or where to look."""
        return did_you_mean(pattern, self._names or ()) or " (graphtricks inspect lists the model's names)"


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
        deferred: where a pass's writes of parameter values wait (:meth:`GraphtricksPass.write_values`)
            until the whole rewrite has succeeded, or None to write at once. An in-place rewrite
            defers them: a failure then finds the weights untouched, and no copy of them is kept.
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
    deferred: list[Callable[[], None]] | None = None


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
    unchanged, which the conformance tests then check), ``writes_values`` (True when the pass
    sets parameter values in place), implement ``call`` for traced regions
    and, where it makes sense, ``call_opaque`` for opaque ones, and return their settings
    from ``options`` so a recipe can replay them.

    Args:
        include: qualified-name globs (one string is one glob); when given, only matching places
            are edited.
        exclude: qualified-name globs of places never edited.
        strict: a selection pattern that matches no name in the model is an error
            (:class:`~graphtricks.errors.SelectionError`); ``False`` makes it a
            :class:`SelectionWarning` naming it.
    """

    name: ClassVar[str] = ""
    preserves_eval: ClassVar[bool] = False
    # True when the pass writes parameter values (through write_values, which an in-place
    # rewrite defers to its end, so that a failure leaves them as they were)
    writes_values: ClassVar[bool] = False

    def __init__(self, *, include: tuple[str, ...] | list[str] | str = (), exclude: tuple[str, ...] | list[str] | str = (),
                 strict: bool = True):
        super().__init__()
        self.include = as_patterns(include, f"{self.name}: include")
        self.exclude = as_patterns(exclude, f"{self.name}: exclude")
        self.strict = bool(strict)
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

    def write_values(self, write: Callable[[], None]) -> None:
        """Writes parameter values (``write`` does it, in place, under ``no_grad``): at once, or,
        in an in-place rewrite, once every pass, the fold and the install have succeeded.

        ``write`` must compute what it writes when called (not hold a copy of it): deferred
        writes wait together, and held values would cost what the deferral saves. Declare
        ``writes_values = True`` on a pass that calls this.
        """
        run = self._run
        if run is not None and run.deferred is not None:
            run.deferred.append(write)
        else:
            with torch.no_grad():
                write()

    @property
    def defers_writes(self) -> bool:
        """Whether :meth:`write_values` waits for the end of the rewrite (an in-place rewrite)."""
        return self._run is not None and self._run.deferred is not None

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
        if not self.strict:
            out["strict"] = False
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

    def selections(self) -> list[tuple[str, str, Callable[[str, str], bool]]]:
        """``(option, pattern, matches)`` of every pattern the user gave this pass, to check
        that each names something in the model (a pass with patterns of its own adds them)."""
        return [(option, pattern, _glob_matches)
                for option, patterns in (("include", self.include), ("exclude", self.exclude)) for pattern in patterns]

    def check_selections(self, names: SelectionNames) -> list[str]:
        """Refuse a pattern that matches no name of the model, naming it and the closest names.

        Returns:
            One message per such pattern when the pass is not strict (to warn with), else ``[]``.

        Raises:
            SelectionError: the first such pattern, when the pass is strict.
        """
        found = []
        for option, pattern, matches in self.selections():
            if names.matched(pattern, matches):
                continue
            hint = names.hint(pattern)
            message = f"{self.name}: {option} pattern {pattern!r} matches nothing in this model{hint}"
            if self.strict:
                raise SelectionError(f"{message}; strict=False makes it a warning", option=option, pattern=pattern,
                                     hint=hint)
            found.append(message)
        return found

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
