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

from graphtricks.errors import CaptureError, InputShapeError
from graphtricks.graph import owner_path
from graphtricks.layers.norm import ChannelLayerNorm
from graphtricks.mode_reads import module_reads_training
from graphtricks.modes import ModeSnapshot

__all__ = ["Region", "RegionTree", "capture", "is_builtin_module", "model_rejected", "expand_containers", "CONTAINERS"]

# A trace that keeps failing on new culprits ends as opaque rather than looping for ever.
_MAX_RETRACES = 256
CONTAINERS = (nn.ModuleList, nn.ModuleDict)
_CONCRETE_TYPES = (type(None), bool, int, float, str)
# graphtricks' own layers that passes treat like PyTorch's: leaves of every trace, so that a
# model rewritten in one run and one re-captured later have the same graph.
KNOWN_LEAVES = (ChannelLayerNorm,)


def is_builtin_module(module: nn.Module) -> bool:
    """True for PyTorch's own layers (fx's default leaves) and ``KNOWN_LEAVES``; False for containers."""
    if isinstance(module, (nn.Sequential, fx.GraphModule)) or isinstance(module, CONTAINERS):
        return False
    if isinstance(module, KNOWN_LEAVES):
        return True
    name = type(module).__module__
    return name.startswith("torch.nn") or name.startswith("torch.ao.nn")


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
        out["children"] = [c.to_dict() for c in self.children]
        return out


@dataclass
class RegionTree:
    """The captured model and the tree of its regions."""

    model: nn.Module
    root: Region

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


