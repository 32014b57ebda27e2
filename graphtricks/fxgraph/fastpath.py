"""A faster forward for traced regions: what fx generates, minus its Python overhead.

fx's generated forward reaches every submodule through ``nn.Module.__getattr__``
(``getattr(self.features, "0")``: a Python call per path segment), and a dropout module costs
a full module call in eval mode, where it is the identity. :func:`speed_up` installs a forward
made from fx's own generated code (same statements, same order, same early frees) that

- fetches each submodule once per call through ``_modules`` dicts: a dict lookup per segment,
  and always the module that is there now (a submodule replaced later is used);
- in eval mode, skips a dropout-family module (identity in eval) unless something would see the
  call: a hook on it or a global module hook, a patched ``forward``, a module in train mode, a
  torch function mode, an fx or TorchScript trace in progress. Skipping returns the input
  itself, as the call does.

- first compares, once per call, the attribute values the graph was specialised on with their
  values now (the module's guard, ``adopt.Guard``): one tuple comparison; a change re-specialises
  the module or raises.

The graph, ``gm.code`` and the state dict are untouched. ``recompile()`` (graph edits, pickling)
makes the fast forward again from the new code; a deep copy gets its own; ``torch.jit.script``
(which compiles ``forward`` from source) puts fx's forward back.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import Counter

import torch
from torch import fx, nn
from torch.fx.graph import _format_target
from torch.nn.modules import module as module_internals

from graphtricks.fxgraph.codecache import method_from_src

__all__ = ["is_sped_up", "restore_fx_forward", "speed_up"]

# Dropout modules whose eval forward is the identity: None = for any input, an int = only for
# inputs of that rank (the channel variants warn, raise or squeeze on other ranks).
_EVAL_IDENTITY: dict[type, int | None] = {
    nn.Dropout: None,
    nn.AlphaDropout: None,
    nn.FeatureAlphaDropout: None,
    nn.Dropout1d: 3,
    nn.Dropout2d: 4,
    nn.Dropout3d: 5,
}
# fx's symbolic tracer patches Module.__call__ to record module calls: then every call must happen.
_MODULE_CALL = nn.Module.__call__
_MARK = "_graphtricks_fast_forward"
# What speed_up sets on the module's own class (besides ``forward``, which recompile() resets).
_CLASS_ATTRIBUTES = ("recompile", "__deepcopy__", "__prepare_scriptable__")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
# How fx writes a submodule call (torch.fx.graph._format_target): self.a.b( or getattr(self.a, "0")(
_CALL_SITE = re.compile(r'(?<![\w.])(?:getattr\()*self(?:\.[A-Za-z_]\w*|, "[^"]*"\))*\(')


def _identity(input):
    return input


def _identity_at_rank(module: nn.Module, rank: int, input):
    return input if input.dim() == rank else module(input)


def _eval_stand_in(module):
    """What to call instead of ``module`` in eval mode: the identity where calling it would be one."""
    rank = _EVAL_IDENTITY.get(type(module), -1)
    if (
        rank == -1
        or module.training
        or "forward" in module.__dict__  # patched per instance (offloading wrappers, ...)
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    ):
        return module
    return _identity if rank is None else functools.partial(_identity_at_rank, module, rank)


def _calls_unobserved() -> bool:
    """False while something must see every call: global module hooks, a torch function mode, a trace."""
    return not (
        module_internals._global_forward_hooks
        or module_internals._global_forward_pre_hooks
        or module_internals._global_backward_hooks
        or module_internals._global_backward_pre_hooks
        or nn.Module.__call__ is not _MODULE_CALL
        or torch._C._get_tracing_state()
        or torch._C._is_torch_function_mode_enabled()
    )


class _Names:
    """Fresh local names that clash with nothing in the generated source or its globals."""

    def __init__(self, src: str, globals_: dict):
        self.used = set(_IDENTIFIER.findall(src)) | set(globals_)

    def new(self, hint: str) -> str:
        base = "_gt_" + re.sub(r"\W", "_", hint)
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


def _fast_source(gm: fx.GraphModule, fx_forward) -> tuple[str, dict]:
    """The fast forward's source and globals: fx's code and globals, the guard's check first,
    submodules bound to locals (where their call sites can be told apart)."""
    src, globals_ = gm.code, dict(fx_forward.__globals__)
    names = _Names(src, globals_)
    guard = gm.__dict__.get("_gt_guard")
    prologue = _guard_prologue(guard, fx_forward, names, globals_) if guard is not None else []
    try:
        src, bound = _bind_submodules(gm, src, names, globals_)
        prologue += bound
    except ValueError:
        if not prologue:
            raise
    lines = src.split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith("def forward("))
    if not lines[at].rstrip().endswith(":"):
        raise ValueError("unexpected multi-line signature")
    lines[at + 1 : at + 1] = ["    " + line for line in prologue]
    return "\n".join(lines), globals_


def _guard_prologue(guard, fx_forward, names: _Names, globals_: dict) -> list[str]:
    """Lines that compare the guarded values with those the graph was specialised on, once per call;
    when they differ, the guard re-specialises the module (or raises) and the call goes to the new forward."""
    values, more = guard.values_source("self", names)
    globals_.update(more)
    now, expected, failed = names.new("now"), names.new("expected"), names.new("guard_failed")
    globals_[expected], globals_[failed] = guard.expected, guard.failed
    kinds = inspect.Parameter
    args = []
    for p in list(inspect.signature(fx_forward).parameters.values())[1:]:
        if p.kind is kinds.VAR_POSITIONAL:
            args.append(f"*{p.name}")
        elif p.kind is kinds.VAR_KEYWORD:
            args.append(f"**{p.name}")
        elif p.kind is kinds.KEYWORD_ONLY:
            args.append(f"{p.name}={p.name}")
        else:
            args.append(p.name)
    return [
        "try:",
        f"    {now} = {values}",
        "except Exception:",  # an owner that is gone: the guard names it
        f"    {now} = None",
        f"if {now} != {expected}:",
        f"    return {failed}(self, {now})({', '.join(args)})",
    ]


def _bind_submodules(gm: fx.GraphModule, src: str, names: _Names, globals_: dict) -> tuple[str, list[str]]:
    """fx's code with each submodule call made on a local bound once per call, and the lines that bind them."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    if not calls:
        raise ValueError("no submodule calls")
    locals_ = {target: names.new(target) for target in calls}
    sites = {_format_target("self", target) + "(": target for target in calls}
    found: Counter = Counter()

    def bind(match: re.Match) -> str:
        target = sites.get(match.group())
        if target is None:
            return match.group()
        found[target] += 1
        return locals_[target] + "("

    src = _CALL_SITE.sub(bind, src)
    if found != calls:  # a string constant that looks like a call site, say: leave fx's forward
        raise ValueError("cannot tell the submodule call sites apart")

    root = names.new("root")
    prologue = [f"{root} = self._modules"]
    dicts = {"": (root, gm._modules)}  # path -> (its local name, its _modules now)

    def dict_of(path: str) -> tuple[str, dict]:
        if path not in dicts:
            parent, _, leaf = path.rpartition(".")
            parent_local, parent_modules = dict_of(parent)
            dicts[path] = (names.new(path), parent_modules[leaf]._modules)
            prologue.append(f"{dicts[path][0]} = {parent_local}[{leaf!r}]._modules")
        return dicts[path]

    dropouts = []
    for target, local in locals_.items():
        parent, _, leaf = target.rpartition(".")
        parent_local, parent_modules = dict_of(parent)
        prologue.append(f"{local} = {parent_local}[{leaf!r}]")
        if type(parent_modules[leaf]) in _EVAL_IDENTITY:
            dropouts.append(local)
    if dropouts:
        stand_in, unobserved = names.new("eval_stand_in"), names.new("calls_unobserved")
        globals_[stand_in], globals_[unobserved] = _eval_stand_in, _calls_unobserved
        all_training = " and ".join(f"{d}.training" for d in dropouts)
        prologue.append(f"if not ({all_training}) and {unobserved}():")
        prologue += [f"    {d} = {stand_in}({d})" for d in dropouts]
    return src, prologue


