"""Blocks: the parts of a model that take one tensor and return one, found and measured.

A wrapper that adds a shortcut around a block needs the block's input as well as its output,
so a block must take one tensor, return one, and leave its input unmodified. A block is

- a submodule of a traced region: its call, or the nodes traced inside it (found from the
  module stacks), with the shapes recorded on them;
- a span ``FIRST:LAST`` of a traced graph's nodes (``REGION/FIRST:LAST`` when the names occur
  in several regions);
- a child of an opaque module, measured by one probing forward.

Helpers that refuse a block raise ``ValueError`` with a one-line message naming it; the pass
that asked turns it into its own ``PassError``. Blocks already wrapped are listed by
:func:`wrapped_names`, from the markers the residual wrappers and registries leave.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from graphtricks.capturing import Region, RegionTree
from graphtricks.capturing.probe import FirstCall, first_calls
from graphtricks.capturing.shapes import tensor_meta
from graphtricks.fxgraph.kinds import CONTAINERS, is_builtin_module
from graphtricks.fxgraph.lookup import submodule
from graphtricks.fxgraph.nodes import (
    boundary,
    find_submodule,
    module_nodes,
    mutates_input,
    nodes_between,
    stack_types,
)
from graphtricks.layers.residual import MARKER, REGISTRY, choose_shortcut

__all__ = [
    "BLOCK_RULE",
    "SPAN",
    "Block",
    "single_io",
    "check_not_inplace",
    "adds_input",
    "has_own_shortcut",
    "traced_block",
    "span_nodes",
    "span_block",
    "opaque_child",
    "measure_blocks",
    "wrapped_names",
    "register_wrapped",
    "candidate_blocks",
]

BLOCK_RULE = "a residual block must take one tensor and return one"
SPAN = re.compile(r"(?:(?P<region>[^/:]+)/)?(?P<first>[^/:]+):(?P<last>[^/:]+)")
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY


@dataclass
class Block:
    """One block: where it is, its shapes and, in a traced region, its nodes.

    Attributes:
        where: its model-level name (a qualified module name, or a span label).
        local: its path inside its host region, or ``"FIRST:LAST"`` for a span.
        module: the block's module (None for a span or a parameter-free inlined block).
        in_shape: the shape of its input.
        out_shape: the shape of its output.
        dtypes: ``(input dtype, output dtype)``.
        nodes: its nodes in the host graph (empty for a measured child of an opaque module).
        kind: the shortcut kind chosen for it (``choose_shortcut``), set by the wrapping pass.
        stride: that shortcut's stride, one per spatial dimension.
    """

    where: str
    local: str
    module: nn.Module | None = None
    in_shape: tuple = ()
    out_shape: tuple = ()
    dtypes: tuple = (None, None)
    nodes: set = field(default_factory=set)
    kind: str = ""
    stride: tuple = ()


# -- traced regions ------------------------------------------------------------------------
def single_io(nodes: list[fx.Node], where: str) -> tuple[fx.Node, fx.Node]:
    """The one outside value the nodes read and the one value read outside them, or ValueError."""
    entries, exits = boundary(nodes)
    if len(entries) != 1 or len(exits) != 1:
        got = f"takes {len(entries)} inputs" if len(entries) != 1 else f"returns {len(exits)} values"
        raise ValueError(f"{where} {got}; {BLOCK_RULE}")
    for node, role in ((entries[0], "input"), (exits[0], "output")):
        if tensor_meta(node) is None:
            raise ValueError(f"{where} has no recorded tensor {role} ({node.name}); {BLOCK_RULE}")
    return entries[0], exits[0]


def check_not_inplace(gm: fx.GraphModule, nodes: list[fx.Node], entry: fx.Node, where: str) -> None:
    """ValueError when one of ``nodes`` writes into the block's input ``entry``."""
    for n in nodes:
        if entry in n.all_input_nodes and mutates_input(n, gm):
            raise ValueError(f"{where} modifies its input in place ({n.format_node()}); the shortcut needs"
                             " the unmodified input: make that step out-of-place (e.g. inplace=False)")


def adds_input(nodes: list[fx.Node], entry: fx.Node) -> bool:
    """True when a sum among ``nodes`` adds two values that both come from ``entry``: the block
    already has a shortcut of its own (torchvision's ``BasicBlock``: ``out += identity``)."""
    inside, reached = set(nodes), {entry}
    for n in nodes:  # graph order: a node comes after what it reads
        if any(a in reached for a in n.all_input_nodes):
            reached.add(n)
        if n.op in ("call_function", "call_method") and n.target in _ADDS and n in reached:
            operands = [a for a in n.args[:2] if isinstance(a, fx.Node)]
            if len(operands) == 2 and all(a in reached and (a in inside or a is entry) for a in operands):
                return True
    return False


