"""Residual shortcuts around named blocks or graph spans: ``H(x) = act(F(x) + α·S(x))``.

Blocks are named by qualified-name globs matched one path segment at a time (``*`` and ``?``
stop at dots, ``**`` crosses them): ``stages.*`` names the stages, not every layer inside
them. A block must take one tensor and return one. The shortcut is chosen from the shapes
recorded on the example inputs (:func:`~graphtricks.layers.residual.choose_shortcut`), and
every selected block and span is validated before anything is edited.

Wherever the block lives, it becomes ``body`` of a :class:`~graphtricks.layers.residual.Residual`
at its old path, so its state-dict keys gain ``body.`` (``stages.1.0.weight`` →
``stages.1.body.0.weight``) beside the new ``stages.1.shortcut.*`` and ``stages.1.gate``.
Inside a traced region the block's nodes stay in the graph (retargeted to ``body``) and the
shortcut, gate, sum and ReLU are added as nodes, so later passes see them; a child of an
opaque module is replaced by the wrapper itself. A span ``FIRST:LAST`` (node names;
``REGION/FIRST:LAST`` when the names occur in several regions) takes its parts from a
:class:`~graphtricks.layers.residual.ResidualSpan` at ``residual_FIRST_LAST``.
"""

from __future__ import annotations

import itertools
import operator
import re
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from graphtricks.activations import ACTIVATION_FUNCTIONS
from graphtricks.capture import CONTAINERS, Region, RegionTree
from graphtricks.errors import PassError
from graphtricks.graph import unique_attr_name
from graphtricks.layers.residual import (
    GATES,
    MARKER,
    POST_ACTS,
    SHORTCUTS,
    Residual,
    ResidualSpan,
    choose_shortcut,
    make_shortcut,
)
from graphtricks.modes import ModeSnapshot
from graphtricks.passes.base import GraphtricksPass, register_pass
from graphtricks.shapes import tensor_meta

__all__ = ["REGISTRY", "AddResidual", "add_residual", "candidate_blocks"]

_SPAN = re.compile(r"(?:(?P<region>[^/:]+)/)?(?P<first>[^/:]+):(?P<last>[^/:]+)")
# A re-traced region rebuilds containers as plain modules (the Residual class is gone), so
# each graph module also lists what it wrapped, as an attribute that capture carries over.
REGISTRY = "gt_residual_wrapped"
_PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY
_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "setitem"}
_BLOCK_RULE = "a residual block must take one tensor and return one"


@dataclass
class _Item:
    """One planned wrap: a block (by qualified name) or a span, with its shapes and shortcut."""

    where: str
    local: str  # the block's path inside its host region, or "FIRST:LAST"
    module: nn.Module | None = None
    in_shape: tuple = ()
    out_shape: tuple = ()
    dtypes: tuple = (None, None)
    nodes: set = field(default_factory=set)
    kind: str = ""
    stride: tuple = ()


