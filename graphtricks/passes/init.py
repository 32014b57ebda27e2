"""Re-initialise weights, with each layer's gain taken from the nonlinearity it feeds in the graph.

One reverse pass over each traced graph maps every node to the nonlinearity its value reaches
(past norms, dropout, reshapes, pooling and residual adds); each Linear/Conv/ConvTranspose weight
then gets that nonlinearity's gain: He for the ReLU family, Xavier for tanh, sigmoid and layers
feeding none, orthogonal for recurrent hidden-to-hidden weights (``scheme="auto"``). Where no
graph is visible (built-in children of opaque modules, layers inside a built-in leaf) the gain
falls back by module type, and the change record says so. Values are drawn from a generator
seeded by ``seed`` and the parameter's name, so they do not depend on the order of the walk or
on the global RNG. Parameters are edited in place: ``new_params`` stays empty.
"""

from __future__ import annotations

import hashlib
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from graphtricks.activations import (
    ACTIVATION_MODULES,
    activation_init,
    activation_name,
    module_activation_kwargs,
    node_activation_kwargs,
)
from graphtricks.capture import Region, is_builtin_module
from graphtricks.errors import PassError
from graphtricks.graph import (
    DROPOUT_FUNCTIONS,
    DROPOUT_MODULES,
    is_dropout,
    node_where,
    owner_path,
)
from graphtricks.layers.residual import Residual, ResidualSpan
from graphtricks.passes.base import GraphtricksPass, register_pass

__all__ = ["Initialize", "initialize", "SCHEMES", "FAN_MODES", "TYPE_GROUPS"]

SCHEMES = ("auto", "xavier-uniform", "xavier-normal", "he-uniform", "he-normal", "orthogonal")
FAN_MODES = ("fan_in", "fan_out")
_CONV = nn.modules.conv._ConvNd
_RNN = (nn.RNNBase, nn.RNNCellBase)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
TYPE_GROUPS = {"linear": (nn.Linear,), "conv": (_CONV,), "norm": _NORMS, "rnn": _RNN, "attention": (nn.MultiheadAttention,)}
_BASES = tuple(c for group in TYPE_GROUPS.values() for c in group)
_TYPE_NAMES = set(TYPE_GROUPS) | {n.lower() for n, c in vars(nn).items() if isinstance(c, type) and issubclass(c, _BASES)}
_AUTO = {"he": "he-normal", "xavier": "xavier-uniform"}

# Ops a value passes through on its way to the nonlinearity that consumes it.
_THROUGH_MODULES = tuple(
    getattr(mod, n) for mod, names in (
        (nn.modules.pooling, ("_MaxPoolNd", "_AvgPoolNd", "_AdaptiveAvgPoolNd", "_AdaptiveMaxPoolNd", "_LPPoolNd")),
        (nn.modules.padding, ("_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")),
    ) for n in names if hasattr(mod, n)
) + (*_NORMS, *DROPOUT_MODULES, nn.LocalResponseNorm, nn.Identity, nn.Flatten, nn.Unflatten, nn.Upsample,
     nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm, F.local_response_norm}