def _guarded(fx_forward, guard):
    """fx's forward behind the guard's check, where no fast forward can be made from its code."""

    @functools.wraps(fx_forward)
    def forward(self, *args, **kwargs):
        now = guard.now(self)
        if now != guard.expected:
            return guard.failed(self, now)(*args, **kwargs)
        return fx_forward(self, *args, **kwargs)

    return forward


def _above(self: nn.Module, name: str, fn) -> super:
    """``super()`` from the class that holds ``fn`` as ``name``: subclasses made later (FSDP's, a
    copy's) would otherwise find ``fn`` again, for ever."""
    owner = next(c for c in type(self).__mro__ if vars(c).get(name) is fn)
    return super(owner, self)


def _recompile(self: fx.GraphModule):
    """``GraphModule.recompile``, then the fast forward again from the (possibly edited) graph."""
    python_code = _above(self, "recompile", _recompile).recompile()
    if not is_sped_up(self):  # a guarded module's own recompile sped it up already
        speed_up(self)
    return python_code


def _deepcopy(self: fx.GraphModule, memo: dict):
    """``GraphModule.__deepcopy__`` (which builds a new class with fx's forward), then the fast forward."""
    copied = _above(self, "__deepcopy__", _deepcopy).__deepcopy__(memo)
    speed_up(copied)
    return copied