@register_pass
class AddResidual(GraphtricksPass):
    """Wrap blocks (or graph spans) with a residual shortcut.

    Args:
        blocks: qualified-name globs of submodules to wrap (``stages.*``, ``layer?.0``).
        spans: ``FIRST:LAST`` node-name spans of a traced region (``REGION/FIRST:LAST``).
        shortcut: ``auto`` (identity / pad / conv from the shapes), ``identity``, ``pad`` or ``conv``.
        shortcut_norm: BatchNorm after a conv shortcut.
        post_act: ``none`` or ``relu`` (after the sum).
        gate: ``none`` or ``zero`` (``H = F + α·S``, α a learnable scalar starting at 0).
        include: fnmatch globs a block's qualified name must match; empty = all.
        exclude: fnmatch globs of blocks never wrapped.

    Raises:
        PassError: an unknown option value, or a malformed span.

    Example:
        >>> result = gt.rewrite(model, [AddResidual(["stages.*"], gate="zero")], example_inputs=(x,))
    """

    name = "residual"
    preserves_eval = False
    invalidates_shapes = True

    def __init__(self, blocks=(), *, spans=(), shortcut="auto", shortcut_norm=False, post_act="none", gate="none",
                 include=(), exclude=()):
        super().__init__(include=include, exclude=exclude)
        self.blocks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
        self.spans = (spans,) if isinstance(spans, str) else tuple(spans)
        for pattern in self.blocks:
            if not isinstance(pattern, str) or not pattern.strip():
                raise PassError(f"residual: block patterns must be non-empty strings, got {pattern!r}")
        for span in self.spans:
            if not isinstance(span, str) or not _SPAN.fullmatch(span):
                raise PassError(f"residual: span {span!r} is not FIRST:LAST (graph node names, or REGION/FIRST:LAST)")
        for option, value, allowed in (("shortcut", shortcut, SHORTCUTS), ("post_act", post_act, POST_ACTS),
                                       ("gate", gate, GATES)):
            if value not in allowed:
                raise PassError(f"residual: unknown {option} {value!r}; choose one of {', '.join(allowed)}")
        if shortcut_norm and shortcut in ("identity", "pad"):
            raise PassError(f"residual: shortcut_norm applies to conv shortcuts, not shortcut={shortcut!r}")
        self.shortcut, self.shortcut_norm, self.post_act, self.gate = shortcut, bool(shortcut_norm), post_act, gate
        # Per instance: with a zero gate and nothing after the sum, H = F exactly until α moves.
        self.preserves_eval = gate == "zero" and post_act == "none"
        self._plan: tuple | None = None

    def options(self) -> dict:
        out = {"blocks": list(self.blocks), "shortcut": self.shortcut, "shortcut_norm": self.shortcut_norm}
        if self.spans:
            out["spans"] = list(self.spans)
        return {**out, "post_act": self.post_act, "gate": self.gate}

    def skip_reason(self) -> str | None:
        return None if self.blocks or self.spans else "residual: no blocks or spans named; nothing to wrap"

    # -- planning: everything is validated before the first edit ------------------------
    def _planned(self, module: nn.Module) -> list[_Item]:
        """The wraps planned for the region whose module is ``module`` (planned once per tree)."""
        if self.tree is None:  # called on one graph module, outside ``rewrite``
            return self._make_plan(RegionTree(module, Region("", "traced", module))).get(id(module), [])
        if self._plan is None or self._plan[0]() is not self.tree:
            self._plan = (weakref.ref(self.tree), self._make_plan(self.tree))
        return self._plan[1].pop(id(module), [])

    def _make_plan(self, tree: RegionTree) -> dict[int, list[_Item]]:
        regions = tree.regions()
        for region in regions:
            if region.kind == "traced":
                _register(region.graph_module)  # a re-captured graph has the list, but not deepcopy-safe
        plan: dict[int, list[_Item]] = {}
        measured: list[_Item] = []
        for q in self._select(tree.model, regions):
            host = max((r for r in regions if r.path != q and (not r.path or q.startswith(r.path + "."))),
                       key=lambda r: len(r.path))
            local = q[len(host.path) + 1 :] if host.path else q
            if host.kind == "traced":
                item = _traced_block(host.module, local, q)
            else:
                item = _Item(q, local, _opaque_child(host, local, q))
                measured.append(item)
            plan.setdefault(id(host.module), []).append(item)
        seen = _measure(tree.model, self.example_inputs, [i.module for i in measured]) if measured else {}
        for item in measured:
            reason = _apply_measured(item, seen.get(id(item.module)))
            if reason:
                raise PassError(f"residual: {item.where} {reason}")
        for span in self.spans:
            found = _span_item(regions, span)
            if found is None:
                self.notes.append(f"span {span}: already has a residual shortcut; left alone")
                continue
            host, item = found
            taken = [i for i in plan.get(id(host.module), []) if i.nodes & item.nodes]
            if taken:
                raise PassError(f"residual: span {span} overlaps {taken[0].where}; wrap one of them")
            plan.setdefault(id(host.module), []).append(item)
        for item in itertools.chain(*plan.values()):
            try:
                item.kind, item.stride = choose_shortcut(self.shortcut, item.in_shape, item.out_shape, *item.dtypes)
            except ValueError as e:
                ins, outs = _fmt(item.in_shape, item.dtypes[0]), _fmt(item.out_shape, item.dtypes[1])
                shapes = f"input {ins} → output {outs}"
                raise PassError(f"residual: no {self.shortcut} shortcut fits {item.where}: {shapes}: {e}") from None
        return plan

    def _select(self, model: nn.Module, regions: list[Region]) -> list[str]:
        """Qualified names matched by ``blocks``, minus wrapped ones and graphtricks' own parts."""
        names = [name for name, _ in model.named_modules() if name]
        for region in (r for r in regions if r.kind == "traced"):
            # Parameter-free blocks inlined in a trace exist only as paths in the module stacks.
            names += map(region.qualify, _stack_types(region.graph_module.graph))
        names = list(dict.fromkeys(names))
        chosen: dict[str, None] = {}
        for pattern in self.blocks:
            regex = _glob(pattern)
            hits = [name for name in names if regex.fullmatch(name)]
            if not hits:
                self.notes.append(f"block pattern {pattern!r} matched no module")
            chosen.update(dict.fromkeys(hits))
        wrapped, own = _wrapped_names(model)
        out = []
        for name in chosen:
            above = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
            if name in wrapped or (name.endswith(".body") and name[: -len(".body")] in wrapped):
                self.notes.append(f"{name}: already has a residual shortcut; left alone")
            elif name in own or any(a in own or (a in wrapped and not name.startswith(a + ".body.")) for a in above):
                continue  # a shortcut, gate or span part that graphtricks added
            elif self.selects(name):
                out.append(name)
        for name in out:
            outer = next((a for a in out if name.startswith(a + ".")), None)
            if outer is not None:
                raise PassError(f"residual: blocks {outer} and {name} are nested; select one of them")
        return out

    # -- editing ----------------------------------------------------------------------
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Wrap the planned blocks and spans of one traced region."""
        gm = graph_module
        items = self._planned(gm)
        for item in items:
            (self._wrap_span if ":" in item.local else self._wrap_traced)(gm, item)
        if items:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(items))

    def _wrap_traced(self, gm: fx.GraphModule, item: _Item) -> None:
        local = item.local
        nodes = _block_nodes(gm.graph, local)  # found again: an earlier wrap may now feed its input
        entry, exit_ = _single_io(nodes, item.where)
        outer = _outer_stack(exit_, local)
        block = _submodule(gm, local) or nn.Module()  # a parameter-free inlined block has no module left
        wrapper = self._wrapper(item, block)
        gm.add_submodule(local, wrapper)  # replaces the block at the same position in its parent
        _retarget(gm.graph, local, f"{local}.body")
        _register(gm, local, "block")
        self._rename_regions(item.where, f"{item.where}.body")
        _emit(gm, entry, exit_, set(nodes), local, wrapper, {**outer, local: (local, Residual)})
        self._record(item, wrapper, block, item.where)

    def _wrap_span(self, gm: fx.GraphModule, item: _Item) -> None:
        first, last = item.local.split(":")
        nodes = _span_nodes(gm.graph, first, last, item.where)
        entry, exit_ = _single_io(nodes, item.where)
        device = _device(gm, self.example_inputs)
        parts = ResidualSpan(self._shortcut(item, device), span=item.local, gate=self.gate, post_act=self.post_act,
                             dtype=_float(item.dtypes[0]), device=device)
        path = unique_attr_name(gm, "", f"residual_{first}_{last}")
        gm.add_submodule(path, parts)
        _register(gm, path, parts.gt_residual)
        _emit(gm, entry, exit_, set(nodes), path, parts, {path: (path, ResidualSpan)})
        self._record(item, parts, None, self.qualify(path))

    def call_opaque(self, region: Region) -> bool:
        """Replace the planned children of an opaque module with ``Residual`` wrappers."""
        items = self._planned(region.module)
        for item in items:
            container_path, _, leaf = item.local.rpartition(".")
            container = region.module.get_submodule(container_path) if container_path else region.module
            child = container._modules[leaf]
            wrapper = self._wrapper(item, child)
            setattr(container, leaf, wrapper)
            self._rename_regions(item.where, f"{item.where}.body")
            # The wrapper runs its own forward: an opaque region, with the body's region below it.
            below = [r for r in region.children if r.module is child]
            if isinstance(wrapper.shortcut, nn.Sequential):
                below.append(Region(f"{item.where}.shortcut", "opaque", wrapper.shortcut, "a Sequential in a wrapper"))
            at = next((i for i, r in enumerate(region.children) if r.module is child), len(region.children))
            region.children[at : at + 1] = [Region(item.where, "opaque", wrapper, "residual wrapper", below)]
            self._record(item, wrapper, child, item.where)
        return bool(items)

    def _shortcut(self, item: _Item, device: torch.device) -> nn.Module:
        return make_shortcut(item.kind, item.in_shape, item.out_shape, item.stride, norm=self.shortcut_norm,
                             dtype=item.dtypes[0], device=device, seed_name=item.where)

    def _wrapper(self, item: _Item, block: nn.Module) -> Residual:
        device = _device(block, self.example_inputs)
        wrapper = Residual(block, self._shortcut(item, device), gate=self.gate, post_act=self.post_act,
                           dtype=_float(item.dtypes[0]), device=device)
        return wrapper.train(block.training)

    def _rename_regions(self, old: str, new: str) -> None:
        """Regions at or below a wrapped block now sit under its ``body``."""
        for region in self.tree.regions() if self.tree is not None else ():
            if region.path == old or region.path.startswith(old + "."):
                region.path = new + region.path[len(old) :]

    def _record(self, item: _Item, parts: nn.Module, block: nn.Module | None, at: str) -> None:
        desc = {"identity": "identity", "pad": "zero-pad", "conv": "1x1 conv" if len(item.in_shape) > 2 else "linear"}
        what = desc[item.kind] + (" + BatchNorm" if item.kind == "conv" and self.shortcut_norm else "")
        what += f" /{'x'.join(map(str, item.stride))}" if any(s > 1 for s in item.stride) else ""
        what += (", gate α=0" if self.gate == "zero" else "") + (", ReLU after sum" if self.post_act == "relu" else "")
        details = {"shortcut": item.kind, "stride": list(item.stride), "in_shape": list(item.in_shape),
                   "out_shape": list(item.out_shape), "norm": item.kind == "conv" and self.shortcut_norm,
                   "gate": self.gate, "post_act": self.post_act, "module": at}
        if item.kind == "conv":
            details["init"] = "kaiming_normal_(fan_out, relu)"
        if block is not None:
            details["keys"] = f"{item.where}.* -> {item.where}.body.*"
        self.record(
            item.where, "wrapped", f"residual: {what} shortcut, {_fmt(item.in_shape)} -> {_fmt(item.out_shape)}",
            new_params=[f"{at}.{n}" for n, _ in parts.named_parameters() if not n.startswith("body.")],
            copied_params=[f"{at}.body.{n}" for n, _ in block.named_parameters()] if block is not None else [],
            details=details,
        )


# -- selection and markers -------------------------------------------------------------
def _glob(pattern: str) -> re.Pattern:
    """A qualified-name glob matched by segment: ``*``/``?`` stop at dots, ``**`` crosses them."""
    out, i = [], 0
    while i < len(pattern):
        end = pattern.find("]", i + 2) if pattern[i] == "[" else -1
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif end > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append({"*": r"[^.]*", "?": r"[^.]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out))


def _wrapped_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Model-level names of wrapped blocks, and of the span parts graphtricks added."""
    blocks, own = set(), set()
    for path, module in model.named_modules():
        marker = getattr(module, MARKER, None)
        if marker is None and isinstance(module, fx.GraphModule) and type(module).__name__ == "Residual":
            marker = "block" if "body" in module._modules else None  # a captured wrapper a deepcopy stripped
        if marker:
            (blocks if marker == "block" else own).add(path)
        for local, kind in (getattr(module, REGISTRY, None) or {}).items():
            (blocks if kind == "block" else own).add(f"{path}.{local}" if path else local)
    return blocks, own


