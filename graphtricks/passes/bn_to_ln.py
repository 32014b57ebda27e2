"""BatchNorm → LayerNorm: normalise each sample over its features instead of each feature over the batch.

Swapped: ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` modules, functional ``F.batch_norm``
calls in traced graphs, and BatchNorm subclasses whose extras are known (timm
``BatchNormAct2d``: norm, then its ``drop`` and ``act``, kept as a :class:`NormAct`). The form
follows the recorded layout: ``(N, C)`` → ``nn.LayerNorm(C)``; ``(N, C, *)`` → ``ChannelLayerNorm``
(over C at every position) or, with ``over="chw"``, ``nn.GroupNorm(1, C)`` (over C and all
positions). γ, β (the same parameters) and ε carry over; running statistics are dropped. Each
change records the relative eval-mode drift ‖y_new − y_old‖ / ‖y_old‖ on the example inputs,
measured for every swap in one forward of the model.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.nn.modules.batchnorm import _BatchNorm

from graphtricks.capturing import Region, expand_containers
from graphtricks.capturing.hooks import hook_kinds, move_hooks
from graphtricks.capturing.probe import Observers, probe_forward, watched_forward
from graphtricks.capturing.shapes import copy_output_meta, tensor_meta, transposed_meta
from graphtricks.errors import PassError
from graphtricks.fxgraph.adopt import compile_when_called
from graphtricks.fxgraph.kinds import is_builtin_module
from graphtricks.fxgraph.lookup import submodule
from graphtricks.fxgraph.nodes import ancestors, node_where
from graphtricks.layers.norm import (
    NormAct,
    batch_norm_extras,
    layer_norm_for,
    layer_norm_like,
)
from graphtricks.passes.base import GraphtricksPass, register_pass

__all__ = ["BatchNormToLayerNorm", "LN_OVER"]

LN_OVER = ("c", "chw")
# Argument order of the functional forms (torch.batch_norm is the aten signature).
_ARGS = {
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
}
_TYPE_RANK = ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))  # when no shape was recorded
_DEFAULTS = {"weight": None, "bias": None, "running_mean": None, "running_var": None, "eps": 1e-5}


def _bn_args(target, args: tuple, kwargs: dict) -> dict:
    """The arguments of a functional batch norm call, by name."""
    out = dict(_DEFAULTS)
    out.update(zip(_ARGS[target], args))
    out.update(kwargs)
    return out


# Drift is measured on at most this many values per swap: positions (or samples, where the new
# norm spans a whole sample) taken at even strides, so the forward that measures it costs about
# what the model's own forward does, whatever the batch and resolution.
DRIFT_SAMPLE = 1 << 15


def drift_sample(x: torch.Tensor, out: torch.Tensor, over: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Strided views of a norm's input and output that keep every value one new norm reads
    together, and the fraction of the values they hold.

    LayerNorm over channels (``over="c"``, or rank 2) normalises each position apart: positions
    are thinned. GroupNorm(1, C) (``"chw"``) normalises each sample whole: samples are thinned.
    Drift, a ratio of sums over positions, is then estimated from an even spread of them.
    """
    if x.numel() <= DRIFT_SAMPLE or x.shape != out.shape:
        return x, out, 1.0
    index: list = [slice(None)] * x.dim()
    kept = x.numel()
    dims = [0] if (over == "chw" and x.dim() > 2) else [d for d in range(x.dim()) if d != (1 if x.dim() > 2 else x.dim() - 1)]
    while kept > DRIFT_SAMPLE:
        sizes = {d: len(range(x.shape[d])[index[d]]) for d in dims}
        d = max(dims, key=sizes.__getitem__)
        if sizes[d] < 2:
            break
        step = (index[d].step or 1) * 2
        index[d] = slice(None, None, step)
        kept = kept // sizes[d] * len(range(x.shape[d])[index[d]])
    at = tuple(index)
    return x[at], out[at], kept / x.numel()


