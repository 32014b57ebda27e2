"""Compile each distinct generated forward once: blocks of one design share their code object.

fx generates and compiles a forward for every ``GraphModule``; a rewritten model gets one per
module that runs a graph, and the fast path (``fastpath.py``) one more each. Blocks of one design
generate the same source (MobileNetV3-Small: 33 modules, 3 distinct sources), and compiling it
was a tenth of a rewrite. :func:`method_from_src` compiles a source once and makes each module's
function from the shared code object with that module's globals, as fx does; the source stays
readable in tracebacks (registered with fx's own source cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import CodeType
from typing import Any

from torch.fx import graph_module

__all__ = ["method_from_src", "shared_compiles"]

_LIMIT = 4096  # distinct sources kept; the cache starts afresh past it
_compiled: dict[tuple, CodeType] = {}


def method_from_src(src: str, globals_: dict[str, Any], name: str = "forward",
                    co_fields: dict[str, Any] | None = None) -> Callable:
    """The function ``name`` defined by ``src``, run with a copy of ``globals_`` (fx's
    ``_method_from_src``), compiled only the first time this source is seen."""
    # co_fields name the user's file a traced forward came from (fx puts it in tracebacks).
    key = (src, *sorted((co_fields or {}).items()))
    code = _compiled.get(key)
    if code is None:
        # The filename names the source in tracebacks and linecache, as fx's own compile does.
        filename = graph_module._loader.cache(src, globals_, co_fields)
        code = compile(src, filename, "exec", dont_inherit=True)
        if len(_compiled) >= _LIMIT:
            _compiled.clear()
        _compiled[key] = code
    namespace = dict(globals_)
    exec(code, namespace)  # noqa: S102 - fx's generated forward; its defaults are evaluated with these globals
    return namespace[name]


@contextlib.contextmanager
def shared_compiles() -> Iterator[None]:
    """While active, ``GraphModule.recompile`` compiles through :func:`method_from_src`.

    The function it installs is the one fx would have made from the same source and globals,
    so a recompile elsewhere during this (another thread's) gets what it would have got.
    """
    saved = graph_module._forward_from_src
    graph_module._forward_from_src = lambda src, globals_, co_fields=None: method_from_src(
        src, globals_, "forward", co_fields)
    try:
        yield
    finally:
        graph_module._forward_from_src = saved
