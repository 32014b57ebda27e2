"""Shapes: record, from the example inputs, the shape and dtype of every traced node.

Shapes are computed once, by one eval-mode forward of the captured model in which every
traced region runs node by node (as fx's ``ShapeProp`` does); passes read them from
``node.meta`` and keep them up to date for the nodes they add.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_flatten

from graphtricks.capturing.probe import Observers, probe_forward, watched_forward
from graphtricks.capturing.regions import RegionTree, model_rejected
from graphtricks.fxgraph.kinds import is_builtin_module

__all__ = ["propagate_shapes", "tensor_meta", "copy_output_meta", "transposed_meta"]

def _record_meta(_interpreter: fx.Interpreter, n: fx.Node, result: Any) -> None:
    """Store a node's ``TensorMetadata`` (what fx's ShapeProp stores, without its printing)."""
    if any(isinstance(v, torch.Tensor) for v in tree_flatten(result)[0]):
        n.meta["tensor_meta"] = map_aggregate(
            result, lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v
        )


def propagate_shapes(
    tree: RegionTree, example_inputs: tuple, observers: Sequence[Observers] = (), example_kwargs: dict | None = None
) -> Any:
    """Record shapes and dtypes on every node of every traced region; return the model output.

    One eval-mode forward of the model in which every traced region runs node by node. Also
    marks nodes whose value is a model output (``node.meta["gt_model_output"]``) and records,
    for built-in children of opaque regions, their output shape and whether it is a model
    output (``region.leaf_info``). ``observers`` (from passes) see the same forward, so a pass
    that measures something on the model needs no forward of its own. ``example_kwargs`` are
    the model's keyword inputs.

    Raises:
        InputShapeError: the model rejects the example inputs (quoting its message).
    """
    regions = tree.regions()
    produced: list[tuple[fx.Node, weakref.ref]] = []
    leaf_outputs: list[tuple[dict, weakref.ref]] = []
    hooks = [h for obs in observers for h in obs.hooks]
    extra: dict[int, list] = {}
    for obs in observers:
        for gm, after in obs.after_node:
            extra.setdefault(id(gm), []).append(after)

    def note_outputs(gm: fx.GraphModule):
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")

        def returned(result):
            nodes, _ = tree_flatten(out_node.args[0])
            values, _ = tree_flatten(result)
            if len(nodes) == len(values):
                for node, value in zip(nodes, values):
                    if isinstance(node, fx.Node) and isinstance(value, torch.Tensor):
                        produced.append((node, weakref.ref(value)))

        return returned

    def leaf_hook(info: dict):
        def hook(_module, _args, _kwargs, output):
            if isinstance(output, torch.Tensor) and "shape" not in info:
                info.update(shape=list(output.shape), dtype=str(output.dtype).replace("torch.", ""))
                leaf_outputs.append((info, weakref.ref(output)))

        return hook

    forwards = []
    for region in regions:
        if region.kind == "traced":
            gm = region.graph_module
            forwards.append((gm, watched_forward(gm, _record_meta, *extra.get(id(gm), ()), returned=note_outputs(gm))))
            continue
        for name, child in region.module.named_children():
            if is_builtin_module(child):
                info = region.leaf_info.setdefault(name, {})
                info.clear()
                hooks.append((child, leaf_hook(info)))
    try:
        output = probe_forward(tree.model, example_inputs, hooks=hooks, forwards=forwards, kwargs=example_kwargs)
    except Exception as e:  # the model's own error, whatever its type
        raise model_rejected(example_inputs, e, example_kwargs) from e

    outputs = {id(v) for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)}
    for region in regions:
        if region.kind == "traced":
            for node in region.graph_module.graph.nodes:
                node.meta.pop("gt_model_output", None)
    for node, ref in produced:
        value = ref()
        if value is not None and id(value) in outputs:
            node.meta["gt_model_output"] = True
    for info, ref in leaf_outputs:
        value = ref()
        info["is_model_output"] = value is not None and id(value) in outputs
    return output


def tensor_meta(node: fx.Node):
    """The recorded ``TensorMetadata`` of a node, or None (not a tensor, or never run)."""
    meta = node.meta.get("tensor_meta")
    return meta if hasattr(meta, "shape") else None



def copy_output_meta(old: fx.Node, new: fx.Node) -> None:
    """Give ``new``, which now computes ``old``'s value, its shape and model-output mark."""
    for key in ("tensor_meta", "gt_model_output"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def transposed_meta(meta, dim0: int, dim1: int):
    """The ``TensorMetadata`` of a tensor described by ``meta`` after ``transpose(dim0, dim1)``."""
    like = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device="meta")
    return _extract_tensor_metadata(like.transpose(dim0, dim1))
