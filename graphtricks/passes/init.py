"""Re-initialise weights, with each layer's gain taken from the nonlinearity it feeds in the graph.

One reverse pass over each traced graph (:func:`~graphtricks.fxgraph.dataflow.consumer_map`) maps every
node to the nonlinearity its value reaches (past norms, dropout, reshapes, pooling and residual
adds); each Linear/Conv/ConvTranspose weight then gets that nonlinearity's gain: He for the ReLU
family, Xavier for tanh, sigmoid and layers feeding none, orthogonal for recurrent
hidden-to-hidden weights (``scheme="auto"``). Where no graph is visible (built-in children of
opaque modules, layers inside a built-in leaf) the gain falls back by module type, and the
change record says so. Values are drawn (:func:`~graphtricks.passes.init_draws.draw`) from a
generator seeded by ``seed`` and the parameter's name, so they do not depend on the order of
the walk or on the global RNG. Parameters are edited in place: ``new_params`` stays empty.

A second run with the same seed changes nothing. Where the judgement of a layer can differ
between runs on the same model (it has no graph, or opaque code runs its region only on some
inputs, so a branch that depends on the weights may have skipped it last time), a weight that
already holds this seed's draw for it, at any gain and with any method of the scheme, is kept
with a note: it was set by this pass knowing as much or more. Another seed draws it again.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from graphtricks.capturing import Region
from graphtricks.errors import PassError
from graphtricks.fxgraph.activations import activation_init
from graphtricks.fxgraph.dataflow import (
    Reach,
    consumer_map,
    last_norm,
    merge_reach,
    residual_norms,
)
from graphtricks.fxgraph.kinds import NORM_FUNCTIONS, NORM_TYPES
from graphtricks.layers.residual import Residual
from graphtricks.passes.base import GraphtricksPass, as_patterns, register_pass
from graphtricks.passes.init_draws import (
    CONV_TYPES,
    RECURRENT_TYPES,
    draw,
    is_bias,
    weight_specs,
)

__all__ = ["Initialize", "SCHEMES", "FAN_MODES", "TYPE_GROUPS"]

SCHEMES = ("auto", "xavier-uniform", "xavier-normal", "he-uniform", "he-normal", "orthogonal")
FAN_MODES = ("fan_in", "fan_out")
TYPE_GROUPS = {"linear": (nn.Linear,), "conv": CONV_TYPES, "norm": NORM_TYPES, "rnn": RECURRENT_TYPES,
               "attention": (nn.MultiheadAttention,)}
_BASES = tuple(c for group in TYPE_GROUPS.values() for c in group)
_TYPE_NAMES = set(TYPE_GROUPS) | {n.lower() for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, _BASES)}
_AUTO = {"he": "he-normal", "xavier": "xavier-uniform"}
_LAYER_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


@register_pass
class Initialize(GraphtricksPass):
    """Re-initialise Linear/Conv/ConvTranspose/RNN weights with graph-aware gains; reset norms.

    Args:
        scheme: ``auto`` (He for the ReLU family, Xavier otherwise, orthogonal for recurrent
            hidden-to-hidden weights), or one of xavier-uniform, xavier-normal, he-uniform,
            he-normal, orthogonal for every weight (still with the consumer's gain).
        seed: seeds the generator (with each parameter's name); the global RNG is not touched.
        keep_bias: leave every bias (norm β included) as it is instead of zeroing it.
        fan: ``fan_in`` or ``fan_out``, the fan He initializers divide by.
        zero_init_residual: set γ = 0 in the last norm of each residual branch found in the
            graph (``x + F(x)``), so that each residual block starts as its shortcut.
        include_frozen: also set parameters with ``requires_grad=False``.
        types: layer kinds to set, by group (linear, conv, norm, rnn, attention) or class name
            (``Conv2d``); empty = all.
        include: qualified-name globs to edit; empty = everything.
        exclude: qualified-name globs never edited.

    Raises:
        PassError: an unknown scheme, fan, or type name.

    Example:
        >>> result = gt.rewrite(model, [Initialize("auto", seed=1)], example_inputs=(x,))
    """

    name = "init"
    preserves_eval = False
    writes_values = True

    def __init__(self, scheme: str = "auto", *, seed: int = 0, keep_bias: bool = False, fan: str = "fan_in",
                 zero_init_residual: bool = False, include_frozen: bool = False, types=(), include=(), exclude=(), strict: bool = True):
        super().__init__(include=include, exclude=exclude, strict=strict)
        types = as_patterns(types, "init: types")
        if scheme not in SCHEMES:
            raise PassError(f"init: unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        if fan not in FAN_MODES:
            raise PassError(f"init: unknown fan {fan!r}; choose one of {', '.join(FAN_MODES)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PassError(f"init: seed must be an integer, got {seed!r}")
        unknown = [t for t in types if str(t).lower() not in _TYPE_NAMES]
        if unknown:
            raise PassError(f"init: unknown layer type {unknown[0]!r}; choose from {', '.join(sorted(_TYPE_NAMES))}")
        self.scheme, self.seed, self.keep_bias, self.fan = scheme, seed, bool(keep_bias), fan
        self.zero_init_residual, self.include_frozen = bool(zero_init_residual), bool(include_frozen)
        self.types = tuple(str(t).lower() for t in types)

    def options(self) -> dict:
        out = {"scheme": self.scheme, "seed": self.seed, "keep_bias": self.keep_bias, "fan": self.fan,
               "zero_init_residual": self.zero_init_residual, "include_frozen": self.include_frozen}
        if self.types:
            out["types"] = list(self.types)
        return out

    # -- regions -----------------------------------------------------------------------
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Set the parameters of the layers one traced region owns, with gains from its graph."""
        gm = graph_module
        reach = consumer_map(gm, self.prefix)
        sites: dict[str, list[fx.Node]] = {}
        calls: dict[str, fx.Node] = {}  # F.linear/F.conv on a module's weight (timm StdConv2d, Conv2dSame)
        fnorms: set[str] = set()  # modules whose weight is a functional norm's γ (traced-through BatchNorm)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sites.setdefault(str(node.target), []).append(node)
            elif node.op == "get_attr" and str(node.target).rpartition(".")[2] == "weight":
                owner = str(node.target).rpartition(".")[0]
                if any(u.target in NORM_FUNCTIONS and u.args[:1] != (node,) for u in node.users):
                    fnorms.add(owner)
                elif (layer := _layer_call(node)) is not None:
                    sites.setdefault(owner, []).append(layer)
                    calls[owner] = layer
        if self.zero_init_residual:
            for norm, wrapper, at in residual_norms(gm):
                self._zero_branch(norm, wrapper, self.qualify(at))
        modified = False
        for local, module in self._owned(gm):
            found = [reach[n] for n in sites.get(local, ())]
            why = f"not visible in the graph of {self.prefix or '<root>'} (inside a built-in module, or unused)"
            modified |= self._set_module(module, local, merge_reach(found) if found else None, why,
                                         calls.get(local), local in fnorms)
        return PassResult(gm, modified)

    def call_opaque(self, region: Region) -> bool:
        """Set the parameters of an opaque region's built-in children, with gains by module type."""
        if self.zero_init_residual and isinstance(region.module, Residual):
            self._zero_branch(last_norm(region.module.body), region.module, region.path)
        why = f"inside opaque {type(region.module).__name__} (no graph)"
        # A list, not a generator: any() would stop at the first module set.
        return any([self._set_module(m, local, None, why) for local, m in self._owned(region.module)])

    def begin(self) -> None:
        self.state.zero = set()  # norms to start at γ = 0, found by a parent region's graph
        self.state.done = set()  # parameters already set (shared modules)
        regions = self.tree.regions() if self.tree is not None else []
        self.state.regions = {id(r.module) for r in regions}  # modules that are regions of their own
        # Regions run by an opaque module's own code, maybe only on some inputs: another run may
        # have judged them otherwise.
        self.state.conditional = {id(r.module) for o in regions if o.kind == "opaque" for r in o.walk() if r is not o}
        # Every name of each parameter (tied weights: GPT-2's wte.weight is lm_head.weight): set once, all reported.
        self.state.names = {}
        if self.tree is not None:
            for name, p in self.tree.model.named_parameters(remove_duplicate=False):
                self.state.names.setdefault(id(p), []).append(name)

    def _zero_branch(self, norm: nn.Module | None, wrapper: nn.Module | None, where: str) -> None:
        """Mark ``norm`` for γ = 0, unless a zero gate already makes its block start as the body."""
        gate = getattr(wrapper, "gate", None)
        if norm is None:
            self.notes.append(f"{where}: the residual block's body ends in no norm; zero_init_residual left it")
        elif isinstance(gate, torch.Tensor) and not gate.detach().any():
            starts = "shortcut" if getattr(wrapper, "gate_on", "shortcut") == "branch" else "body"
            self.notes.append(f"{where}: residual wrapper has a zero gate (starts as its {starts}); γ left at 1")
        else:
            self.state.zero.add(id(norm))

    def _owned(self, root: nn.Module):
        """(local name, module) for ``root`` and its descendants that are no region of their own."""
        others = self.state.regions - {id(root)}
        stack = [("", root)]
        while stack:
            name, module = stack.pop()
            yield name, module
            for child_name, child in reversed(list(module.named_children())):
                if id(child) not in others:
                    stack.append((f"{name}.{child_name}" if name else child_name, child))

    # -- setting parameters ------------------------------------------------------------------
    def _set_module(self, module: nn.Module, local: str, reach: Reach | None, why: str,
                    call: fx.Node | None = None, fnorm: bool = False) -> bool:
        """Set one module's own parameters and record it; returns True when anything changed."""
        where = self.qualify(local)
        is_norm = fnorm or isinstance(module, NORM_TYPES)
        specs = [] if is_norm else weight_specs(module, call)
        if not (is_norm or specs) or not self.selects(where) or not self._wanted_type(module, is_norm, call):
            return False
        own = dict(module.named_parameters(recurse=False))
        frozen: list[str] = []
        with torch.no_grad():
            if is_norm:
                params, details, what = self._set_norm(module, own, where, frozen)
            else:
                params, details, what = self._set_weights(module, own, local, where, specs, reach, why, frozen)
        if frozen:
            self.notes.append(f"{where}: frozen parameters left alone ({', '.join(frozen)}); pass include_frozen to set them")
        if not params:
            return False
        details["params"] = [self.qualify(f"{local}.{p}" if local else p) for p in params]
        shared = [n for p in params for n in self.state.names.get(id(own[p]), ()) if n not in details["params"]]
        if shared:  # one tensor, several names: set once, and each name is reported
            details["shared_with"] = shared
            what += f" (tied: also {', '.join(shared)})"
        self.record(where, "initialized", what, details=details)
        return True

    def _put(self, own: dict, pname: str, value: float, frozen: list[str], where: str) -> bool:
        """Fill one parameter with a constant; only a value that differs counts as a change (so a
        second application records nothing)."""
        p = own.get(pname)
        if self._settable(p, frozen, pname, where) and not bool((p == value).all()):
            self.write_values(lambda: p.fill_(value))
            return True
        return False

    def _set_norm(self, module: nn.Module, own: dict, where: str, frozen: list[str]) -> tuple[list, dict, str]:
        """A norm: γ = 1 (0 for the last norm of a residual branch), β = 0 unless ``keep_bias``."""
        gamma = 0.0 if id(module) in self.state.zero else 1.0
        params = ["weight"] if self._put(own, "weight", gamma, frozen, where) else []
        if not self.keep_bias and self._put(own, "bias", 0.0, frozen, where):
            params.append("bias")
        details = {"initializer": "constant", "gamma": gamma, "beta": None if self.keep_bias else 0.0}
        what = f"γ = {gamma:g}" + (" (last norm of a residual branch)" if gamma == 0 else "")
        return params, details, what + ("" if self.keep_bias else ", β = 0")

    def _set_weights(self, module: nn.Module, own: dict, local: str, where: str, specs: list,
                     reach: Reach | None, why: str, frozen: list[str]) -> tuple[list, dict, str]:
        """A layer: each weight drawn with the gain of the nonlinearity it feeds; biases zeroed."""
        family, gain, nonlinearity, source = self._decide(module, reach, why)
        # Recurrent cells and attention are judged by their structure: always the same way.
        fixed = isinstance(module, (*RECURRENT_TYPES, nn.MultiheadAttention))
        guessed = source.startswith("module type") or (
            self.region is not None and id(self.region.module) in self.state.conditional)
        params, weights = [], {}
        for pname, fan_in, fan_out, blocks, recurrent in specs:
            if self._settable(own.get(pname), frozen, pname, where):
                method, g = self._method(family, gain, recurrent)
                qual = self.qualify(f"{local}.{pname}" if local else pname)
                kept = () if fixed or not guessed else (method, *self._other_methods(method))
                info = self._fill(own[pname], qual, method, g, fan_in, fan_out, blocks, kept)
                if info.pop("changed"):
                    weights[pname] = info
                    params.append(pname)
        if not self.keep_bias:
            params += [p for p in own if is_bias(p) and self._put(own, p, 0.0, frozen, where)]
        first = next(iter(weights.values()), {})
        details = {**first, "nonlinearity": nonlinearity, "source": source, "graph": source.startswith("graph")}
        if len(weights) > 1:
            details["weights"] = weights
        what = "biases zeroed" if not first else (
            f"{first['initializer']}, gain {first['gain']:.4g} ({nonlinearity or 'linear'}), std {first['std']:.4g}")
        return params, details, what + (f" [by {source}]" if source.startswith("module type") else "")

    def _settable(self, p: torch.Tensor | None, frozen: list[str], pname: str, where: str) -> bool:
        if p is None or id(p) in self.state.done or isinstance(p, nn.parameter.UninitializedParameter):
            return False  # absent, shared with a module set already, or lazy and never run
        if p.device.type == "meta":
            self.notes.append(f"{where}.{pname}: on the meta device (no values); left alone")
            return False
        if not p.requires_grad and not self.include_frozen:
            frozen.append(pname)
            return False
        self.state.done.add(id(p))
        return True

    def _wanted_type(self, module: nn.Module, is_norm: bool, call: fx.Node | None) -> bool:
        if not self.types:
            return True
        keys = {c.__name__.lower() for c in type(module).__mro__}
        keys |= {group for group, classes in TYPE_GROUPS.items() if isinstance(module, classes)}
        if call is not None:  # a traced-through layer is a plain Module in the graph: go by its call
            keys.add("linear" if call.target is F.linear else "conv")
        if is_norm:
            keys.add("norm")
        return bool(keys & set(self.types))

    def _decide(self, module: nn.Module, reach: Reach | None, why: str) -> tuple[str, float, str | None, str]:
        """(family, gain, nonlinearity, source) for a layer, from the graph or by module type."""
        if isinstance(module, (*RECURRENT_TYPES, nn.MultiheadAttention)):
            return "xavier", 1.0, None, "the module's own structure (recurrent cell / attention)"
        if reach is not None and reach.activation is not None:
            act = reach.activation
            family, gain = activation_init(act.name, act.kwargs)
            return family, gain, act.name, f"graph: feeds {act.name} at {act.where}"
        if reach is not None and reach.unknown is None:
            return "xavier", 1.0, None, "graph: feeds no nonlinearity" + (" (a model output)" if reach.output else "")
        if reach is not None:
            why = reach.unknown
        # Without a graph: convolutions almost always feed a ReLU-family activation; a Linear
        # is as often a projection or a head, so it gets the neutral gain.
        if isinstance(module, CONV_TYPES):
            return "he", nn.init.calculate_gain("relu"), "ReLU (assumed)", f"module type: {why}"
        return "xavier", 1.0, None, f"module type: {why}"

    def _method(self, family: str, gain: float, recurrent: bool) -> tuple[str, float]:
        if self.scheme != "auto":
            return self.scheme, gain
        # Recurrent cells (gain 1): orthogonal hidden-to-hidden keeps the state's norm.
        return ("orthogonal" if recurrent else _AUTO[family]), gain

    def _other_methods(self, method: str) -> tuple[str, ...]:
        """The other methods this scheme draws a (non-recurrent) weight with, as the gain's family varies."""
        if self.scheme != "auto":
            return ()
        return tuple(m for m in _AUTO.values() if m != method)

    def _generator(self, qual: str, device: torch.device) -> torch.Generator:
        # Seeded by the parameter's name: values do not depend on the order of the walk.
        digest = hashlib.blake2b(f"{self.seed}/{qual}".encode(), digest_size=8).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)

    def _fill(self, p: torch.Tensor, qual: str, method: str, gain: float, fan_in: int, fan_out: int, blocks: int,
              kept: tuple[str, ...] = ()) -> dict:
        """Draw ``p`` in float32 on its own device, copy it in, and describe what was drawn.

        ``kept``: for a layer whose judgement may have been another in an earlier run (no graph
        now, or run by opaque code that may have skipped it), the methods of this scheme whose
        draw for it, at any gain, is kept when ``p`` already holds it: this pass set it before,
        knowing as much or more, so a second run changes nothing.
        """

        def drawn(how: str, g: float) -> tuple[torch.Tensor, dict]:
            return draw(p.shape, how, g, fan_in, fan_out, blocks=blocks, mode=self.fan,
                        generator=self._generator(qual, p.device), device=p.device)

        w, info = drawn(method, gain)
        value = w.to(p.dtype)
        if torch.equal(p, value):
            return {"changed": False, **info}
        for other in kept:
            ref = w if other == method else drawn(other, 1.0)[0]
            scale = _scale_of_draw(p, ref)
            if scale is not None:
                held = scale * (gain if other == method else 1.0)
                if other != method or abs(held - gain) > 1e-3 * gain:
                    self.notes.append(f"{qual}: already holds this seed's {other} draw (gain {held:.4g}); left as it is"
                                      f" instead of {method} with gain {gain:.4g} (another seed draws it again)")
                return {"changed": False, **info}
        if self.defers_writes:  # draws again when written (the same seeded draw): no copy waits
            del w, value
            self.write_values(lambda: p.copy_(drawn(method, gain)[0].to(p.dtype)))
        else:
            self.write_values(lambda: p.copy_(value))
        return {"changed": True, **info}


def _scale_of_draw(p: torch.Tensor, ref: torch.Tensor) -> float | None:
    """The factor ``s > 0`` with ``p == s * ref`` up to rounding, or None (also for a single value,
    which any draw of the right sign would match)."""
    if p.numel() < 2 or p.shape != ref.shape:
        return None
    x, r = p.detach().float().reshape(-1), ref.reshape(-1)
    rr = float(r.dot(r))
    scale = float(x.dot(r)) / rr if rr > 0 else 0.0
    if not (scale > 0 and math.isfinite(scale)):
        return None
    eps = max(torch.finfo(torch.float32).eps, torch.finfo(p.dtype).eps if p.dtype.is_floating_point else 0.0)
    return scale if float((x - scale * r).abs().max()) <= 8 * eps * float(x.abs().max()) else None


def _layer_call(weight: fx.Node) -> fx.Node | None:
    """The F.linear/F.conv call that a weight reaches (maybe through a few ops), or None."""
    todo, seen = [(weight, 0)], set()
    while todo:
        node, depth = todo.pop(0)
        for user in node.users:
            if user.op == "call_function" and user.target in _LAYER_FUNCTIONS:
                if user.args[1:2] == (node,) or user.kwargs.get("weight") is node:
                    return user
                continue
            if depth < 4 and user not in seen:
                seen.add(user)
                todo.append((user, depth + 1))
    return None