def _register(gm: fx.GraphModule, local: str | None = None, kind: str = "block") -> None:
    """List ``local`` as wrapped on ``gm`` (entries below it move under ``body``).

    The list, and a captured wrapper's marker, are also put in ``gm.meta[_PRESERVED]``: the
    only attributes ``copy.deepcopy`` of a GraphModule keeps (``rewrite`` copies its model).
    """
    listed = getattr(gm, REGISTRY, None) or {}
    if local is not None:
        listed = {(f"{local}.body{k[len(local):]}" if k.startswith(local + ".") else k): v for k, v in listed.items()}
        setattr(gm, REGISTRY, {**listed, local: kind})  # a new dict: a re-captured copy may share the old one
    for attr in (REGISTRY, MARKER):
        if getattr(gm, attr, None):
            gm.meta.setdefault(_PRESERVED, {})[attr] = getattr(gm, attr)


# -- graph helpers ---------------------------------------------------------------------
def _stack_types(graph: fx.Graph) -> dict[str, type]:
    """Original module types by path, from the module stacks (a trace keeps containers as plain modules)."""
    stacks = (n.meta.get("nn_module_stack") or {} for n in graph.nodes)
    return {v[0]: v[1] for stack in stacks for v in stack.values() if isinstance(v[1], type)}


