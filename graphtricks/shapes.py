"""Example inputs and shapes: parse ``--input-shape``, and record shapes on every region.

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

from graphtricks.capture import RegionTree, is_builtin_module, model_rejected
from graphtricks.errors import InputShapeError
from graphtricks.probe import Observers, probe_forward, watched_forward

__all__ = [
    "parse_input_shapes", "make_example_inputs", "propagate_shapes", "tensor_meta", "copy_output_meta", "transposed_meta",
    "DTYPES",
]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}


def parse_input_shapes(text: str) -> list[tuple[int, ...]]:
    """Parse ``"8,3,32,32"`` or ``"8,16;8,16"`` (one shape per model input).

    Raises:
        InputShapeError: a dimension is not a positive integer, or a shape is empty.
    """
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.replace("x", ",").split(",")]
        if not part.strip() or any(not d.isdigit() or int(d) <= 0 for d in dims):
            raise InputShapeError(
                f"input shape {part.strip()!r} is not a shape: give positive integers separated by"
                " commas, e.g. 8,3,32,32 (several inputs separated by ';')"
            )
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def make_example_inputs(
    shapes: list[tuple[int, ...]], dtype: str = "float32", seed: int = 0, device: str = "cpu", high: int = 100
) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs: normal floats, or integers in ``[0, high)`` for token ids."""
    if dtype not in DTYPES:
        raise InputShapeError(f"unknown input dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if torch_dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(torch_dtype)
        else:
            t = torch.randint(0, high, shape, generator=gen, dtype=torch_dtype)
        out.append(t.to(device))
    return tuple(out)


def _record_meta(_interpreter: fx.Interpreter, n: fx.Node, result: Any) -> None:
    """Store a node's ``TensorMetadata`` (what fx's ShapeProp stores, without its printing)."""
    if any(isinstance(v, torch.Tensor) for v in tree_flatten(result)[0]):
        n.meta["tensor_meta"] = map_aggregate(
            result, lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v
        )


def propagate_shapes(tree: RegionTree, example_inputs: tuple, observers: Sequence[Observers] = ()) -> Any:
    """Record shapes and dtypes on every node of every traced region; return the model output.

    One eval-mode forward of the model in which every traced region runs node by node. Also
    marks nodes whose value is a model output (``node.meta["gt_model_output"]``) and records,
    for built-in children of opaque regions, their output shape and whether it is a model
    output (``region.leaf_info``). ``observers`` (from passes) see the same forward, so a pass
    that measures something on the model needs no forward of its own.

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
        output = probe_forward(tree.model, example_inputs, hooks=hooks, forwards=forwards)
    except Exception as e:  # the model's own error, whatever its type
        raise model_rejected(example_inputs, e) from e

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