_THROUGH_FUNCTIONS = _NORM_FUNCTIONS | DROPOUT_FUNCTIONS | {
    operator.getitem, operator.add, operator.iadd, operator.sub, operator.neg, torch.add, torch.sub, torch.cat,
    torch.concat, torch.stack, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.chunk, torch.split, torch.mean, F.pad, F.interpolate, F.pixel_shuffle,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_VIEW_METHODS = {
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "expand", "to",
    "float", "half", "bfloat16", "type_as", "clone", "detach", "t",
}
_THROUGH_METHODS = _VIEW_METHODS | {"mean", "add", "add_", "sub", "sub_", "chunk", "split", "neg"}
_SCALE = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "mul_", "div", "div_"}
_IGNORED = {getattr, "size", "dim", "numel"}  # reading a shape consumes no values
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
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

    def __init__(self, scheme: str = "auto", *, seed: int = 0, keep_bias: bool = False, fan: str = "fan_in",
                 zero_init_residual: bool = False, include_frozen: bool = False, types=(), include=(), exclude=()):
        super().__init__(include=include, exclude=exclude)
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
        self._zero: set[int] = set()  # norms to start at γ = 0, found by a parent region's graph
        self._done: set[int] = set()  # parameters already set (shared modules)
        self._regions: set[int] = set()  # modules that are regions of their own

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
        self._begin()
        reach = self._reach(gm)
        sites: dict[str, list[fx.Node]] = {}
        calls: dict[str, fx.Node] = {}  # F.linear/F.conv on a module's weight (timm StdConv2d, Conv2dSame)
        fnorms: set[str] = set()  # modules whose weight is a functional norm's γ (traced-through BatchNorm)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sites.setdefault(str(node.target), []).append(node)
            elif node.op == "get_attr" and str(node.target).rpartition(".")[2] == "weight":
                owner = str(node.target).rpartition(".")[0]
                if any(u.target in _NORM_FUNCTIONS and u.args[:1] != (node,) for u in node.users):
                    fnorms.add(owner)
                elif (layer := _layer_call(node)) is not None:
                    sites.setdefault(owner, []).append(layer)
                    calls[owner] = layer
        if self.zero_init_residual:
            for norm, wrapper, at in _residual_norms(gm):
                self._zero_branch(norm, wrapper, self.qualify(at))
        modified = False
        for local, module in self._owned(gm):
            found = [reach[n] for n in sites.get(local, ())]
            why = f"not visible in the graph of {self.prefix or '<root>'} (inside a built-in module, or unused)"
            modified |= self._set_module(module, local, _merge(found) if found else None, why,
                                         calls.get(local), local in fnorms)
        return PassResult(gm, modified)

    def call_opaque(self, region: Region) -> bool:
        """Set the parameters of an opaque region's built-in children, with gains by module type."""
        self._begin()
        if self.zero_init_residual and isinstance(region.module, Residual):
            self._zero_branch(_last_norm(region.module.body), region.module, region.path)
        why = f"inside opaque {type(region.module).__name__} (no graph)"
        # A list, not a generator: any() would stop at the first module set.
        return any([self._set_module(m, local, None, why) for local, m in self._owned(region.module)])

    def _begin(self) -> None:
        # A rewrite visits the root region first: a new run starts there (or at each direct call).
        if self.region is None or (self.tree is not None and self.region is self.tree.root):
            self._zero, self._done = set(), set()
            self._regions = {id(r.module) for r in self.tree.regions()} if self.tree is not None else set()

    def _zero_branch(self, norm: nn.Module | None, wrapper: nn.Module | None, where: str) -> None:
        """Mark ``norm`` for γ = 0, unless a zero gate already makes its block start as the body."""
        gate = getattr(wrapper, "gate", None)
        if norm is None:
            self.notes.append(f"{where}: the residual block's body ends in no norm; zero_init_residual left it")
        elif isinstance(gate, torch.Tensor) and not gate.detach().any():
            self.notes.append(f"{where}: residual wrapper has a zero gate (starts as its body); γ left at 1")
        else:
            self._zero.add(id(norm))

    def _owned(self, root: nn.Module):
        """(local name, module) for ``root`` and its descendants that are no region of their own."""
        others = self._regions - {id(root)}
        stack = [("", root)]
        while stack:
            name, module = stack.pop()
            yield name, module
            for child_name, child in reversed(list(module.named_children())):
                if id(child) not in others:
                    stack.append((f"{name}.{child_name}" if name else child_name, child))

    # -- the graph: which nonlinearity each value reaches ----------------------------------
    def _reach(self, gm: fx.GraphModule) -> dict[fx.Node, tuple]:
        """For every node, ``(activation, unknown, output)`` its value reaches, in one reverse pass.

        ``activation`` is the earliest ``(order, name, kwargs, where)`` reached; ``unknown`` says
        why some path leaves the visible graph; ``output`` is True when it is a model output.
        """
        nodes = list(gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        reach: dict[fx.Node, tuple] = {}
        for node in reversed(nodes):
            found = []
            for user in node.users:
                role, info = self._role(user, node, gm)
                if role == "act":
                    found.append(((order[user], *info), None, False))
                elif role == "through":
                    found.append(reach[user])
                elif role in ("output", "unknown"):
                    found.append((None, info, role == "output"))
            reach[node] = _merge(found)
        return reach

    def _role(self, user: fx.Node, node: fx.Node, gm: fx.GraphModule) -> tuple[str, object]:
        """What ``user`` does with ``node``'s value: act, through, output, unknown or stop/ignore."""
        if user.op == "output":
            if node.meta.get("gt_model_output") or not self.prefix:
                return "output", None
            return "unknown", f"leaves region {self.prefix} into opaque code"
        act = activation_name(user, gm)
        if act is not None:
            return "act", (act, node_activation_kwargs(user, gm), node_where(self.prefix, user))
        target = user.target
        if user.op == "call_module":
            module = gm.get_submodule(str(target))
            if not is_builtin_module(module):
                return _opaque_role(module, self.qualify(str(target)))
            return ("through", None) if isinstance(module, _THROUGH_MODULES) else ("stop", None)
        if target in _IGNORED:
            return "ignore", None
        if (user.op == "call_function" and target in _THROUGH_FUNCTIONS) or (
            user.op == "call_method" and target in _THROUGH_METHODS
        ):
            return "through", None
        if target in _SCALE and len([a for a in user.all_input_nodes if a.op != "get_attr"]) == 1:
            return "through", None  # scaling by a constant or a parameter (layer scale)
        return "stop", None  # a linear consumer: another layer, matmul, softmax, attention, …

    # -- setting parameters ------------------------------------------------------------------
    def _set_module(self, module: nn.Module, local: str, reach: tuple | None, why: str,
                    call: fx.Node | None = None, fnorm: bool = False) -> bool:
        """Set one module's own parameters and record it; returns True when anything changed."""
        where = self.qualify(local)
        is_norm = fnorm or isinstance(module, _NORMS)
        specs = [] if is_norm else _weights(module, call)
        if not (is_norm or specs) or not self.selects(where) or not self._wanted_type(module, is_norm, call):
            return False
        own = dict(module.named_parameters(recurse=False))
        params, frozen, details = [], [], {}

        def put(pname: str, value: float) -> None:
            # Only values that differ count as changes: a second application records nothing.
            p = own.get(pname)
            if self._settable(p, frozen, pname, where) and not bool((p == value).all()):
                p.fill_(value)
                params.append(pname)

        with torch.no_grad():
            if is_norm:
                gamma = 0.0 if id(module) in self._zero else 1.0
                put("weight", gamma)
                if not self.keep_bias:
                    put("bias", 0.0)
                details = {"initializer": "constant", "gamma": gamma, "beta": None if self.keep_bias else 0.0}
                what = f"γ = {gamma:g}" + (" (last norm of a residual branch)" if gamma == 0 else "")
                what += "" if self.keep_bias else ", β = 0"
            else:
                family, gain, nonlinearity, source = self._decide(module, reach, why)
                weights = {}
                for pname, fan_in, fan_out, blocks, recurrent in specs:
                    if self._settable(own.get(pname), frozen, pname, where):
                        method, g = self._method(family, gain, recurrent)
                        qual = self.qualify(f"{local}.{pname}" if local else pname)
                        info = self._fill(own[pname], qual, method, g, fan_in, fan_out, blocks)
                        if info.pop("changed"):
                            weights[pname] = info
                            params.append(pname)
                for pname in own:
                    if not self.keep_bias and _is_bias(pname):
                        put(pname, 0.0)
                first = next(iter(weights.values()), {})
                details = {**first, "nonlinearity": nonlinearity, "source": source, "graph": source.startswith("graph")}
                if len(weights) > 1:
                    details["weights"] = weights
                what = "biases zeroed" if not first else (
                    f"{first['initializer']}, gain {first['gain']:.4g} ({nonlinearity or 'linear'}), std {first['std']:.4g}")
                what += f" [by {source}]" if source.startswith("module type") else ""
        if frozen:
            self.notes.append(f"{where}: frozen parameters left alone ({', '.join(frozen)}); pass include_frozen to set them")
        if not params:
            return False
        details["params"] = [self.qualify(f"{local}.{p}" if local else p) for p in params]
        self.record(where, "initialized", what, details=details)
        return True

    def _settable(self, p: torch.Tensor | None, frozen: list[str], pname: str, where: str) -> bool:
        if p is None or id(p) in self._done or isinstance(p, nn.parameter.UninitializedParameter):
            return False  # absent, shared with a module set already, or lazy and never run
        if p.device.type == "meta":
            self.notes.append(f"{where}.{pname}: on the meta device (no values); left alone")
            return False
        if not p.requires_grad and not self.include_frozen:
            frozen.append(pname)
            return False
        self._done.add(id(p))
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

    def _decide(self, module: nn.Module, reach: tuple | None, why: str) -> tuple[str, float, str | None, str]:
        """(family, gain, nonlinearity, source) for a layer, from the graph or by module type."""
        if isinstance(module, (*_RNN, nn.MultiheadAttention)):
            return "xavier", 1.0, None, "the module's own structure (recurrent cell / attention)"
        if reach is not None and reach[0] is not None:
            _, act, kwargs, at = reach[0]
            family, gain = activation_init(act, kwargs)
            return family, gain, act, f"graph: feeds {act} at {at}"
        if reach is not None and reach[1] is None:
            return "xavier", 1.0, None, "graph: feeds no nonlinearity" + (" (a model output)" if reach[2] else "")
        if reach is not None:
            why = reach[1]
        # Without a graph: convolutions almost always feed a ReLU-family activation; a Linear
        # is as often a projection or a head, so it gets the neutral gain.
        if isinstance(module, _CONV):
            return "he", nn.init.calculate_gain("relu"), "ReLU (assumed)", f"module type: {why}"
        return "xavier", 1.0, None, f"module type: {why}"

    def _method(self, family: str, gain: float, recurrent: bool) -> tuple[str, float]:
        if self.scheme != "auto":
            return self.scheme, gain
        # Recurrent cells (gain 1): orthogonal hidden-to-hidden keeps the state's norm.
        return ("orthogonal" if recurrent else _AUTO[family]), gain

    def _fill(self, p: torch.Tensor, qual: str, method: str, gain: float, fan_in: int, fan_out: int, blocks: int) -> dict:
        """Draw ``p`` in float32 on its own device, copy it in, and describe what was drawn."""
        digest = hashlib.blake2b(f"{self.seed}/{qual}".encode(), digest_size=8).digest()
        gen = torch.Generator(device=p.device).manual_seed(int.from_bytes(digest, "little") >> 1)
        w = torch.empty(p.shape, dtype=torch.float32, device=p.device)  # QR and fp16/bf16 need float32
        flat = w.view(p.shape[0], -1)
        fan, fan_mode = None, None
        if method == "orthogonal":
            rows = p.shape[0] // blocks  # one orthogonal matrix per gate of a recurrent weight
            for i in range(blocks):
                flat[i * rows:(i + 1) * rows] = _orthogonal(rows, flat.shape[1], gen, p.device) * gain
            std = gain / math.sqrt(max(rows, flat.shape[1]))
        else:
            if method.startswith("xavier"):
                fan, fan_mode = (fan_in + fan_out) / 2, "average"
            else:
                fan, fan_mode = (fan_in, "fan_in") if self.fan == "fan_in" else (fan_out, "fan_out")
            std = gain / math.sqrt(fan)
            if method.endswith("uniform"):
                w.uniform_(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, generator=gen)
            else:
                w.normal_(0.0, std, generator=gen)
        value = w.to(p.dtype)
        changed = not torch.equal(p, value)
        if changed:
            p.copy_(value)
        return {"changed": changed, "initializer": method, "gain": gain, "fan": fan, "fan_mode": fan_mode, "fan_in": fan_in,
                "fan_out": fan_out, "std": std, "std_measured": _sample_std(w)}


def _sample_std(w: torch.Tensor) -> float:
    """The std of (up to 65,536 of) the drawn values: a check on the record, at a fixed cost."""
    sample = w.reshape(-1)[: 1 << 16]
    return float(sample.std()) if sample.numel() > 1 else 0.0


def _merge(found: list[tuple]) -> tuple:
    """Combine reach tuples: the earliest activation, the first unknown path, any output."""
    acts = [f[0] for f in found if f[0] is not None]
    unknown = next((f[1] for f in found if f[1] is not None), None)
    return (min(acts, key=lambda a: a[0]) if acts else None, unknown, any(f[2] for f in found))


def _opaque_role(module: nn.Module, where: str) -> tuple[str, object]:
    """What an opaque module does with its input, where that can be told without its graph."""
    if isinstance(module, _NORMS):  # a norm with a fused activation (timm BatchNormAct2d)
        for name, child in module.named_children():
            if type(child) in ACTIVATION_MODULES:
                act = ACTIVATION_MODULES[type(child)]
                return "act", (act, module_activation_kwargs(child), f"{where}.{name}")
        return "through", None
    if next(module.parameters(), None) is None and next(module.children(), None) is None:
        return "through", None  # parameter-free and childless: DropPath, StochasticDepth
    return "unknown", f"feeds opaque {type(module).__name__} at {where}"


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


def _is_bias(name: str) -> bool:
    return name == "bias" or name.startswith(("bias_ih", "bias_hh", "in_proj_bias"))


def _conv_fans(shape: torch.Size, groups: int, transposed: bool) -> tuple[int, int]:
    """(fan_in, fan_out) of one group; a transposed conv stores (in, out/groups, *kernel)."""
    rf = math.prod(shape[2:])
    if transposed:
        return shape[0] // groups * rf, shape[1] * rf
    return shape[1] * rf, shape[0] // groups * rf


def _weights(module: nn.Module, call: fx.Node | None = None) -> list[tuple[str, int, int, int, bool]]:
    """(name, fan_in, fan_out, row blocks, recurrent) of each weight matrix of a module."""
    if isinstance(module, _CONV):
        return [("weight", *_conv_fans(module.weight.shape, module.groups, module.transposed), 1, False)]
    if isinstance(module, nn.Linear):
        return [("weight", module.in_features, module.out_features, 1, False)]
    weight = getattr(module, "weight", None)
    if call is not None and isinstance(weight, nn.Parameter) and weight.dim() >= 2:
        if call.target is F.linear:
            return [("weight", weight.shape[1], weight.shape[0], 1, False)]
        groups = call.args[6] if len(call.args) > 6 else call.kwargs.get("groups", 1)  # conv and conv_transpose
        transposed = call.target in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
        return [("weight", *_conv_fans(weight.shape, int(groups), transposed), 1, False)]
    out = []
    if isinstance(module, _RNN):
        for name, p in module.named_parameters(recurse=False):
            if name.startswith(("weight_ih", "weight_hh")):  # gates stacked: (gates * hidden, in)
                gates = p.shape[0] // module.hidden_size
                out.append((name, p.shape[1], module.hidden_size, gates, name.startswith("weight_hh")))
            elif name.startswith("weight_hr"):
                out.append((name, p.shape[1], p.shape[0], 1, False))
    elif isinstance(module, nn.MultiheadAttention):
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("proj_weight"):
                blocks = 3 if name == "in_proj_weight" else 1
                out.append((name, p.shape[1], p.shape[0] // blocks, blocks, False))
    return out


def _orthogonal(rows: int, cols: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A (rows, cols) float32 matrix with orthonormal rows or columns, Haar-distributed."""
    a = torch.randn(max(rows, cols), min(rows, cols), generator=gen, device=device)
    q, r = torch.linalg.qr(a)
    q = q * torch.where(torch.diagonal(r) >= 0, 1.0, -1.0)  # the sign fix makes Q uniform
    return q if rows >= cols else q.T


def _is_norm(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    """The norm module an activation-free norm node applies, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _NORMS) and (is_builtin_module(module) or _opaque_role(module, "")[0] == "through"):
            return module
    elif node.op == "call_function" and node.target in _NORM_FUNCTIONS:
        for arg in node.all_input_nodes:
            owner, _, attr = str(arg.target).rpartition(".")
            if arg.op == "get_attr" and attr == "weight" and arg is not node.args[0]:
                return gm.get_submodule(owner)
    return None


def _norm_behind(node: fx.Node, gm: fx.GraphModule) -> nn.Module | None:
    """The norm whose output reaches ``node`` through activation-free, value-preserving ops."""
    while True:
        norm = _is_norm(node, gm)
        if norm is not None:
            return norm
        data = [a for a in node.all_input_nodes if a.op != "get_attr"]  # layer scale: a parameter
        if len(data) != 1:
            return None
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        steps = (
            is_dropout(node, gm)
            or (module is not None and (isinstance(module, (nn.Identity, nn.Flatten, nn.Unflatten))
                                        or (not is_builtin_module(module) and _opaque_role(module, "")[0] == "through")))
            or (node.op == "call_method" and node.target in _VIEW_METHODS)
            or (node.op != "call_module" and node.target in _SCALE)
        )
        if not steps:
            return None
        node = data[0]


def _is_act(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module" and not is_builtin_module(gm.get_submodule(str(node.target))):
        return _opaque_role(gm.get_submodule(str(node.target)), "")[0] == "act"
    return activation_name(node, gm) is not None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for arg in todo.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return seen


def _residual_norms(gm: fx.GraphModule) -> list[tuple[nn.Module | None, nn.Module | None, str]]:
    """(last norm, residual-pass wrapper or None, where) of each residual sum ``F(x) + S(x)``.

    A sum the residual pass added is one by construction (its branch is ``args[0]``); any
    other add is one when an operand's own path (not shared with the other) holds a
    nonlinearity and ends, activation-free, in a norm.
    """
    out = []
    wrapped = {w for w, kind in (getattr(gm, "gt_residual_wrapped", None) or {}).items() if kind == "block"}
    for node in gm.graph.nodes:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if node.target not in _ADDS or node.op not in ("call_function", "call_method") or len(operands) != 2:
            continue
        at = _wrapper_of(node, wrapped)
        if at is not None:
            out.append((_norm_behind(operands[0], gm), gm.get_submodule(at), at))
            continue
        ancestors: dict[fx.Node, set] = {}
        for branch, shortcut in (operands, operands[::-1]):
            norm = _norm_behind(branch, gm)
            if norm is None:
                continue
            for a in operands:
                ancestors[a] = ancestors.get(a) or _ancestors(a)
            own = ancestors[branch] - ancestors[shortcut]
            side = ancestors[shortcut] - ancestors[branch]
            if ancestors[branch] & ancestors[shortcut] and any(_is_act(n, gm) for n in own) and not any(
                _is_act(n, gm) for n in side
            ):
                out.append((norm, None, node.name))
    return out


def _wrapper_of(add: fx.Node, wrapped: set[str]) -> str | None:
    """The path of the residual-pass wrapper whose sum ``add`` is (from its module stack, or, in
    a graph captured again, from the wrapped blocks the graph lists), or None."""
    stack = list((add.meta.get("nn_module_stack") or {}).values())
    if stack and isinstance(stack[-1][1], type) and issubclass(stack[-1][1], (Residual, ResidualSpan)):
        return stack[-1][0]
    branch = add.args[0]
    path = str(branch.target) if branch.op == "call_module" else owner_path(branch)
    return next((w for w in wrapped if path.startswith(f"{w}.body")), None)


def _last_norm(body: nn.Module) -> nn.Module | None:
    """The norm a wrapped body ends in, activation-free (its graph, or a Sequential's children)."""
    if isinstance(body, fx.GraphModule):
        out = next(n for n in reversed(body.graph.nodes) if n.op == "output").args[0]
        return _norm_behind(out, body) if isinstance(out, fx.Node) else None
    for child in reversed(list(body.children()) if isinstance(body, nn.Sequential) else [body]):
        if isinstance(child, _NORMS):
            return child
        if not isinstance(child, (nn.Identity, *DROPOUT_MODULES)):
            return None
    return None


def initialize(model, example_inputs, scheme: str = "auto", *, inplace: bool = False, **kwargs):
    """Functional twin of :class:`Initialize`: re-initialise ``model`` and return the result.

    Args:
        model: the ``nn.Module`` to re-initialise.
        example_inputs: positional inputs, used for capture and shapes.
        scheme: auto, xavier-uniform, xavier-normal, he-uniform, he-normal or orthogonal.
        inplace: edit ``model`` itself instead of a copy.
        **kwargs: ``seed``, ``keep_bias``, ``fan``, ``zero_init_residual``, ``include_frozen``,
            ``types``, ``include``, ``exclude``.

    Returns:
        A :class:`~graphtricks.rewrite.RewriteResult` (``.model``, ``.report``).

    Raises:
        PassError: an unknown scheme, fan or type name.

    Example:
        >>> result = initialize(model, (torch.randn(8, 3, 32, 32),), "auto", zero_init_residual=True)
    """
    from graphtricks.rewrite import rewrite

    return rewrite(model, [Initialize(scheme, **kwargs)], example_inputs, inplace=inplace)