def _block_nodes(graph: fx.Graph, path: str) -> list[fx.Node]:
    """Nodes a block (relative path) computes: a leaf's call, or an inlined block's nodes."""
    return [
        n for n in graph.nodes
        if n.op not in ("placeholder", "output")
        and ((n.op == "call_module" and n.target == path)
             or any(v[0] == path for v in (n.meta.get("nn_module_stack") or {}).values()))
    ]


def _single_io(nodes: list[fx.Node], where: str) -> tuple[fx.Node, fx.Node]:
    """The one outside value the nodes read and the one value read outside them, or PassError."""
    inside = set(nodes)
    entries = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside and a.op != "get_attr"))
    exits = [n for n in nodes if n.op != "get_attr" and any(u not in inside for u in n.users)]
    if len(entries) != 1 or len(exits) != 1:
        got = f"takes {len(entries)} inputs" if len(entries) != 1 else f"returns {len(exits)} values"
        raise PassError(f"residual: {where} {got}; {_BLOCK_RULE}")
    for node, role in ((entries[0], "input"), (exits[0], "output")):
        if tensor_meta(node) is None:
            raise PassError(f"residual: {where} has no recorded tensor {role} ({node.name}); {_BLOCK_RULE}")
    return entries[0], exits[0]


def _mutates(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when ``node`` writes into its first input (``inplace=True``, ``relu_``, ``+=``, ``x[i] = v``)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    positional = node.target in ACTIVATION_FUNCTIONS and len(node.args) > 1 and node.args[-1] is True
    trailing = name.endswith("_") and not name.endswith("__")
    return trailing or name in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True or positional


def _check_inplace(gm: fx.GraphModule, nodes: list[fx.Node], entry: fx.Node, where: str) -> None:
    for n in nodes:
        if entry in n.all_input_nodes and _mutates(n, gm):
            raise PassError(f"residual: {where} modifies its input in place ({n.format_node()}); the shortcut needs"
                            " the unmodified input: make that step out-of-place (e.g. inplace=False)")


def _traced_block(gm: fx.GraphModule, local: str, where: str) -> _Item:
    nodes = _block_nodes(gm.graph, local)
    if not nodes:
        raise PassError(f"residual: {where} does not run as a step of its traced graph (inside a built-in layer,"
                        " or not called on the example inputs); name its parent or a --residual-span")
    calls = sum(n.op == "call_module" and n.target == local for n in nodes)
    if calls > 1:
        raise PassError(f"residual: {where} is called {calls} times; a shared module cannot be wrapped")
    entry, exit_ = _single_io(nodes, where)
    _check_inplace(gm, nodes, entry, where)
    a, b = tensor_meta(entry), tensor_meta(exit_)
    return _Item(where, local, _submodule(gm, local), tuple(a.shape), tuple(b.shape), (a.dtype, b.dtype), set(nodes))


def _span_nodes(graph: fx.Graph, first: str, last: str, where: str) -> list[fx.Node]:
    """The nodes from ``first`` to ``last`` that ``last`` depends on, in graph order."""
    by_name = {n.name: n for n in graph.nodes}
    f, l = by_name[first], by_name[last]
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(n.op in ("placeholder", "output", "get_attr") for n in (f, l)) or order[f] > order[l]:
        raise PassError(f"residual: span {where} must run from an operation to a later one")
    seen, todo = set(), [l]
    while todo:
        n = todo.pop()
        if n not in seen and order[n] >= order[f] and n.op != "placeholder":
            seen.add(n)
            todo.extend(n.all_input_nodes)
    if f not in seen:
        raise PassError(f"residual: span {where}: {last} does not depend on {first}")
    return [n for n in graph.nodes if n in seen]


def _span_item(regions: list[Region], span: str) -> tuple[Region, _Item] | None:
    """Resolve a span to its region and nodes (None when it is already wrapped)."""
    m = _SPAN.fullmatch(span)
    first, last, want = m["first"], m["last"], m["region"]
    traced = [r for r in regions if r.kind == "traced" and (want is None or r.path == want)]
    if any(f"span {first}:{last}" in (getattr(r.module, REGISTRY, None) or {}).values() for r in traced):
        return None
    hosts = [r for r in traced if {first, last} <= {n.name for n in r.module.graph.nodes}]
    if len(hosts) != 1:
        paths = ", ".join(r.path or "<root>" for r in hosts)
        where = f"several traced regions ({paths}); write REGION/FIRST:LAST" if hosts else "no traced region"
        raise PassError(f"residual: span {span}: nodes {first} and {last} are in {where}")
    gm, label = hosts[0].module, f"{hosts[0].path}/{first}:{last}" if hosts[0].path else f"{first}:{last}"
    nodes = _span_nodes(gm.graph, first, last, label)
    entry, exit_ = _single_io(nodes, f"span {label}")
    if exit_.name != last:
        raise PassError(f"residual: span {label}: {exit_.name} is used after the span; end the span there")
    _check_inplace(gm, nodes, entry, f"span {label}")
    a, b = tensor_meta(entry), tensor_meta(exit_)
    item = _Item(label, f"{first}:{last}", None, tuple(a.shape), tuple(b.shape), (a.dtype, b.dtype), set(nodes))
    return hosts[0], item


def _outer_stack(node: fx.Node, path: str) -> dict:
    """``node``'s module stack above ``path`` (the callers of the block)."""
    stack = node.meta.get("nn_module_stack") or {}
    return dict(itertools.takewhile(lambda kv: kv[1][0] != path, stack.items()))


def _retarget(graph: fx.Graph, old: str, new: str) -> None:
    """Point every node at ``old`` (and below) to ``new``; module stacks gain the wrapper."""

    def moved(path: str) -> str | None:
        return new + path[len(old) :] if path == old or path.startswith(old + ".") else None

    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and moved(str(n.target)):
            n.target = moved(str(n.target))
        stack = n.meta.get("nn_module_stack") or {}
        if any(moved(v[0]) for v in stack.values()):
            fresh = {}
            for key, value in stack.items():
                if moved(value[0]) is None:
                    fresh[key] = value
                    continue
                fresh.setdefault(old, (old, Residual))
                fresh[moved(value[0])] = (moved(value[0]), *value[1:])
            n.meta["nn_module_stack"] = fresh


def _emit(gm: fx.GraphModule, entry, exit_, inside: set, path: str, parts: nn.Module, stack: dict) -> None:
    """Add ``act(exit + α·S(entry))`` after ``exit`` and route the block's users through it."""
    graph, new, cur = gm.graph, [], exit_

    def add(op, target, args, *own):
        nonlocal cur
        with graph.inserting_after(cur):
            cur = graph.create_node(op, target, args)
        cur.meta["nn_module_stack"] = {**stack, **{p: (p, t) for p, t in own}}
        if op != "get_attr":
            cur.meta["tensor_meta"] = exit_.meta["tensor_meta"]
        new.append(cur)
        return cur

    s, short = entry, f"{path}.shortcut"
    if isinstance(parts.shortcut, nn.Sequential):  # one node per layer: later passes see the BatchNorm
        for i, sub in enumerate(parts.shortcut):
            s = add("call_module", f"{short}.{i}", (s,), (short, nn.Sequential), (f"{short}.{i}", type(sub)))
    elif not isinstance(parts.shortcut, nn.Identity):
        s = add("call_module", short, (s,), (short, type(parts.shortcut)))
    if parts.gate is not None:
        s = add("call_function", operator.mul, (add("get_attr", f"{path}.gate", ()), s))
    out = add("call_function", operator.add, (exit_, s))
    if parts.post_act == "relu":
        out = add("call_function", torch.relu, (out,))
    exit_.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inside and user not in new)
    if exit_.meta.pop("gt_model_output", None):
        out.meta["gt_model_output"] = True


