"""Random architectures for the property tests: a JSON-able config, the module it builds, and
the hypothesis strategy that draws configs.

A config is plain data (dicts, lists, numbers, strings), so a saved rewrite can rebuild its
source model through the ordinary spec path: ``tests/strategies.py:build_from_config`` with
``model_args = {"config": json.dumps(config)}``. This file is imported by path when a saved
model is loaded, so it imports nothing from the ``tests`` package.

An architecture is a stack of blocks under ``body`` (an ``nn.Sequential``, an ``nn.ModuleList``
or attributes ``b0``, ``b1`` …), then a linear ``head`` with an optional output activation:

- ``layer``: Conv1d/Conv2d (random width, kernel, stride, padding, groups, bias) or Linear, with
  an optional norm (BatchNorm1d/2d, LayerNorm, GroupNorm), an optional activation in module,
  functional, ``torch.*``, method or in-place-statement form, and optional existing dropout
  (``nn.Dropout``, a ``p=0`` placeholder, or ``F.dropout(x, p, self.training)``), in one of
  three orders (layer-norm-act, layer-act-norm, norm-act-layer);
- ``to_vec``: channels-first maps to vectors (flatten in three forms, mean, adaptive pooling);
- ``mode``: a layer block wrapped by a module whose own forward depends on ``self.training``
  (noise, a scale, or functional dropout in train mode);
- ``branch``: two layer blocks of the same shape behind a data-dependent ``if``;
- ``tuned``: a layer block, then code that reads plain attributes of its module (a float scale, an
  int shift, a string choosing the activation, a tuple of weights), which fx bakes into a graph.

With ``checkpoints=True``, some blocks are called through ``torch.utils.checkpoint.checkpoint``.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ACTS",
    "Branch",
    "Counter",
    "LayerBlock",
    "ModeDependent",
    "Net",
    "Shared",
    "TUNED_VALUES",
    "Tuned",
    "ToVec",
    "activation_sites",
    "architectures",
    "block_names",
    "build_from_config",
    "wrappable_blocks",
]

# name → {form: inplace variants allowed}; forms: module, functional, torch, method, stmt.
# ``stmt`` is an in-place method call whose result is discarded (``x.relu_()``).
ACTS: dict[str, dict[str, tuple[bool, ...]]] = {
    "relu": {"module": (False, True), "functional": (False, True), "torch": (False, True), "method": (False, True), "stmt": (True,)},
    "leaky_relu": {"module": (False, True), "functional": (False, True)},
    "gelu": {"module": (False,), "functional": (False,)},
    "tanh": {"module": (False,), "functional": (False,), "torch": (False, True), "method": (False, True), "stmt": (True,)},
    "sigmoid": {"module": (False,), "functional": (False,), "torch": (False, True), "method": (False, True), "stmt": (True,)},
    "silu": {"module": (False, True), "functional": (False, True)},
    "elu": {"module": (False, True), "functional": (False, True)},
    "hardtanh": {"module": (False, True), "functional": (False, True)},
    "relu6": {"module": (False, True), "functional": (False, True)},
    "hardswish": {"module": (False, True), "functional": (False, True)},
    "selu": {"module": (False, True), "functional": (False, True), "torch": (False, True)},
    "celu": {"module": (False, True), "functional": (False, True), "torch": (False, True)},
    "prelu": {"module": (False,)},
}
# Output activations of the head (the model output: no dropout may follow them).
HEAD_ACTS = ("sigmoid", "tanh")

_MODULES = {
    "relu": lambda ip: nn.ReLU(inplace=ip),
    "leaky_relu": lambda ip: nn.LeakyReLU(0.2, inplace=ip),
    "gelu": lambda ip: nn.GELU(),
    "tanh": lambda ip: nn.Tanh(),
    "sigmoid": lambda ip: nn.Sigmoid(),
    "silu": lambda ip: nn.SiLU(inplace=ip),
    "elu": lambda ip: nn.ELU(inplace=ip),
    "hardtanh": lambda ip: nn.Hardtanh(inplace=ip),
    "relu6": lambda ip: nn.ReLU6(inplace=ip),
    "hardswish": lambda ip: nn.Hardswish(inplace=ip),
    "selu": lambda ip: nn.SELU(inplace=ip),
    "celu": lambda ip: nn.CELU(inplace=ip),
    "prelu": lambda ip: nn.PReLU(),
}
_FUNCTIONAL = {
    "relu": lambda x, ip: F.relu(x, inplace=ip),
    "leaky_relu": lambda x, ip: F.leaky_relu(x, 0.2, ip),  # inplace positional, as code often has it
    "gelu": lambda x, ip: F.gelu(x),
    "silu": lambda x, ip: F.silu(x, inplace=ip),
    "elu": lambda x, ip: F.elu(x, inplace=ip),
    "hardtanh": lambda x, ip: F.hardtanh(x, inplace=ip),
    "relu6": lambda x, ip: F.relu6(x, inplace=ip),
    "hardswish": lambda x, ip: F.hardswish(x, inplace=ip),
    "tanh": lambda x, ip: F.tanh(x),
    "sigmoid": lambda x, ip: F.sigmoid(x),
    "selu": lambda x, ip: F.selu(x, inplace=ip),
    "celu": lambda x, ip: F.celu(x, inplace=ip),
}
_TORCH = {
    "relu": (torch.relu, torch.relu_),
    "tanh": (torch.tanh, torch.tanh_),
    "sigmoid": (torch.sigmoid, torch.sigmoid_),
    "selu": (torch.selu, torch.selu_),
    "celu": (torch.celu, torch.celu_),
}


# -- the modules ---------------------------------------------------------------------------
class LayerBlock(nn.Module):
    """One Conv/Linear layer with optional norm, activation and dropout, in a configured order."""

    def __init__(self, spec: dict):
        super().__init__()
        layer = spec["layer"]
        if layer["type"] == "linear":
            self.layer = nn.Linear(layer["cin"], layer["cout"], bias=layer["bias"])
        else:
            conv = nn.Conv1d if layer["dim"] == 1 else nn.Conv2d
            self.layer = conv(layer["cin"], layer["cout"], layer["k"], stride=layer["stride"], padding=layer["pad"],
                              groups=layer["groups"], bias=layer["bias"])
        norm = spec.get("norm")
        if norm is not None:
            self.norm = _make_norm(norm)
        act = spec.get("act")
        self.act_spec = dict(act) if act else None
        if act and act["form"] == "module":
            self.act = _MODULES[act["name"]](act["inplace"])
        drop = spec.get("drop")
        self.drop_spec = dict(drop) if drop else None
        if drop and drop["form"] == "module":
            self.drop = nn.Dropout(drop["p"])
        self.ops = tuple(op for op in spec["order"] if op == "layer" or spec.get(op))

    def _act(self, x):
        a = self.act_spec
        form, name, ip = a["form"], a["name"], a["inplace"]
        if form == "module":
            return self.act(x)
        if form == "functional":
            return _FUNCTIONAL[name](x, ip)
        if form == "torch":
            return _TORCH[name][int(ip)](x)
        if form == "method":
            return getattr(x, name + ("_" if ip else ""))()
        getattr(x, name + "_")()  # in-place statement: later readers of x see the activation
        return x

    def _drop(self, x):
        d = self.drop_spec
        if d["form"] == "module":
            return self.drop(x)
        return F.dropout(x, d["p"], self.training)  # the block's own code depends on the mode

    def forward(self, x):
        for op in self.ops:
            if op == "layer":
                x = self.layer(x)
            elif op == "norm":
                x = self.norm(x)
            elif op == "act":
                x = self._act(x)
            else:
                x = self._drop(x)
        return x


class ToVec(nn.Module):
    """Channels-first maps (N, C, *) to vectors (N, F)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.how = spec["how"]
        self.rank = spec["rank"]
        if self.how == "module":
            self.flat = nn.Flatten(1)
        elif self.how == "pool":
            self.pool = nn.AdaptiveAvgPool1d(1) if self.rank == 3 else nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        if self.how == "method":
            return x.flatten(1)
        if self.how == "function":
            return torch.flatten(x, 1)
        if self.how == "module":
            return self.flat(x)
        if self.how == "mean":
            return x.mean(dim=tuple(range(2, self.rank)))
        return self.pool(x).flatten(1)