def has_own_shortcut(gm: fx.GraphModule, local: str) -> bool:
    """True when the submodule ``local`` of a traced region adds its input back (:func:`adds_input`)."""
    nodes = module_nodes(gm.graph, local)
    entries, _ = boundary(nodes)
    return len(entries) == 1 and adds_input(nodes, entries[0])


def _from_graph(where: str, local: str, module: nn.Module | None, entry: fx.Node, exit_: fx.Node, nodes) -> Block:
    """A block of a traced region, with the shapes recorded at its entry and exit."""
    a, b = tensor_meta(entry), tensor_meta(exit_)
    return Block(where, local, module, tuple(a.shape), tuple(b.shape), (a.dtype, b.dtype), set(nodes))


def traced_block(gm: fx.GraphModule, local: str, where: str) -> Block:
    """The submodule ``local`` of a traced region as a block, or ValueError saying why it is none."""
    nodes = module_nodes(gm.graph, local)
    if not nodes:
        raise ValueError(f"{where} does not run as a step of its traced graph (inside a built-in layer,"
                         " or not called on the example inputs); name its parent or a --residual-span")
    calls = sum(n.op == "call_module" and n.target == local for n in nodes)
    if calls > 1:
        raise ValueError(f"{where} is called {calls} times; a shared module cannot be wrapped")
    entry, exit_ = single_io(nodes, where)
    check_not_inplace(gm, nodes, entry, where)
    return _from_graph(where, local, find_submodule(gm, local), entry, exit_, nodes)


def span_nodes(graph: fx.Graph, first: str, last: str, where: str) -> list[fx.Node]:
    """The nodes from ``first`` to ``last`` that ``last`` depends on, in graph order, or ValueError."""
    by_name = {n.name: n for n in graph.nodes}
    f, l = by_name[first], by_name[last]
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(n.op in ("placeholder", "output", "get_attr") for n in (f, l)) or order[f] > order[l]:
        raise ValueError(f"span {where} must run from an operation to a later one")
    nodes = nodes_between(graph, f, l)
    if f not in nodes:
        raise ValueError(f"span {where}: {last} does not depend on {first}")
    return nodes


def span_block(regions: list[Region], span: str) -> tuple[Region, Block] | None:
    """Resolve a span (``SPAN``) to its region and block; None when it is already wrapped."""
    m = SPAN.fullmatch(span)
    first, last, want = m["first"], m["last"], m["region"]
    traced = [r for r in regions if r.kind == "traced" and (want is None or r.path == want)]
    if any(f"span {first}:{last}" in (getattr(r.module, REGISTRY, None) or {}).values() for r in traced):
        return None
    hosts = [r for r in traced if {first, last} <= {n.name for n in r.module.graph.nodes}]
    if len(hosts) != 1:
        paths = ", ".join(r.path or "<root>" for r in hosts)
        where = f"several traced regions ({paths}); write REGION/FIRST:LAST" if hosts else "no traced region"
        raise ValueError(f"span {span}: nodes {first} and {last} are in {where}")
    gm, label = hosts[0].module, f"{hosts[0].path}/{first}:{last}" if hosts[0].path else f"{first}:{last}"
    nodes = span_nodes(gm.graph, first, last, label)
    entry, exit_ = single_io(nodes, f"span {label}")
    if exit_.name != last:
        raise ValueError(f"span {label}: {exit_.name} is used after the span; end the span there")
    check_not_inplace(gm, nodes, entry, f"span {label}")
    return hosts[0], _from_graph(label, f"{first}:{last}", None, entry, exit_, nodes)


# -- opaque regions ------------------------------------------------------------------------
def opaque_child(host: Region, local: str, where: str) -> nn.Module:
    """The child ``local`` of an opaque module (through ModuleList/ModuleDict), or ValueError."""
    module, parts = host.module, local.split(".")
    for i, part in enumerate(parts[:-1]):
        module = module._modules[part]
        if isinstance(module, CONTAINERS):
            continue
        inside = host.qualify(".".join(parts[: i + 1]))
        raise ValueError(f"{where} sits inside {type(module).__name__} {inside}, which graphtricks"
                         " does not open; name that module instead")
    return module._modules[parts[-1]]


def _measured(block: Block, call: FirstCall | None) -> str:
    """Fill a block's shapes from its first call; returns why it is no block, or ""."""
    if call is None:
        return "did not run on the example inputs; it cannot be measured or wrapped"
    if call.in_shape is None:
        return f"takes {call.args} arguments; {BLOCK_RULE}"
    if call.out_shape is None:
        return f"returns a {call.returned}; {BLOCK_RULE}"
    if call.mutated:
        return "modifies its input in place; the shortcut needs the unmodified input: make it out-of-place"
    block.in_shape, block.out_shape, block.dtypes = call.in_shape, call.out_shape, call.dtypes
    return ""


