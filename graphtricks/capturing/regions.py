"""Capture: turn an ``nn.Module`` into a *region tree* of traced graphs and opaque modules.

A region is either a traced ``GraphModule`` or an *opaque* module that keeps its own forward,
because fx could not trace it or because its own code depends on ``self.training`` (fx bakes
the mode into a graph: see DESIGN.md). The children of an opaque module are captured as
regions of their own, so passes still reach every traceable part. Shapes and dtypes from
example inputs are recorded on every traced node (``node.meta["tensor_meta"]``).

Only the module whose *own* code is at fault becomes opaque: a failing or mode-dependent
descendant is made a leaf of its parent's trace, and the parent is traced again.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphtricks.capturing.flag_reads import LENGTH
from graphtricks.capturing.guards import install_input_guards
from graphtricks.capturing.hooks import copy_hooks, hook_kinds
from graphtricks.capturing.modes import ModeSnapshot
from graphtricks.capturing.tracing import (
    Call,
    concrete_args,
    mode_dependent_owners,
    one_line,
    record_calls,
    restore_placeholder_names,
    trace_once,
)
from graphtricks.errors import CaptureError, InputShapeError
from graphtricks.fxgraph.adopt import adopt_graph, adoption_conflict, install_guard
from graphtricks.fxgraph.kinds import CONTAINERS, is_builtin_module
from graphtricks.fxgraph.lookup import submodule

__all__ = ["Region", "RegionTree", "capture", "model_rejected", "expand_containers"]

# A trace that keeps failing on new culprits ends as opaque rather than looping for ever.
_MAX_RETRACES = 256
# The note of a region traced without running (passes that need shapes skip it).
_UNRUN = "not called on the example inputs: traced without them (no shapes)"


@dataclass
class Region:
    """One node of the region tree.

    Attributes:
        path: qualified name in the captured model ("" for the root).
        kind: "traced" (a ``GraphModule``) or "opaque" (the module's own forward runs).
        module: the region's module in the captured model.
        reason: why it is opaque, or what a traced region was specialised on.
        children: regions nested inside (leaves of a traced graph, or children of an opaque module).
        leaf_info: for opaque regions, facts about built-in children seen on the example
            input: ``{child_name: {"shape": [...], "dtype": str, "is_model_output": bool}}``.
    """

    path: str
    kind: str
    module: nn.Module
    reason: str = ""
    children: list[Region] = field(default_factory=list)
    leaf_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, Any] = field(default_factory=dict, repr=False)
    # node -> (target, args, kwargs) as captured: what fold compares to tell what passes edited
    captured: dict[Any, tuple] = field(default_factory=dict, repr=False)
    folded: list[str] = field(default_factory=list)
    inlined: dict[str, str] = field(default_factory=dict)
    # (reader's stack keys, module, attribute, value) for each value the trace read (flag_reads)
    reads: list[tuple] = field(default_factory=list, repr=False)
    concrete: dict[str, Any] = field(default_factory=dict, repr=False)  # arguments it was specialised on

    @property
    def graph_module(self) -> fx.GraphModule:
        """The traced graph of this region (only for traced regions)."""
        if not isinstance(self.module, fx.GraphModule):
            raise TypeError(f"region {self.path or '<root>'} is not traced")
        return self.module

    def walk(self):
        """Yield this region and every region below it, parents first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def qualify(self, name: str) -> str:
        """The model-level qualified name of ``name`` inside this region."""
        if not name:
            return self.path
        return f"{self.path}.{name}" if self.path else name

    def __repr__(self) -> str:
        # one line: the module is named by its type, not printed (a model's repr runs to pages)
        nodes = f", nodes={len(self.module.graph.nodes)}" if isinstance(self.module, fx.GraphModule) else ""
        reason = f", reason={self.reason!r}" if self.reason else ""
        return (f"Region({self.path or '<root>'!r}, {self.kind}, {type(self.module).__name__}{nodes}{reason}, "
                f"children={len(self.children)})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (for ``inspect --json`` and reports)."""
        out: dict[str, Any] = {
            "path": self.path,
            "kind": self.kind,
            "type": type(self.module).__name__ if self.kind == "opaque" else self.module.__class__.__name__,
            "reason": self.reason,
        }
        if self.kind == "traced":
            out["nodes"] = len(self.graph_module.graph.nodes)
        if self.folded:
            out["called_modules"] = len(self.folded)
        if self.inlined:
            out["inlined"] = dict(self.inlined)
        out["children"] = [c.to_dict() for c in self.children]
        return out


@dataclass
class RegionTree:
    """The captured model and the tree of its regions."""

    model: nn.Module
    root: Region

    def __repr__(self) -> str:
        regions = self.regions()
        traced = sum(r.kind == "traced" for r in regions)
        return (f"RegionTree({type(self.model).__name__}: {traced} traced / {len(regions) - traced} opaque regions,"
                f" traced {self.traced_fraction():.0%})")

    def regions(self) -> list[Region]:
        """Every region, parents first."""
        return list(self.root.walk())

    def traced_fraction(self) -> float:
        """The share of the model's parameters that sit in traced graphs (1.0 = fully traced)."""
        total = sum(p.numel() for p in self.model.parameters())
        if total == 0:
            return 1.0 if self.root.kind == "traced" else 0.0
        opaque_owned = 0
        for region in self.regions():
            if region.kind == "opaque":
                opaque_owned += sum(p.numel() for p in region.module.parameters(recurse=False))
                for name, child in region.module.named_children():
                    if is_builtin_module(child):
                        opaque_owned += sum(p.numel() for p in child.parameters())
        return max(0.0, 1.0 - opaque_owned / total)


def model_rejected(example_inputs: tuple, e: BaseException, example_kwargs: dict | None = None) -> InputShapeError:
    """The one-line error for a model that rejects its example inputs, quoting its message."""
    cause = e
    while cause.__cause__ is not None:  # ShapeProp wraps the model's own error
        cause = cause.__cause__
    shapes = "; ".join([",".join(map(str, t.shape)) for t in example_inputs if isinstance(t, torch.Tensor)]
                       + [f"{k}=" + ",".join(map(str, t.shape)) for k, t in (example_kwargs or {}).items()
                          if isinstance(t, torch.Tensor)])
    text = str(cause).strip()
    message = text.splitlines()[0] if text else type(cause).__name__
    return InputShapeError(f"the model rejects inputs of shape {shapes}: {message}")


@dataclass
class _Capturer:
    """Holds the state of one capture: calls seen, opaque reasons, regions by module."""

    model: nn.Module
    example_inputs: tuple
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    calls: dict[int, Call] | None = None
    done: dict[int, Region] = field(default_factory=dict)
    traced: list[tuple[nn.Module, fx.GraphModule]] = field(default_factory=list)

    def _calls(self) -> dict[int, Call]:
        # Recorded lazily: a fully traceable model never needs this extra forward.
        if self.calls is None:
            modules = [m for m in self.model.modules() if not is_builtin_module(m)]
            try:
                self.calls = record_calls(self.model, self.example_inputs, modules, self.example_kwargs)
            except Exception as e:  # the model's own error, whatever its type
                raise model_rejected(self.example_inputs, e, self.example_kwargs) from e
        return self.calls

    def capture(self, module: nn.Module, path: str, args: tuple | None, kwargs: dict) -> tuple[nn.Module, Region]:
        """Capture ``module`` (called as ``module(*args, **kwargs)``) as a region at ``path``.

        ``args=None``: the module never ran; it is traced with every argument a proxy (no shapes).
        """
        if args is None:
            concrete, note = {}, _UNRUN
        else:
            try:
                concrete, note = concrete_args(module, args, kwargs)
            except CaptureError as e:
                return module, self._opaque(module, path, f"not traceable: {e}")
        # A module with the user's hooks stays a called module: a leaf here, a region of its own.
        hooked = {id(m): kinds for m in module.modules() if m is not module and (kinds := hook_kinds(m))}
        leaves: set[int] = set(hooked)
        reasons: dict[int, str] = {}
        for _ in range(_MAX_RETRACES):
            graphs = []
            failure = None
            writes: dict[str, str] = {}
            for training in (True, False):
                graph, failure, reads_training, wrote = trace_once(module, leaves, concrete, training)
                if failure:
                    break
                graphs.append(graph)
                for owner, what in wrote.items():
                    writes.setdefault(owner, what)
                if not reads_training:  # no traced code reads the mode: the eval trace is the same
                    graphs.append(graph)
                    break
            if failure:
                culprit, err = failure
                sub = module.get_submodule(culprit) if culprit else module
                if sub is module or id(sub) in leaves or is_builtin_module(sub):
                    return module, self._opaque(module, path, f"not traceable: {one_line(err)}")
                leaves.add(id(sub))
                reasons[id(sub)] = f"not traceable: {one_line(err)}"
                continue
            # Kept as written: code that depends on the mode (fx bakes it in), and code that updates
            # state a graph would drop.
            owners = mode_dependent_owners(*graphs) if graphs[0] is not graphs[1] else set()
            culprits = {owner: "its forward depends on self.training" for owner in owners}
            for owner, what in writes.items():
                culprits.setdefault(owner, state_reason(what))
            if not culprits:
                break
            if "" in culprits:
                return module, self._opaque(module, path, culprits[""])
            for owner, reason in culprits.items():
                sub = module.get_submodule(owner)
                leaves.add(id(sub))
                reasons[id(sub)] = reason
        else:
            return module, self._opaque(module, path, "too many untraceable parts")

        graph = graphs[0]
        restore_placeholder_names(graph, module)
        install_input_guards(graph)  # not fx's _assert_is_none, which breaks fx once unpickled
        gm = _graph_module(module, graph)
        reads = getattr(graph, "_gt_reads", [])
        region = Region(path, "traced", gm, note, calls=getattr(graph, "_gt_calls", {}) if gm is module else {},
                        captured={n: (n.target, n.args, n.kwargs) for n in graph.nodes} if gm is module else {},
                        reads=reads if gm is module else [], concrete=dict(concrete))
        if gm is module:  # the flat graph holds every module's code: it checks every value read
            # (by object while passes move modules; container lengths from fold on, as passes add to them)
            install_guard(gm, [(m, name, value) for _, m, name, value in reads if name != LENGTH], by_path=False)
        graph.__dict__.pop("_gt_calls", None)
        graph.__dict__.pop("_gt_reads", None)
        # Leaves made opaque here are regions of their own, with children captured below them;
        # a leaf kept for its hooks, or given to a checkpointing call, is captured as any region is.
        for node in graph.nodes:
            sub = _module_at(gm, node)
            if sub is None:
                continue
            if id(sub) not in leaves and node.op == "get_attr" and id(sub) not in self.done:
                hooked.setdefault(id(sub), ["checkpointing"])
            elif id(sub) not in leaves or id(sub) in self.done:
                continue
            qual = f"{path}.{node.target}" if path else node.target
            if id(sub) in reasons or id(sub) not in hooked:
                region.children.append(self._opaque(sub, qual, reasons.get(id(sub), "")))
                continue
            captured = self._capture_hooked(sub, qual, hooked[id(sub)])
            if captured is None:
                continue
            new_module, child_region = captured
            if new_module is not sub:
                parent, _, leaf = str(node.target).rpartition(".")
                setattr(gm.get_submodule(parent), leaf, new_module)
            region.children.append(child_region)
        self.done[id(module)] = region
        self.traced.append((module, gm))
        return gm, region

    def _opaque(self, module: nn.Module, path: str, reason: str) -> Region:
        """Keep ``module``'s forward; capture its children as regions of their own."""
        region = Region(path, "opaque", module, reason)
        self.done[id(module)] = region
        for name, child in list(module.named_children()):
            for sub_name, sub_child, container in expand_containers(module, name, child):
                qual = f"{path}.{sub_name}" if path else sub_name
                captured = self._capture_child(sub_child, qual)
                if captured is None:
                    continue
                new_module, child_region = captured
                if new_module is not sub_child:
                    setattr(container, sub_name.rsplit(".", 1)[-1], new_module)
                region.children.append(child_region)
        return region

    def _capture_hooked(self, child: nn.Module, path: str, kinds: list[str]):
        """Capture a module kept as a called module for the user's hooks on it."""
        if is_builtin_module(child):
            return None
        if isinstance(child, nn.Sequential):  # users index it (``model.layer1[0]``): kept as it is
            why = ("given to a checkpointing call" if kinds == ["checkpointing"]
                   else f"with the user's {' and '.join(kinds)} hooks")
            return child, self._opaque(child, path, f"a Sequential {why}")
        return self._capture_child(child, path)

    def _capture_child(self, child: nn.Module, path: str):
        """Capture one child of an opaque module, or None when it is a built-in leaf."""
        if is_builtin_module(child):
            return None
        if id(child) in self.done:
            return None  # shared module: captured where it was first seen
        if isinstance(child, nn.Sequential):
            # Its parent may index or iterate it, which a GraphModule would not allow.
            return child, self._opaque(child, path, "a Sequential inside an opaque module")
        call = self._calls().get(id(child))
        if call is None:  # fx needs no inputs: traced when its forward takes plain arguments
            if any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
                   for p in inspect.signature(child.forward).parameters.values()):
                return child, self._opaque(child, path, "not called on the example inputs")
            captured, region = self.capture(child, path, None, {})
            if region.kind == "opaque":
                region.reason = f"not called on the example inputs; {region.reason}"
            return captured, region
        if not call.consistent:
            return child, self._opaque(child, path, "called with differing non-tensor arguments")
        return self.capture(child, path, call.args, call.kwargs)


def _module_at(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, or a ``get_attr`` node passes (to checkpointing)."""
    if node.op == "call_module":
        return submodule(gm, node.target)
    if node.op == "get_attr":
        found = gm
        for name in str(node.target).split("."):
            found = found.__dict__.get("_modules", {}).get(name)
            if found is None:
                return None  # a parameter, a buffer, a constant
        return found
    return None


def state_reason(what: str) -> str:
    """The opaque reason of a module whose forward updates state a graph would drop."""
    return f"its forward updates state a trace would drop ({what}); kept as written"


def expand_containers(parent: nn.Module, name: str, child: nn.Module):
    """Yield (relative name, module, its container) for a child, looking inside ModuleList/Dict."""
    if isinstance(child, CONTAINERS):
        for sub_name, sub in list(child.named_children()):
            for inner in expand_containers(child, sub_name, sub):
                yield (f"{name}.{inner[0]}", inner[1], inner[2])
    else:
        yield name, child, parent


def _graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``module`` itself running ``graph`` (its class, methods, tree and hooks kept: ``adopt.py``).

    A class that defines a name GraphModule needs (``graph``, ``code``...) gets fx's own
    ``GraphModule`` instead, with the original's state and hooks carried over.
    """
    if adoption_conflict(module) is None:
        return adopt_graph(module, graph, compile=False)  # compiled when called: passes edit it first
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    _carry_over_state(module, gm)
    copy_hooks(module, gm)
    return gm


def _carry_over_state(original: nn.Module, gm: fx.GraphModule) -> None:
    """Copy into ``gm`` the submodules, parameters, buffers and attributes the graph does not use.

    ``GraphModule`` keeps only what its graph references; a rewrite must keep every
    state-dict entry of the original (unused heads, train-only branches, tied weights), and
    an opaque parent may read plain attributes of a child (``self.attn.num_heads``).
    """
    preserved = gm.meta.setdefault("_user_preserved_attributes", {})
    for name, value in vars(original).items():
        if not name.startswith("_") and name != "training" and not hasattr(gm, name):
            setattr(gm, name, value)
            # GraphModule's deepcopy keeps only attributes listed here.
            preserved[name] = value
    have = set(gm.state_dict(keep_vars=True).keys())
    original_modules = dict(original.named_modules(remove_duplicate=False))  # a shared module under each name
    for key, tensor in original.state_dict(keep_vars=True).items():
        if key in have:
            continue
        owner_path, _, attr = key.rpartition(".")
        if _attach_ancestor(gm, owner_path, original_modules):
            have = set(gm.state_dict(keep_vars=True).keys())
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(attr, tensor)
        else:
            owner.register_buffer(attr, tensor)
        have.add(key)
    # Non-persistent buffers are in no state dict: kept, and kept out of it, as the model defines them.
    kept = dict(gm.named_buffers(remove_duplicate=False))
    for key, tensor in original.named_buffers(remove_duplicate=False):
        owner_path, _, attr = key.rpartition(".")
        if attr not in original_modules[owner_path]._non_persistent_buffers_set:
            continue
        if key not in kept and _attach_ancestor(gm, owner_path, original_modules):
            kept = dict(gm.named_buffers(remove_duplicate=False))
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if key not in kept:
            owner.register_buffer(attr, tensor, persistent=False)
        else:
            owner._non_persistent_buffers_set.add(attr)


def _attach_ancestor(gm: fx.GraphModule, owner_path: str, original_modules: dict) -> bool:
    """Attach the highest ancestor of ``owner_path`` that ``gm`` lacks, as a whole (its class and
    code kept); False when ``gm`` has the owner already."""
    parts = owner_path.split(".") if owner_path else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        try:
            gm.get_submodule(prefix)
        except AttributeError:
            parent = gm.get_submodule(".".join(parts[: i - 1])) if i > 1 else gm
            parent.add_module(parts[i - 1], original_modules[prefix])
            return True
    return False


def capture(model: nn.Module, example_inputs: tuple, example_kwargs: dict[str, Any] | None = None) -> RegionTree:
    """Capture ``model`` into a region tree (in place: children of opaque modules are replaced).

    The model's train/eval flags are restored on every module afterwards.

    Args:
        model: the module to capture; callers wanting the original untouched pass a copy.
        example_inputs: positional inputs the model accepts.
        example_kwargs: keyword inputs the model accepts (bound to its forward's signature, traced
            as placeholders like positional ones).

    Returns:
        The captured model (a ``GraphModule`` when the root traced) and its region tree.

    Raises:
        CaptureError: the model's forward signature cannot receive the example inputs.
    """
    snapshot = ModeSnapshot(model)
    kwargs = dict(example_kwargs or {})
    capturer = _Capturer(model, tuple(example_inputs), kwargs)
    try:
        captured, root = capturer.capture(model, "", tuple(example_inputs), kwargs)
    finally:
        snapshot.restore()
        # New GraphModules start in train mode; give them the modes of what they replace.
        for original, gm in capturer.traced:
            ModeSnapshot.copy_modes(original, gm)
    return RegionTree(captured, root)