class _RegionTracer(fx.Tracer):
    """An fx tracer that keeps the given module objects as leaves and notes whether any module
    whose code it runs may read a ``training`` flag (else an eval trace would be the same)."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves
        self.reads_training = False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.leaves or isinstance(m, KNOWN_LEAVES) or super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        if isinstance(root, nn.Module):
            self.reads_training = module_reads_training(root)
        return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if not self.reads_training and not self.is_leaf_module(m, ""):
            self.reads_training = module_reads_training(m)
        return super().call_module(m, forward, args, kwargs)


@dataclass
class _Call:
    """What a module received on its first call during the recording run."""

    args: tuple
    kwargs: dict
    count: int = 1
    consistent: bool = True


def _call_key(args: tuple, kwargs: dict) -> tuple:
    """A hashable summary of the non-tensor values of a call (tensors reduced to a marker)."""

    def one(v):
        if isinstance(v, torch.Tensor):
            return "<tensor>"
        if isinstance(v, _CONCRETE_TYPES):
            return (type(v).__name__, v)
        return f"<{type(v).__name__}>"

    return tuple(one(a) for a in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))


def record_calls(model: nn.Module, example_inputs: tuple, modules: list[nn.Module]) -> dict[int, _Call]:
    """Run ``model`` once and record how each of ``modules`` is called (first call, count)."""
    calls: dict[int, _Call] = {}
    keys: dict[int, tuple] = {}

    def hook(mod, args, kwargs):
        key = _call_key(args, kwargs)
        seen = calls.get(id(mod))
        if seen is None:
            calls[id(mod)] = _Call(args, dict(kwargs))
            keys[id(mod)] = key
        else:
            seen.count += 1
            seen.consistent = seen.consistent and keys[id(mod)] == key

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    snapshot = ModeSnapshot(model)
    try:
        model.eval()  # eval: a train-mode BatchNorm would update its running statistics
        with torch.no_grad():
            model(*example_inputs)
    finally:
        snapshot.restore()
        for h in handles:
            h.remove()
    return calls


def _concrete_args(module: nn.Module, args: tuple, kwargs: dict) -> tuple[dict[str, Any], str]:
    """Concrete (non-tensor) arguments to specialise a trace on, and a note of them.

    Raises:
        CaptureError: an argument is neither a tensor nor a plain constant (fx cannot trace it).
    """
    sig = inspect.signature(module.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"cannot bind call arguments: {e}") from e
    bound.apply_defaults()
    concrete: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if value:
                raise CaptureError(f"takes *args/**kwargs ({name})")
            continue
        if isinstance(value, torch.Tensor):
            continue
        if not isinstance(value, _CONCRETE_TYPES):
            raise CaptureError(f"argument {name!r} is a {type(value).__name__}, not a tensor or constant")
        concrete[name] = value
    note = ", ".join(f"{k}={v!r}" for k, v in concrete.items() if v is not None)
    return concrete, (f"specialised on {note}" if note else "")


def _restore_placeholder_names(graph: fx.Graph, module: nn.Module) -> None:
    """Give placeholders the parameter names of ``forward`` (concrete args get renamed ``x_1``)."""
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(params):
        for node, name in zip(placeholders, params):
            node.target = name


def _node_signature(node: fx.Node) -> tuple:
    """What a node does, independent of node names (which shift when nodes are added)."""

    def norm(v):
        if isinstance(v, fx.Node):
            return "%"
        if isinstance(v, (tuple, list)):
            return tuple(norm(x) for x in v)
        if isinstance(v, dict):
            return tuple((k, norm(x)) for k, x in v.items())
        return repr(v)

    return (node.op, str(node.target), norm(node.args), norm(node.kwargs))


def _mode_dependent_owners(train: fx.Graph, infer: fx.Graph) -> set[str]:
    """Owners (module paths) whose own nodes differ between the train and eval traces."""

    def by_owner(graph):
        out: dict[str, list] = {}
        for n in graph.nodes:
            out.setdefault(owner_path(n), []).append(_node_signature(n))
        return out

    a, b = by_owner(train), by_owner(infer)
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _trace_once(module: nn.Module, leaves: set[int], concrete: dict, training: bool):
    """Trace ``module`` in one mode.

    Returns:
        ``(graph, None, reads_training)``, or ``(None, (culprit_path, error), True)`` on failure.
    """
    module.train(training)
    tracer = _RegionTracer(leaves)
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception as e:  # any failure of user code under tracing makes something opaque
        stack = list(tracer.module_stack.values())
        return None, (stack[-1][0] if stack else "", e), True
    return graph, None, tracer.reads_training


def model_rejected(example_inputs: tuple, e: BaseException) -> InputShapeError:
    """The one-line error for a model that rejects its example inputs, quoting its message."""
    cause = e
    while cause.__cause__ is not None:  # ShapeProp wraps the model's own error
        cause = cause.__cause__
    shapes = "; ".join(",".join(map(str, t.shape)) for t in example_inputs if isinstance(t, torch.Tensor))
    text = str(cause).strip()
    message = text.splitlines()[0] if text else type(cause).__name__
    return InputShapeError(f"the model rejects inputs of shape {shapes}: {message}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:200]


@dataclass
class _Capturer:
    """Holds the state of one capture: calls seen, opaque reasons, regions by module."""

    model: nn.Module
    example_inputs: tuple
    calls: dict[int, _Call] | None = None
    done: dict[int, Region] = field(default_factory=dict)
    traced: list[tuple[nn.Module, fx.GraphModule]] = field(default_factory=list)

    def _calls(self) -> dict[int, _Call]:
        # Recorded lazily: a fully traceable model never needs this extra forward.
        if self.calls is None:
            modules = [m for m in self.model.modules() if not is_builtin_module(m)]
            try:
                self.calls = record_calls(self.model, self.example_inputs, modules)
            except Exception as e:  # the model's own error, whatever its type
                raise model_rejected(self.example_inputs, e) from e
        return self.calls

    def capture(self, module: nn.Module, path: str, args: tuple, kwargs: dict) -> tuple[nn.Module, Region]:
        """Capture ``module`` (called as ``module(*args, **kwargs)``) as a region at ``path``."""
        try:
            concrete, note = _concrete_args(module, args, kwargs)
        except CaptureError as e:
            return module, self._opaque(module, path, f"not traceable: {e}")
        leaves: set[int] = set()
        reasons: dict[int, str] = {}
        for _ in range(_MAX_RETRACES):
            graphs = []
            failure = None
            for training in (True, False):
                graph, failure, reads_training = _trace_once(module, leaves, concrete, training)
                if failure:
                    break
                graphs.append(graph)
                if not reads_training:  # no traced code reads the mode: the eval trace is the same
                    graphs.append(graph)
                    break
            if failure:
                culprit, err = failure
                sub = module.get_submodule(culprit) if culprit else module
                if sub is module or id(sub) in leaves or is_builtin_module(sub):
                    return module, self._opaque(module, path, f"not traceable: {_one_line(err)}")
                leaves.add(id(sub))
                reasons[id(sub)] = f"not traceable: {_one_line(err)}"
                continue
            owners = _mode_dependent_owners(*graphs) if graphs[0] is not graphs[1] else set()
            if not owners:
                break
            if "" in owners:
                return module, self._opaque(module, path, "its forward depends on self.training")
            for owner in owners:
                sub = module.get_submodule(owner)
                leaves.add(id(sub))
                reasons[id(sub)] = "its forward depends on self.training"
        else:
            return module, self._opaque(module, path, "too many untraceable parts")

        graph = graphs[0]
        _restore_placeholder_names(graph, module)
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
        _carry_over_state(module, gm)
        region = Region(path, "traced", gm, note)
        # Leaves made opaque here are regions of their own, with children captured below them.
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            sub = gm.get_submodule(node.target)
            if id(sub) in leaves and id(sub) not in self.done:
                qual = f"{path}.{node.target}" if path else node.target
                region.children.append(self._opaque(sub, qual, reasons.get(id(sub), "")))
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
        if call is None:
            return child, self._opaque(child, path, "not called on the example inputs")
        if not call.consistent:
            return child, self._opaque(child, path, "called with differing non-tensor arguments")
        return self.capture(child, path, call.args, call.kwargs)


def expand_containers(parent: nn.Module, name: str, child: nn.Module):
    """Yield (relative name, module, its container) for a child, looking inside ModuleList/Dict."""
    if isinstance(child, CONTAINERS):
        for sub_name, sub in list(child.named_children()):
            for inner in expand_containers(child, sub_name, sub):
                yield (f"{name}.{inner[0]}", inner[1], inner[2])
    else:
        yield name, child, parent


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
    original_modules = dict(original.named_modules())
    for key, tensor in original.state_dict(keep_vars=True).items():
        if key in have:
            continue
        owner_path, _, attr = key.rpartition(".")
        # Attach the highest missing ancestor as a whole, so its class and code are kept.
        parts = owner_path.split(".") if owner_path else []
        attached = False
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            try:
                gm.get_submodule(prefix)
            except AttributeError:
                parent = gm.get_submodule(".".join(parts[: i - 1])) if i > 1 else gm
                parent.add_module(parts[i - 1], original_modules[prefix])
                attached = True
                break
        if attached:
            have = set(gm.state_dict(keep_vars=True).keys())
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(attr, tensor)
        else:
            owner.register_buffer(attr, tensor)
        have.add(key)


def capture(model: nn.Module, example_inputs: tuple) -> RegionTree:
    """Capture ``model`` into a region tree (in place: children of opaque modules are replaced).

    The model's train/eval flags are restored on every module afterwards.

    Args:
        model: the module to capture; callers wanting the original untouched pass a copy.
        example_inputs: positional inputs the model accepts.

    Returns:
        The captured model (a ``GraphModule`` when the root traced) and its region tree.

    Raises:
        CaptureError: the model's forward signature cannot receive the example inputs.
    """
    snapshot = ModeSnapshot(model)
    capturer = _Capturer(model, tuple(example_inputs))
    try:
        captured, root = capturer.capture(model, "", tuple(example_inputs), {})
    finally:
        snapshot.restore()
        # New GraphModules start in train mode; give them the modes of what they replace.
        for original, gm in capturer.traced:
            ModeSnapshot.copy_modes(original, gm)
    return RegionTree(captured, root)