# -- small helpers and opaque children --------------------------------------------------
def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _fmt(shape, dtype: torch.dtype | None = None) -> str:
    text = "x".join(str(int(d)) for d in shape)
    return f"{text} {str(dtype).replace('torch.', '')}" if dtype is not None else text


def _float(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype for a gate: the activations' when floating point (an integer α cannot learn)."""
    return dtype if dtype is not None and dtype.is_floating_point else None


def _device(module: nn.Module, inputs: tuple = ()) -> torch.device:
    tensors = itertools.chain(module.parameters(), module.buffers(), (i for i in inputs if isinstance(i, torch.Tensor)))
    return next((t.device for t in tensors), torch.device("cpu"))


def _opaque_child(host: Region, local: str, where: str) -> nn.Module:
    """The child ``local`` of an opaque module (through ModuleList/ModuleDict), or PassError."""
    module, parts = host.module, local.split(".")
    for i, part in enumerate(parts[:-1]):
        module = module._modules[part]
        if not isinstance(module, CONTAINERS):
            inside = host.qualify(".".join(parts[: i + 1]))
            raise PassError(f"residual: {where} sits inside {type(module).__name__} {inside}, which graphtricks"
                            " does not open; name that module instead")
    return module._modules[parts[-1]]


def _measure(model: nn.Module, inputs: tuple, modules: list[nn.Module]) -> dict[int, dict]:
    """Run the model once (eval, no grad); per module: its first call's shapes, or why it is no block."""
    seen: dict[int, dict] = {}

    def pre(mod, args, kwargs):
        if id(mod) not in seen:
            x = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
            seen[id(mod)] = {"x": x, "n": len(args) + len(kwargs), "version": x._version if x is not None else 0}

    def post(mod, args, kwargs, output):
        info = seen[id(mod)]
        if "error" in info:
            return
        x = info.pop("x")
        if x is None or not isinstance(output, torch.Tensor):
            got = f"takes {info['n']} arguments" if x is None else f"returns a {type(output).__name__}"
            info["error"] = f"{got}; {_BLOCK_RULE}"
        elif x._version != info["version"]:  # the version counter moves on every in-place write, views too
            info["error"] = "modifies its input in place; the shortcut needs the unmodified input: make it out-of-place"
        else:
            info.update(error="", shapes=(tuple(x.shape), tuple(output.shape)), dtypes=(x.dtype, output.dtype))

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in modules]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in modules]
    snapshot = ModeSnapshot(model)
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        snapshot.restore()
        for h in handles:
            h.remove()
    return seen


