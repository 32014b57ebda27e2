"""Python's cyclic garbage collector, paused while graphtricks builds and drops many objects.

A rewrite (nodes, proxies, copies of modules) and an export (torch.export's traces, fake
tensors, the ONNX IR of each graph) allocate objects by the hundred thousand; every collection
those allocations trigger walks all the objects alive, the model's and the caller's included.
That was 25 % of a 4096-layer rewrite and 10 % of exporting a MobileNetV3-Small pair (0.5 s of
0.6 s of collections). Reference counting still frees everything that is not in a cycle;
cycles are collected once the collector is back on.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector while the block runs (nested blocks: the outermost
    turns it back on, and only when it was on)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