def _norm(t: torch.Tensor) -> float:
    """‖t‖₂, at least in float32 (half-precision sums lose too much); a fast vectorised reduction."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))


def _expand_norm_act(gm: fx.GraphModule, node: fx.Node, target: str, new: NormAct) -> None:
    """Replace the call of ``target`` by calls of its ``norm``, ``drop`` and ``act`` children."""
    stack = dict(node.meta.get("nn_module_stack") or {})
    stack[target] = (target, NormAct)
    last, args, kwargs = node, node.args, node.kwargs
    for child in ("norm", "drop", "act"):
        path = f"{target}.{child}"
        with gm.graph.inserting_after(last):
            last = gm.graph.call_module(path, args, kwargs)
        last.meta["nn_module_stack"] = {**stack, path: (path, type(getattr(new, child)))}
        copy_output_meta(node, last)  # shape-preserving
        args, kwargs = (last,), {}
    node.replace_all_uses_with(last)
    gm.graph.erase_node(node)


def _other_homes(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each module registered under several names: every ``(parent, name)`` that holds it."""
    homes: dict[int, list] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                homes.setdefault(id(child), []).append((parent, name))
    return {k: v for k, v in homes.items() if len(v) > 1}


@register_pass
class BatchNormToLayerNorm(GraphtricksPass):
    """Replace BatchNorm (modules, subclasses, functional calls) with the matching LayerNorm.

    Args:
        over: ``"c"``: each sample and position normalised over channels (``ChannelLayerNorm``);
            ``"chw"``: each sample over channels and all positions (``nn.GroupNorm(1, C)``).
            Vectors ``(N, C)`` always get ``nn.LayerNorm(C)``.
        include: qualified-name globs to edit; empty = everything.
        exclude: qualified-name globs never edited.

    Raises:
        PassError: ``over`` is not one of ``c``, ``chw``.

    Example:
        >>> result = gt.rewrite(model, [BatchNormToLayerNorm(over="c")], example_inputs=(x,))
    """

    name = "bn_to_ln"
    preserves_eval = False

    def __init__(self, *, over: str = "c", include=(), exclude=(), strict: bool = True):
        super().__init__(include=include, exclude=exclude, strict=strict)
        if over not in LN_OVER:
            raise PassError(f"unknown LayerNorm layout over={over!r}; choose one of {', '.join(LN_OVER)}")
        self.over = over

    def options(self) -> dict:
        return {"over": self.over}

    # -- swapping modules ------------------------------------------------------------------
    def _swap(self, bn: _BatchNorm, where: str, shapes: list, put) -> nn.Module | None:
        """Build ``bn``'s replacement, install it with ``put``, record it; None when left alone.

        The rank comes from the recorded input shapes, else from the measuring run, else from
        the type. Call sites of differing ranks get the highest: the channel forms equal
        LayerNorm on (N, C). A BatchNorm1d that did not run gets the channel form too, as it
        fits both of its layouts (and a second run, where it may run, then finds nothing to do).
        """
        if not self.selects(where):
            return None
        if batch_norm_extras(bn) is None:
            self.notes.append(f"{where}: {type(bn).__module__}.{type(bn).__qualname__} is a BatchNorm subclass "
                              "this pass does not understand (it may do more than normalise); left alone")
            return None
        shapes = [list(s) for s in shapes if s is not None] or [self.state.seen.get(id(bn), {}).get("shape")]
        ranks = [len(s) for s in shapes if s] or [r for t, r in _TYPE_RANK if isinstance(bn, t)]
        if not ranks:
            ranks = [3]
            self.notes.append(f"{where}: did not run on the example inputs; given the channel form, which fits"
                              " (N, C) and (N, C, L) inputs alike (no drift figure)")
        new = layer_norm_for(bn, max(ranks), self.over)
        if isinstance(new, NormAct):  # what an earlier pass added beside its act (a dropout it calls) stays
            for name, child in bn.named_children():
                if name not in new._modules and name not in batch_norm_extras(bn):
                    new.add_module(name, child)
        put(new)
        for parent, name in getattr(self.state, "homes", {}).get(id(bn), ()):  # a shared module: every name
            if parent._modules.get(name) is bn:
                parent._modules[name] = new
        moved = move_hooks(bn, new)
        if moved:
            self.notes.append(f"{where}: the user's {' and '.join(moved)} hooks on the BatchNorm moved to its "
                              f"{type(new).__name__} replacement")
        norm = new.norm if isinstance(new, NormAct) else new
        desc = f"{type(norm).__name__}({bn.num_features})"
        if isinstance(new, NormAct):
            desc += "".join(f" + {type(m).__name__}" for m in (new.drop, new.act) if not isinstance(m, nn.Identity))
        self.record(
            where,
            "replaced",
            f"{type(bn).__name__} -> {desc}",
            copied_params=[f"{where}.{n}" for n, _ in new.named_parameters()],
            details={
                "from": type(bn).__name__,
                "to": type(new).__name__,
                "shape": shapes[0],
                "over": self.over,
                "drift": self._drift(id(bn)),
                "drift_sampled": self._drift_sampled(id(bn)),
                "dropped": [f"{where}.{n}" for n, _ in bn.named_buffers(recurse=False)],
            },
        )
        return new

    # -- measuring drift -----------------------------------------------------------------
    @staticmethod
    def _accumulate(seen: dict, key, shape, new: torch.Tensor, old: torch.Tensor, share: float = 1.0) -> None:
        entry = seen.setdefault(key, {"shape": list(shape), "diff": 0.0, "ref": 0.0, "sampled": 1.0})
        if old.is_meta:  # a model captured on the meta device: shapes, but no values to compare
            entry["ref"] = 0.0
            return
        entry["diff"] += _norm(new - old) ** 2
        entry["ref"] += _norm(old) ** 2
        entry["sampled"] = min(entry["sampled"], share)

    def _drift(self, key) -> float | None:
        entry = self.state.seen.get(key)
        if entry is None or entry["ref"] == 0:
            return None  # not measured, or the old output was all zeros (no relative figure)
        return (entry["diff"] / entry["ref"]) ** 0.5

    def _drift_sampled(self, key) -> float:
        """The share of the output values the drift was measured on (1.0: all of them)."""
        entry = self.state.seen.get(key)
        return round(entry["sampled"], 6) if entry is not None else 1.0

    def observers(self, tree) -> Observers:
        """Hooks that record every BatchNorm's input shape and the drift of its swap.

        ``rewrite`` adds them to its shape forward when every earlier pass kept eval outputs
        (so each BatchNorm sees then what it would see now); otherwise the pass runs one
        forward of its own (:meth:`_measure`).
        """
        # key → {"shape", "diff", "ref"}, and the BatchNorms watched, for this run's begin()
        seen = self.state.seen = {}  # the hooks fill it while the forward runs, outside the run
        self.state.watched = {id(m) for m in self._batch_norms(tree)}

        def hook(bn, args, kwargs, output):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.dim() >= 2:
                xs, old, share = drift_sample(x, output, self.over)
                if batch_norm_extras(bn):  # its activation and dropout too: the module that would replace it
                    new = layer_norm_for(bn, x.dim(), self.over)(xs)
                else:  # the same norm, without building a module per call
                    new = layer_norm_like(xs, self.over, bn.weight, bn.bias, bn.eps)
                self._accumulate(seen, id(bn), x.shape, new, old, share)

        def functional(gm: fx.GraphModule):  # what each functional batch norm of ``gm`` would become
            def after(interpreter: fx.Interpreter, n: fx.Node, out) -> None:
                if n.op == "call_function" and n.target in _ARGS:
                    a = _bn_args(n.target, *interpreter.fetch_args_kwargs_from_env(n))
                    x = a["input"]
                    xs, old, share = drift_sample(x, out, self.over)
                    new = layer_norm_like(xs, self.over, a["weight"], a["bias"], a["eps"])
                    self._accumulate(seen, (id(gm), n.name), x.shape, new, old, share)

            return after

        found = Observers()
        found.hooks = [(m, hook) for m in self._batch_norms(tree)]
        for region in tree.regions():
            gm = region.module
            if region.kind == "traced" and any(n.op == "call_function" and n.target in _ARGS for n in gm.graph.nodes):
                found.after_node.append((gm, functional(gm)))
        return found

    def _batch_norms(self, tree) -> list[nn.Module]:
        """The BatchNorm modules of ``tree`` this pass would swap."""
        return [m for name, m in tree.model.named_modules()
                if isinstance(m, _BatchNorm) and batch_norm_extras(m) is not None and self.selects(name)]

    def _measure(self) -> None:
        """One eval forward of the model, with :meth:`observers` attached."""
        found = self.observers(self.tree)
        if found.hooks or found.after_node:
            forwards = [(gm, watched_forward(gm, after)) for gm, after in found.after_node]
            probe_forward(self.tree.model, self.example_inputs, hooks=found.hooks, forwards=forwards,
                          kwargs=self.example_kwargs)

    def begin(self) -> None:
        """Measure the drift of every swap, unless this rewrite's shape forward did.

        Measured again when an earlier pass added a BatchNorm the shape forward did not watch
        (a residual shortcut's).
        """
        self.state.gone = set()  # ids of modules replaced in this run
        self.state.homes = _other_homes(self.tree.model) if self.tree is not None else {}
        if not hasattr(self.state, "seen"):
            self.state.seen, self.state.watched = {}, set()
        if self.tree is not None and any(id(m) not in self.state.watched for m in self._batch_norms(self.tree)):
            self._measure()

    # -- keeping the region tree right -------------------------------------------------------
    def _replace_region(self, old: nn.Module, new_region: Region | None) -> None:
        """Drop the region of a replaced module; its child regions go to ``new_region`` or its parent."""
        self.state.gone.add(id(old))
        top = self.tree.root if self.tree is not None else self.region
        for parent in top.walk() if top is not None else ():
            for i, child in enumerate(parent.children):
                if child.module is old:
                    if new_region is None:
                        parent.children[i : i + 1] = child.children
                    else:
                        new_region.children = child.children
                        parent.children[i] = new_region
                    return

    # -- traced regions ----------------------------------------------------------------------
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Swap the BatchNorm modules and functional batch norms of one traced region."""
        gm = graph_module
        by_target: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(submodule(gm, node.target), _BatchNorm):
                by_target.setdefault(str(node.target), []).append(node)
        self._note_uncalled(gm, by_target)
        swapped = [self._swap_module(gm, target, nodes) for target, nodes in by_target.items()]
        # A module swapped in place leaves the graph (and its code) as it was: no recompile.
        edited = any(isinstance(new, NormAct) for new in swapped)
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _ARGS:
                edited |= self._swap_function(gm, node)
        if edited:
            gm.graph.lint()
            compile_when_called(gm)
        return PassResult(gm, edited or any(new is not None for new in swapped))

    def _note_uncalled(self, gm: fx.GraphModule, called: dict) -> None:
        """Say which BatchNorms of this graph's own modules its graph never calls (left alone)."""
        leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        for path, module in gm.named_modules():
            if not isinstance(module, _BatchNorm) or path in called or not self.selects(self.qualify(path)):
                continue
            owner = path.rpartition(".")[0]
            # Inside a module the graph calls as a whole: that module's own region handles it.
            if not any(owner == leaf or owner.startswith(leaf + ".") for leaf in leaves):
                self.notes.append(f"{self.qualify(path)}: never called by the traced graph of "
                                  f"{self.prefix or '<root>'} on the example inputs; left alone")

    def _swap_module(self, gm: fx.GraphModule, target: str, nodes: list[fx.Node]) -> nn.Module | None:
        """Swap the BatchNorm module at ``target``; its replacement, or None when left alone."""
        bn, (parent, _, leaf) = submodule(gm, target), target.rpartition(".")
        inputs = [n.args[0] if n.args else n.kwargs.get("input") for n in nodes]
        shapes = [getattr(tensor_meta(x), "shape", None) if isinstance(x, fx.Node) else None for x in inputs]
        new = self._swap(bn, self.qualify(target), shapes, lambda m: setattr(submodule(gm, parent), leaf, m))
        if new is None:
            return None
        # Call norm, drop and act from the graph, so later passes see them; a NormAct holding the
        # user's hooks is called as a whole, so that they fire.
        if isinstance(new, NormAct) and not hook_kinds(new):
            for node in nodes:
                _expand_norm_act(gm, node, target, new)
        self._replace_region(bn, None)
        return new

    def _swap_function(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        where = node_where(self.prefix, node)
        if not self.selects(where):
            return False
        a = _bn_args(node.target, node.args, node.kwargs)
        x, w, b, eps = a["input"], a["weight"], a["bias"], a["eps"]
        if not isinstance(x, fx.Node) or not any(n.op == "placeholder" for n in ancestors(x)):
            # Weight standardisation (timm StdConv2d, ScaledStdConv2d): not a normalisation of activations.
            self.notes.append(f"{where}: batch_norm of a value computed from parameters only (weight "
                              "standardisation), not of activations; left alone")
            return False
        meta = tensor_meta(x) if isinstance(x, fx.Node) else None
        shape = list(meta.shape) if meta is not None else self.state.seen.get((id(gm), node.name), {}).get("shape")
        if not shape or not isinstance(eps, (int, float)):
            self.notes.append(f"{where}: batch_norm input layout or eps unknown; left alone")
            return False
        g, rank, c = gm.graph, len(shape), shape[1]
        with g.inserting_before(node):
            if rank == 2:
                made = [g.call_function(F.layer_norm, (x, (c,), w, b, eps))]
                desc = "layer_norm"
            elif self.over == "chw":
                made = [g.call_function(F.group_norm, (x, 1, w, b, eps))]
                desc = "group_norm(1)"
            else:  # channels last, LayerNorm over C, back: exports as LayerNormalization
                made = [g.call_method("transpose", (x, 1, -1))]
                made.append(g.call_function(F.layer_norm, (made[0], (c,), w, b, eps)))
                made.append(g.call_method("transpose", (made[1], 1, -1)))
                desc = "channel layer_norm"
        for n in made:  # same owner as the call they replace (later passes name nodes by it)
            if "nn_module_stack" in node.meta:
                n.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        if len(made) == 3 and meta is not None:  # channels last in between
            made[0].meta["tensor_meta"] = made[1].meta["tensor_meta"] = transposed_meta(meta, 1, -1)
        copy_output_meta(node, made[-1])
        new = made[-1]
        node.replace_all_uses_with(new)
        g.erase_node(node)
        dropped = self._drop_statistics(gm, [a["running_mean"], a["running_var"]])
        copied = [self.qualify(str(p.target)) for p in (w, b) if isinstance(p, fx.Node) and p.op == "get_attr"]
        details = {"from": "batch_norm", "to": desc, "shape": shape, "over": self.over}
        details.update(drift=self._drift((id(gm), node.name)), drift_sampled=self._drift_sampled((id(gm), node.name)),
                       dropped=dropped)
        self.record(where, "replaced", f"batch_norm -> {desc}", copied_params=copied, details=details)
        return True

    def _drop_statistics(self, gm: fx.GraphModule, stats: list) -> list[str]:
        """Delete running-statistics buffers nothing reads any more; their qualified names."""
        dropped = []
        for n in stats:
            if not (isinstance(n, fx.Node) and n.op == "get_attr" and not n.users):
                continue
            gm.graph.erase_node(n)
            owner_path, _, attr = str(n.target).rpartition(".")
            owner = submodule(gm, owner_path)
            for name in (attr, "num_batches_tracked"):
                target = f"{owner_path}.{name}" if owner_path else name
                still_read = any(m.op == "get_attr" and m.target == target for m in gm.graph.nodes)
                if name in owner._buffers and not still_read:
                    delattr(owner, name)
                    dropped.append(self.qualify(target))
        return dropped

    # -- opaque regions ----------------------------------------------------------------------
    def call_opaque(self, region: Region) -> bool:
        """Swap BatchNorm children (built-in or known subclasses) of an opaque module."""
        if id(region.module) in self.state.gone:
            return False  # replaced from its parent already
        if isinstance(region.module, _BatchNorm) and not region.path:
            self.notes.append("<root>: the model itself is a BatchNorm; wrap it in a module to swap it")
        modified = False
        module = region.module
        children = [c for name, child in module.named_children() for c in expand_containers(module, name, child)]
        for name, bn, container in children:
            if not isinstance(bn, _BatchNorm):
                continue
            where, leaf = region.qualify(name), name.rpartition(".")[2]
            shape = region.leaf_info.get(name, {}).get("shape")
            new = self._swap(bn, where, [shape], lambda m: setattr(container, leaf, m))
            if new is None:
                continue
            if not is_builtin_module(new):
                region.leaf_info.pop(name, None)  # leaf_info describes built-in children only
            # A NormAct keeps its act reachable by later passes, as an opaque region of its own.
            built = None
            if isinstance(new, NormAct):
                built = Region(where, "opaque", new, "built by bn_to_ln (norm, drop, act)")
                self.stale_shapes = True  # nothing recorded what its parts see
            self._replace_region(bn, built)
            if built is not None and not any(r.module is new for r in region.walk()):
                region.children.append(built)
            modified = True
        return modified