def measure_blocks(model: nn.Module, inputs: tuple, blocks: list[Block], kwargs: dict | None = None) -> list[str]:
    """Fill the shapes of blocks with a module, by one probing forward (none when ``blocks`` is empty).

    Returns:
        Per block, why it is no block (``"takes 2 arguments; …"``), or ``""`` when it is one.
    """
    calls = first_calls(model, inputs, [b.module for b in blocks], kwargs) if blocks else {}
    return [_measured(b, calls.get(id(b.module))) for b in blocks]


# -- blocks already wrapped -------------------------------------------------------------------
def wrapped_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Model-level names of wrapped blocks, and of the shortcut parts graphtricks added for spans."""
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


def register_wrapped(gm: fx.GraphModule, local: str | None = None, kind: str = "block") -> None:
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


# -- listing --------------------------------------------------------------------------------
def candidate_blocks(tree: RegionTree, example_inputs: tuple = (), example_kwargs: dict | None = None) -> list[dict]:
    """Children of ``nn.Sequential`` containers that take one tensor and return one, with shapes.

    Reads the shapes recorded by the rewrite; children of a Sequential kept opaque are listed
    only when ``example_inputs`` are given (they are measured by one eval forward).

    Args:
        tree: a captured region tree with shapes (``rewrite(model, [], x).tree``).
        example_inputs: the model's inputs, to measure Sequentials inside opaque modules.
        example_kwargs: the model's keyword inputs, likewise.

    Returns:
        ``[{"name", "type", "input_shape", "output_shape", "dtype", "shortcut", "wrapped", "layer",
        "has_shortcut"}]``; ``shortcut`` is what ``auto`` would choose, or None when no shortcut fits;
        ``layer`` is True for a single built-in layer (a Conv2d, a BatchNorm), False for a block;
        ``has_shortcut`` is ``"graphtricks"`` for a block already wrapped, ``"own"`` for one whose
        graph adds its input back (torchvision's ``BasicBlock``), else None.

    Example:
        >>> [b["name"] for b in candidate_blocks(gt.rewrite(PlainVGG(), [], x).tree)][:4]
        ['stem.0', 'stem.1', 'stem.2', 'stages.0']
    """
    found: list[tuple[Block, str, bool, bool]] = []  # block, type name, a single layer?, adds its input?
    measured: list[Block] = []
    for region in tree.regions():
        if region.kind == "traced":
            gm = region.graph_module
            types = stack_types(gm.graph)
            seqs = {p for p, t in types.items() if issubclass(t, nn.Sequential)}
            seqs |= {""} if type(gm).__name__ == "Sequential" else set()
            for local in (p for p in types if p.rpartition(".")[0] in seqs):
                nodes = module_nodes(gm.graph, local)
                try:
                    entry, exit_ = single_io(nodes, local)
                    check_not_inplace(gm, nodes, entry, local)
                except ValueError:
                    continue
                # a layer is a leaf call; an inlined module (traced through) is a block of several steps
                leaf = len(nodes) == 1 and nodes[0].op == "call_module" and nodes[0].target == local
                layer = leaf and is_builtin_module(submodule(gm, local))
                block = _from_graph(region.qualify(local), local, None, entry, exit_, ())
                found.append((block, types[local].__name__, layer, not layer and adds_input(nodes, entry)))
        elif isinstance(region.module, nn.Sequential) and (example_inputs or example_kwargs):
            measured += [Block(region.qualify(n), n, c) for n, c in region.module.named_children()]
    reasons = measure_blocks(tree.model, tuple(example_inputs), measured, example_kwargs)
    found += [(b, type(b.module).__name__, is_builtin_module(b.module), False)
              for b, reason in zip(measured, reasons) if not reason]
    wrapped, _ = wrapped_names(tree.model)
    out = []
    for block, type_name, layer, own in found:
        try:
            kind = choose_shortcut("auto", block.in_shape, block.out_shape, *block.dtypes)[0]
        except ValueError:
            kind = None
        out.append({"name": block.where, "type": type_name, "input_shape": list(block.in_shape),
                    "output_shape": list(block.out_shape), "dtype": str(block.dtypes[1]).replace("torch.", ""),
                    "shortcut": kind, "wrapped": block.where in wrapped, "layer": layer,
                    "has_shortcut": "graphtricks" if block.where in wrapped else ("own" if own else None)})
    return out

