"""Activation checkpointing stays a call: the functions a trace records as calls, not traces through.

fx traces *through* ``torch.utils.checkpoint.checkpoint``: the graph calls the block directly,
so a rewritten model that checkpointed its blocks (timm ``set_grad_checkpointing(True)``, a
user's ``checkpoint(self.block, h)``) would keep every activation and run each block once per
forward and backward. A region's tracer records these functions as calls instead
(``fx.Tracer(autowrap_functions=...)``), with the modules they are given as arguments kept as
the modules themselves (a ``get_attr`` of the module: the generated forward passes
``self.block``), and capture makes each such module a region of its own, so passes still reach
inside it. Hugging Face's gradient-checkpointing layers checkpoint from their own ``forward``,
which reads ``self.training``: they are kept as written (opaque) while checkpointing is on, and
an unedited layer keeps its own forward when it is turned on later.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import torch.utils.checkpoint as torch_checkpoint

from graphtricks.errors import CaptureError

__all__ = ["checkpoint", "checkpoint_functions", "checkpoint_sequential", "name_checkpoint_calls", "not_traced_through"]

# Checkpointing functions of libraries that may be loaded: module name -> function names.
_LIBRARY_FUNCTIONS = {
    "timm.models._manipulate": ("checkpoint", "checkpoint_seq"),
}


def checkpoint_functions() -> tuple[tuple, list[types.ModuleType]]:
    """The checkpointing functions a trace records as calls, and the modules whose attribute
    of that name is patched while tracing (``torch.utils.checkpoint.checkpoint(...)``).

    Only libraries already imported are looked at: a model of theirs imported them.
    """
    functions = [torch_checkpoint.checkpoint, torch_checkpoint.checkpoint_sequential, checkpoint, checkpoint_sequential]
    for module_name, names in _LIBRARY_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        if module is not None:
            functions += [f for f in (getattr(module, n, None) for n in names) if callable(f)]
    return tuple(functions), [torch_checkpoint]


# fx names a torch function in generated code by its dotted path, and a recorded call of it by
# ``wrap("torch.utils.checkpoint.checkpoint")``, which breaks every later trace in the process once
# that code runs (the same fault as fx's ``_assert_is_none``, guards.py). Graphs call these instead.
def checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint``, under a plain name a generated forward can record."""
    return torch_checkpoint.checkpoint(function, *args, **kwargs)


def checkpoint_sequential(functions, segments, input, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint_sequential``, under a plain name."""
    return torch_checkpoint.checkpoint_sequential(functions, segments, input, *args, **kwargs)


def name_checkpoint_calls(graph) -> None:
    """Make the graph's recorded calls of torch's checkpointing functions call :func:`checkpoint` and
    :func:`checkpoint_sequential` (same behaviour, a name fx can record again after a pickle)."""
    for node in graph.find_nodes(op="call_function", target=torch_checkpoint.checkpoint):
        node.target = checkpoint
    for node in graph.find_nodes(op="call_function", target=torch_checkpoint.checkpoint_sequential):
        node.target = checkpoint_sequential


@contextlib.contextmanager
def not_traced_through() -> Iterator[None]:
    """While open, a checkpoint that runs (fx tracing through it: called through an object a trace
    cannot record, as Hugging Face's ``partial(checkpoint)`` of ``partial(forward, self)``) raises,
    so the module that calls it is kept as written instead of losing its checkpointing."""
    saved = torch_checkpoint._checkpoint_impl

    def refuse(*args, **kwargs):
        raise CaptureError("it checkpoints through a function or object a graph cannot call (not a module):"
                           " kept as written, with its checkpointing")

    torch_checkpoint._checkpoint_impl = refuse
    try:
        yield
    finally:
        torch_checkpoint._checkpoint_impl = saved