def _prepare_scriptable(self: fx.GraphModule):
    """TorchScript compiles ``forward`` from its source and cannot compile this one: back to fx's
    (which checks no guard: TorchScript compiles the graph's constants as they are)."""
    fx.GraphModule.recompile(self)
    return self


def speed_up(gm: fx.GraphModule) -> bool:
    """Give ``gm`` a forward that computes what fx's does, with less Python overhead per call.

    Safe to call more than once. Where the fast forward cannot be made (no submodule calls, a
    string constant that looks like a call site, an unusual code generator), fx's forward stays
    and nothing changes.

    Args:
        gm: a traced region (``region.graph_module``); its graph is not modified.

    Returns:
        True when the fast forward is installed.

    Example:
        >>> for region in result.tree.regions():
        ...     if region.kind == "traced":
        ...         speed_up(region.graph_module)
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"speed_up takes a torch.fx.GraphModule, got {type(gm).__name__}")
    gm.code  # noqa: B018 - an adopted module whose compile waits for its first call is compiled now
    cls = type(gm)
    fx_forward = getattr(cls.forward, _MARK, cls.forward)
    try:
        src, globals_ = _fast_source(gm, fx_forward)
        forward = method_from_src(src, globals_)
    except Exception:  # noqa: BLE001 - any failure (an fx code generator this does not know): keep fx's forward
        guard = gm.__dict__.get("_gt_guard")
        if guard is None:
            return False
        forward = _guarded(fx_forward, guard)  # its checks all the same
    setattr(forward, _MARK, fx_forward)
    # Class attributes (each GraphModule has a class of its own): nothing enters the instance's
    # state, so pickles and state dicts are what they were.
    cls.forward = forward
    cls.recompile = _recompile
    cls.__deepcopy__ = _deepcopy
    cls.__prepare_scriptable__ = _prepare_scriptable
    return True


def restore_fx_forward(gm: fx.GraphModule) -> None:
    """Undo :func:`speed_up`: ``gm`` runs fx's own forward again (to compare, or to debug; it checks
    no guard until its next ``recompile()``)."""
    cls = type(gm)
    for name in _CLASS_ATTRIBUTES:
        if name in vars(cls):
            delattr(cls, name)
    fx.GraphModule.recompile(gm)


def is_sped_up(gm: nn.Module) -> bool:
    """True when ``gm`` runs the forward installed by :func:`speed_up`."""
    return hasattr(type(gm).forward, _MARK)