class ModeDependent(nn.Module):
    """A block whose own forward depends on ``self.training`` (fx would bake the mode in)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.variant = spec["variant"]
        self.inner = LayerBlock(spec["inner"])

    def forward(self, x):
        x = self.inner(x)
        if self.training:
            if self.variant == "noise":
                x = x + 0.1 * torch.randn_like(x)
            elif self.variant == "scale":
                x = x * 0.5
            else:
                x = F.dropout(x, 0.25, True)
        return x


class Branch(nn.Module):
    """Two blocks of the same shape behind a data-dependent condition (fx cannot trace it)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.cond = spec["cond"]
        self.inner = LayerBlock(spec["inner"])
        self.other = LayerBlock(spec["other"])

    def forward(self, x):
        # "always" is true for finite inputs but still data-dependent: an ONNX trace bakes in
        # the branch taken, so exported graphs agree with eager mode on every input.
        hit = x.mean() > 0 if self.cond == "pos_mean" else x.abs().sum() >= 0
        if hit:
            return self.inner(x)
        return self.other(x)


class Counter(nn.Module):
    """A block that updates its own buffers in forward (a step count and a running mean)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.inner = LayerBlock(spec["inner"])
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(()))

    def forward(self, x):
        x = self.inner(x)
        self.steps += 1
        self.ema.mul_(0.9).add_(0.1 * x.detach().mean())
        return x


class Shared(nn.Module):
    """One shape-keeping block registered under two names and called twice."""

    def __init__(self, spec: dict):
        super().__init__()
        self.inner = LayerBlock(spec["inner"])
        self.again = self.inner

    def forward(self, x):
        return self.again(self.inner(x))


class Tuned(nn.Module):
    """A block whose own code reads plain attributes: fx bakes their values into its graph."""

    def __init__(self, spec: dict):
        super().__init__()
        self.inner = LayerBlock(spec["inner"])
        self.scale = float(spec["scale"])
        self.shift = int(spec["shift"])
        self.how = str(spec["how"])
        self.mix = tuple(spec["mix"])

    def forward(self, x):
        x = self.inner(x)
        if self.how == "relu":
            y = F.relu(x)
        elif self.how == "tanh":
            y = torch.tanh(x)
        else:
            y = x.abs()
        y = y * self.scale
        if self.shift:
            y = y.roll(self.shift, -1)
        return y * self.mix[0] + x * self.mix[1]


TUNED_VALUES = {"scale": (0.5, 1.0, 2.0), "shift": (0, 1, 2), "how": ("relu", "tanh", "abs"),
                "mix": ((1.0, 0.0), (0.5, 0.5), (1.0, 1.0))}

_BLOCKS = {"layer": LayerBlock, "to_vec": ToVec, "mode": ModeDependent, "branch": Branch, "counter": Counter,
           "shared": Shared, "tuned": Tuned}


class Net(nn.Module):
    """The generated architecture: blocks under ``body`` (or ``b0``, ``b1``…), then ``head``."""

    def __init__(self, config: dict):
        super().__init__()
        self.container = config["container"]
        blocks = [_BLOCKS[b["kind"]](b) for b in config["blocks"]]
        if self.container == "sequential":
            self.body = nn.Sequential(*blocks)
        elif self.container == "modulelist":
            self.body = nn.ModuleList(blocks)
        else:
            self.names = tuple(f"b{i}" for i in range(len(blocks)))
            for name, block in zip(self.names, blocks):
                self.add_module(name, block)
        self.checkpointed = tuple(config.get("checkpoint", ()))  # blocks called through checkpoint()
        head = config["head"]
        self.head = nn.Linear(head["cin"], head["cout"])
        self.head_act = dict(head["act"]) if head.get("act") else None
        if self.head_act and self.head_act["form"] == "module":
            self.out_act = _MODULES[self.head_act["name"]](False)

    def forward(self, x):
        if self.container == "sequential":
            x = self.body(x)
        elif self.container == "modulelist":
            for i, block in enumerate(self.body):
                x = checkpoint(block, x, use_reentrant=False) if i in self.checkpointed else block(x)
        else:
            for i, name in enumerate(self.names):
                block = getattr(self, name)
                x = checkpoint(block, x, use_reentrant=False) if i in self.checkpointed else block(x)
        x = self.head(x)
        a = self.head_act
        if a is None:
            return x
        if a["form"] == "module":
            return self.out_act(x)
        if a["form"] == "torch":
            return _TORCH[a["name"]][0](x)
        return getattr(x, a["name"])()


def _make_norm(norm: dict) -> nn.Module:
    kind, c = norm["type"], norm["c"]
    if kind == "bn1d":
        return nn.BatchNorm1d(c, affine=norm["affine"], track_running_stats=norm["track"])
    if kind == "bn2d":
        return nn.BatchNorm2d(c, affine=norm["affine"], track_running_stats=norm["track"])
    if kind == "gn":
        return nn.GroupNorm(norm["groups"], c, affine=norm["affine"])
    return nn.LayerNorm(norm["shape"], elementwise_affine=norm["affine"])


def build_from_config(config: str | dict) -> nn.Module:
    """Build a generated architecture from its config (a dict, or its JSON text).

    Weights come from the global RNG: seed it first for reproducible weights.

    Example:
        >>> model = build_from_config(json.dumps(config))
    """
    if isinstance(config, str):
        config = json.loads(config)
    return Net(config)


# -- what the config says about the model (the tests' ground truth) ----------------------------
def block_names(config: dict) -> list[str]:
    """Qualified names of the top-level blocks."""
    n = len(config["blocks"])
    return [f"b{i}" for i in range(n)] if config["container"] == "attrs" else [f"body.{i}" for i in range(n)]


def wrappable_blocks(config: dict) -> list[str]:
    """Top-level blocks that take one tensor and return one of the same rank (residual candidates)."""
    return [name for name, b in zip(block_names(config), config["blocks"]) if b["kind"] != "to_vec"]


def _layer_sites(spec: dict, path: str, ran: bool, opaque_parent: bool):
    """Activation sites of one layer block (see :func:`activation_sites`)."""
    act = spec.get("act")
    if not act:
        return []
    ops = [op for op in spec["order"] if op == "layer" or spec.get(op)]
    drop = spec.get("drop")
    opaque = bool(drop and drop["form"] == "functional")  # F.dropout(x, p, self.training)
    after = ops[ops.index("act") + 1] if ops.index("act") + 1 < len(ops) else None
    followed = None
    if after == "drop":  # in opaque code too: F.dropout(x, p, self.training) follows it
        followed = "placeholder" if drop["p"] == 0 else "dropout"
    return [{
        "path": path,
        "name": act["name"],
        "form": act["form"],
        "ran": ran,
        # Graph-visible: a traced block, or an activation module of an opaque one that ran
        # (wrapped). A block that did not run is traced without inputs, and with no shape run
        # to tell, its output might be the model's: an activation that ends it is left alone.
        "reachable": (not opaque and (ran or after is not None)) or (ran and act["form"] == "module"),
        "followed": followed,
    }]


def activation_sites(config: dict, ran: set[str]) -> list[dict]:
    """Every activation of the architecture except the head's (a model output).

    Args:
        config: the architecture.
        ran: qualified names of the layer blocks that ran on the example inputs.

    Returns:
        One dict per activation: ``path`` of its block, ``name``, ``form``, ``ran``,
        ``reachable`` (a pass can see it) and ``followed`` (``"dropout"``, ``"placeholder"``
        for an existing ``nn.Dropout(p=0)`` right after it, or None).
    """
    sites = []
    for name, b in zip(block_names(config), config["blocks"]):
        if b["kind"] == "layer":
            sites += _layer_sites(b, name, name in ran, False)
        elif b["kind"] == "mode":
            sites += _layer_sites(b["inner"], f"{name}.inner", f"{name}.inner" in ran, True)
        elif b["kind"] == "branch":
            for part in ("inner", "other"):
                sites += _layer_sites(b[part], f"{name}.{part}", f"{name}.{part}" in ran, True)
    return sites


# -- the strategy ---------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _activation(draw, allow_inplace: bool = True, names=None):
    name = draw(st.sampled_from(sorted(names or ACTS)))
    form = draw(st.sampled_from(sorted(ACTS[name])))
    variants = [v for v in ACTS[name][form] if allow_inplace or not v]
    if not variants:  # stmt is in-place only
        form = "module"
        variants = [False]
    return {"name": name, "form": form, "inplace": draw(st.sampled_from(variants))}


@st.composite
def _norm(draw, shape: tuple[int, ...], untracked_bn: bool = True, min_elems: int = 1):
    """A norm for inputs of ``shape``, or None when none normalises over ``min_elems`` values."""
    c, rank, positions = shape[1], len(shape), math.prod(shape[2:])
    bn_type = "bn1d" if rank < 4 else "bn2d"
    # BatchNorm's own group is the batch; bn_to_ln swaps it for a norm over the C channels.
    options = {bn_type: c >= min_elems}
    groups = [g for g in _divisors(c) if c // g * positions >= min_elems]
    options["gn"] = bool(groups)
    ln_shapes = [list(shape[1:])] + ([list(shape[-1:])] if rank > 2 else [])
    ln_shapes = [s for s in ln_shapes if math.prod(s) >= min_elems]
    options["ln"] = bool(ln_shapes)
    kinds = [k for k, ok in options.items() if ok]
    if not kinds:
        return None
    kind = draw(st.sampled_from(kinds))
    affine = draw(st.booleans())
    if kind.startswith("bn"):
        track = draw(st.booleans() | st.just(True)) if untracked_bn else True
        return {"type": kind, "c": c, "affine": affine, "track": track}
    if kind == "gn":
        return {"type": "gn", "c": c, "groups": draw(st.sampled_from(groups)), "affine": affine}
    # LayerNorm over the trailing dims: features of a vector, (C, *spatial) or the last dim of a map
    return {"type": "ln", "c": c, "shape": draw(st.sampled_from(ln_shapes)), "affine": affine}


@st.composite
def _layer_block(draw, shape: tuple[int, ...], first: bool, modes: bool = True, same_shape: dict | None = None,
                 untracked_bn: bool = True, min_norm: int = 1):
    """A layer block taking ``shape``; returns (spec, output shape)."""
    rank = len(shape)
    cin = shape[1]
    if same_shape is not None:
        layer = dict(same_shape)
    elif rank == 2:
        layer = {"type": "linear", "cin": cin, "cout": draw(st.integers(2, 8)), "bias": draw(st.booleans())}
    else:
        cout = draw(st.sampled_from([2, 3, 4, 6, 8]))
        k = draw(st.sampled_from([1, 3]))
        pad = draw(st.sampled_from([0, k // 2]))
        size = min(shape[2:])
        stride = draw(st.sampled_from([1, 2]))
        if size + 2 * pad < k:
            pad = k // 2
        groups = draw(st.sampled_from(_divisors(math.gcd(cin, cout))))
        layer = {"type": "conv", "dim": rank - 2, "cin": cin, "cout": cout, "k": k, "stride": stride, "pad": pad,
                 "groups": groups, "bias": draw(st.booleans())}
    if layer["type"] == "linear":
        out = (shape[0], layer["cout"])
    else:
        sp = tuple((s + 2 * layer["pad"] - layer["k"]) // layer["stride"] + 1 for s in shape[2:])
        out = (shape[0], layer["cout"], *sp)
    order = draw(st.sampled_from(["post", "post_act_first", "pre"]))
    spec: dict = {"kind": "layer", "layer": layer}
    spec["order"] = {"post": ["layer", "norm", "act", "drop"], "post_act_first": ["layer", "act", "norm", "drop"],
                     "pre": ["norm", "act", "layer", "drop"]}[order]
    norm_shape = shape if order == "pre" else out
    spec["norm"] = draw(st.none() | _norm(norm_shape, untracked_bn, min_norm))
    # In place only where it cannot hurt: never on the block's input (the model input, or a
    # value an earlier op needs for its gradient), so a "pre" block needs its norm first.
    allow_inplace = order != "pre" or spec["norm"] is not None
    spec["act"] = draw(st.none() | _activation(allow_inplace=allow_inplace))
    forms = ["module", "placeholder"] + (["functional"] if modes else [])
    drop_form = draw(st.none() | st.sampled_from(forms))
    if drop_form is None:
        spec["drop"] = None
    elif drop_form == "placeholder":
        spec["drop"] = {"form": "module", "p": 0.0}
    else:
        spec["drop"] = {"form": drop_form, "p": draw(st.sampled_from([0.1, 0.25, 0.5]))}
    return spec, out


@st.composite
def architectures(draw, *, modes: bool = True, mode_variants=("noise", "scale", "dropout"), branches: str = "any",
                  untracked_bn: bool = True, min_norm: int = 1, max_blocks: int = 5, state: bool = False,
                  tuned: bool = False, checkpoints: bool = False):
    """Draw an architecture config.

    Args:
        modes: allow mode-dependent code (``mode`` blocks, ``F.dropout(x, p, self.training)``).
        mode_variants: what ``mode`` blocks do in train mode: ``noise`` (``torch.randn_like``),
            ``scale`` (``x * 0.5``), ``dropout`` (``F.dropout(x, 0.25, True)``).
        untracked_bn: allow BatchNorm with ``track_running_stats=False`` (batch statistics in
            eval mode too).
        min_norm: the fewest values a norm may normalise over (BatchNorm: its channels, which
            bn_to_ln normalises over). A norm over one or two values is ill-conditioned (a group of
            one gives a constant, which the next norm then divides by sqrt(eps)): exact in PyTorch,
            but no tolerance holds when ONNX Runtime computes it another way.
        branches: ``"any"``, ``"always"`` (only branches whose condition is always true, so an
            ONNX trace agrees with eager mode on every input) or ``"none"``.
        max_blocks: the most blocks before the head.
        state: also ``counter`` blocks (buffers updated in forward) and ``shared`` blocks (one
            block under two names, called twice).
        tuned: also ``tuned`` blocks (code that reads plain attributes; at least one).
        checkpoints: call some blocks through ``torch.utils.checkpoint.checkpoint`` (at least one;
            the container is then a ModuleList or attributes).
    """
    rank = draw(st.sampled_from([2, 3, 4]))
    n = 2
    if rank == 2:
        shape: tuple[int, ...] = (n, draw(st.integers(2, 8)))
    else:
        c = draw(st.integers(1, 4))
        size = draw(st.integers(3, 9))
        shape = (n, c, size) if rank == 3 else (n, c, size, draw(st.integers(3, 9)))
    input_shape = list(shape)
    blocks = []
    count = draw(st.integers(1, max_blocks))
    kinds = ["layer", "layer", "layer", "to_vec"] + (["mode"] if modes else []) + ([] if branches == "none" else ["branch"])
    kinds += ["counter", "shared"] if state else []
    kinds += ["tuned", "tuned"] if tuned else []
    for i in range(count):
        kind = draw(st.sampled_from(kinds))
        if tuned and i == count - 1 and not any(b.get("kind") == "tuned" for b in blocks):
            kind = "tuned"
        if kind == "to_vec" and len(shape) == 2:
            kind = "layer"
        if kind == "to_vec":
            how = draw(st.sampled_from(["method", "function", "module", "mean", "pool"]))
            blocks.append({"kind": "to_vec", "how": how, "rank": len(shape)})
            feats = shape[1] * math.prod(shape[2:]) if how in ("method", "function", "module") else shape[1]
            shape = (shape[0], feats)
            continue
        spec, out = draw(_layer_block(shape, first=i == 0, modes=modes, untracked_bn=untracked_bn, min_norm=min_norm))
        if kind == "shared":
            c = shape[1]
            same = ({"type": "linear", "cin": c, "cout": c, "bias": True} if len(shape) == 2 else
                    {"type": "conv", "dim": len(shape) - 2, "cin": c, "cout": c, "k": 3, "stride": 1, "pad": 1,
                     "groups": 1, "bias": True})
            spec, out = draw(_layer_block(shape, first=i == 0, modes=modes, same_shape=same,
                                          untracked_bn=untracked_bn, min_norm=min_norm))
            blocks.append({"kind": "shared", "inner": spec})
        elif kind == "counter":
            blocks.append({"kind": "counter", "inner": spec})
        elif kind == "tuned":
            values = {k: draw(st.sampled_from(v)) for k, v in TUNED_VALUES.items()}
            blocks.append({"kind": "tuned", "inner": spec, **values})
        elif kind == "layer":
            blocks.append(spec)
        elif kind == "mode":
            variant = draw(st.sampled_from(list(mode_variants)))
            blocks.append({"kind": "mode", "variant": variant, "inner": spec})
        else:
            other, _ = draw(_layer_block(shape, first=i == 0, modes=modes, same_shape=spec["layer"],
                                         untracked_bn=untracked_bn, min_norm=min_norm))
            cond = "always" if branches == "always" else draw(st.sampled_from(["pos_mean", "always"]))
            blocks.append({"kind": "branch", "cond": cond, "inner": spec, "other": other})
        shape = out
    if len(shape) > 2:
        how = draw(st.sampled_from(["method", "mean", "pool"]))
        blocks.append({"kind": "to_vec", "how": how, "rank": len(shape)})
        shape = (shape[0], shape[1] * math.prod(shape[2:]) if how == "method" else shape[1])
    head_act = draw(st.none() | st.builds(
        lambda name, form: {"name": name, "form": form, "inplace": False},
        st.sampled_from(HEAD_ACTS), st.sampled_from(["module", "torch", "method"])))
    containers = ["modulelist", "attrs"] if checkpoints else ["sequential", "modulelist", "attrs"]
    config = {
        "input": input_shape,
        "container": draw(st.sampled_from(containers)),
        "blocks": blocks,
        "head": {"cin": shape[1], "cout": draw(st.integers(1, 3)), "act": head_act},
    }
    if checkpoints:
        config["checkpoint"] = draw(st.lists(st.integers(0, len(blocks) - 1), min_size=1, max_size=2, unique=True))
    return config