def _apply_measured(item: _Item, info: dict | None) -> str:
    """Fill an item's shapes from :func:`_measure`; returns why it cannot be wrapped, or ""."""
    if info is None:
        return "did not run on the example inputs; it cannot be measured or wrapped"
    if not info.get("error"):
        (item.in_shape, item.out_shape), item.dtypes = info["shapes"], info["dtypes"]
    return info.get("error", "")


def candidate_blocks(tree: RegionTree, example_inputs: tuple = ()) -> list[dict]:
    """Children of ``nn.Sequential`` containers that take one tensor and return one, with shapes.

    Reads the shapes recorded by the rewrite; children of a Sequential kept opaque are listed
    only when ``example_inputs`` are given (they are measured by one eval forward).

    Args:
        tree: a captured region tree with shapes (``rewrite(model, [], x).tree``).
        example_inputs: the model's inputs, to measure Sequentials inside opaque modules.

    Returns:
        ``[{"name", "type", "input_shape", "output_shape", "dtype", "shortcut", "wrapped"}]``;
        ``shortcut`` is what ``auto`` would choose, or None when no shortcut fits.

    Example:
        >>> [b["name"] for b in candidate_blocks(gt.rewrite(PlainVGG(), [], x).tree)][:4]
        ['stem.0', 'stem.1', 'stem.2', 'stages.0']
    """
    found: list[tuple[_Item, str]] = []
    measured: list[_Item] = []
    for region in tree.regions():
        if region.kind == "traced":
            gm = region.graph_module
            types = _stack_types(gm.graph)
            seqs = {p for p, t in types.items() if issubclass(t, nn.Sequential)}
            seqs |= {""} if type(gm).__name__ == "Sequential" else set()
            for local in (p for p in types if p.rpartition(".")[0] in seqs):
                nodes = _block_nodes(gm.graph, local)
                try:
                    entry, exit_ = _single_io(nodes, local)
                    _check_inplace(gm, nodes, entry, local)
                except PassError:
                    continue
                a, b = tensor_meta(entry), tensor_meta(exit_)
                item = _Item(region.qualify(local), local, None, tuple(a.shape), tuple(b.shape), (a.dtype, b.dtype))
                found.append((item, types[local].__name__))
        elif isinstance(region.module, nn.Sequential) and example_inputs:
            measured += [_Item(region.qualify(n), n, c) for n, c in region.module.named_children()]
    seen = _measure(tree.model, tuple(example_inputs), [i.module for i in measured]) if measured else {}
    found += [(i, type(i.module).__name__) for i in measured if not _apply_measured(i, seen.get(id(i.module)))]
    wrapped, _ = _wrapped_names(tree.model)
    out = []
    for item, type_name in found:
        try:
            kind = choose_shortcut("auto", item.in_shape, item.out_shape, *item.dtypes)[0]
        except ValueError:
            kind = None
        out.append({"name": item.where, "type": type_name, "input_shape": list(item.in_shape),
                    "output_shape": list(item.out_shape), "dtype": str(item.dtypes[1]).replace("torch.", ""),
                    "shortcut": kind, "wrapped": item.where in wrapped})
    return out


def add_residual(model, example_inputs, blocks=(), *, inplace: bool = False, **kwargs):
    """Functional twin of :class:`AddResidual`: rewrite ``model`` and return the result.

    Args:
        model: the ``nn.Module`` to rewrite.
        example_inputs: positional inputs, used for capture and shapes.
        blocks: qualified-name globs of the blocks to wrap.
        inplace: edit ``model`` itself instead of a copy.
        **kwargs: ``spans``, ``shortcut``, ``shortcut_norm``, ``post_act``, ``gate``, ``include``, ``exclude``.

    Returns:
        A :class:`~graphtricks.rewrite.RewriteResult` (``.model``, ``.report``).

    Raises:
        PassError: a block cannot be wrapped (the message names it and its shapes); nothing is changed.

    Example:
        >>> result = add_residual(model, (torch.randn(8, 3, 32, 32),), ["stages.*"], shortcut="pad")
    """
    from graphtricks.rewrite import rewrite

    return rewrite(model, [AddResidual(blocks, **kwargs)], example_inputs, inplace=inplace)
