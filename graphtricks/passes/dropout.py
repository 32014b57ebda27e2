"""Dropout after activations: the seed technique of graphtricks.

After every activation (module, functional, method or in-place form) a dropout module is
inserted, named after the activation (``layer1.0.relu_dropout``), and every user of the
activation sees the dropped tensor. Eval-mode output is bitwise unchanged: ``nn.Dropout`` is
the identity in eval mode.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from graphtricks.capture import Region
from graphtricks.capture.shapes import tensor_meta
from graphtricks.errors import PassError
from graphtricks.fxgraph.activations import (
    ACTIVATION_MODULES,
    activation_name,
    normalise_activation_name,
)
from graphtricks.fxgraph.adopt import adopt_graph, compile_when_called
from graphtricks.fxgraph.lookup import submodule
from graphtricks.fxgraph.nodes import (
    feeds_model_output,
    insert_module_after,
    is_dropout,
    mutates_input,
    node_where,
    owner_path,
    unique_attr_name,
)
from graphtricks.passes.base import GraphtricksPass, as_patterns, register_pass

__all__ = ["InsertDropout", "DROPOUT_KINDS"]

DROPOUT_KINDS = ("element", "channel")
_CHANNEL_BY_RANK = {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}
# Their own forward depends on self.training, so they cannot be re-traced as a wrapper.
_UNWRAPPABLE = (nn.RReLU,)


@register_pass
class InsertDropout(GraphtricksPass):
    """Insert dropout after activations.

    Args:
        p: probability of zeroing an element (or channel), in [0, 1). p = 0 inserts nothing.
        kind: ``"element"`` (``nn.Dropout``) or ``"channel"`` (``nn.Dropout1d/2d/3d`` chosen by
            the activation's rank; channels-first layout, vectors fall back to ``nn.Dropout``).
        activations: activation names to follow (``["ReLU", "GELU"]``); empty = all.
        gates: also follow gates — a Sigmoid/Hardsigmoid whose every user multiplies it with
            another tensor (squeeze-excitation, gated units). Off by default: dropping a gate
            zeroes what it scales; each region notes how many it skipped.
        include: qualified-name globs to edit; empty = everything.
        exclude: qualified-name globs never edited.

    Raises:
        PassError: p outside [0, 1), an unknown kind or activation name.

    Example:
        >>> result = gt.rewrite(model, [InsertDropout(p=0.1)], example_inputs=(x,))
    """

    name = "dropout"
    preserves_eval = True

    def __init__(
        self, p: float = 0.1, *, kind: str = "element", activations=(), gates: bool = False, include=(), exclude=(),
        strict: bool = True,
    ):
        super().__init__(include=include, exclude=exclude, strict=strict)
        self.gates = bool(gates)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise PassError(f"dropout probability must be in [0, 1), got {p!r}")
        if kind not in DROPOUT_KINDS:
            raise PassError(f"unknown dropout kind {kind!r}; choose one of {', '.join(DROPOUT_KINDS)}")
        try:
            self.activations = tuple(normalise_activation_name(a) for a in as_patterns(activations, "dropout: activations"))
        except ValueError as e:
            raise PassError(f"dropout: {e}") from e
        self.p = float(p)
        self.kind = kind

    def options(self) -> dict:
        out = {"p": self.p, "kind": self.kind}
        if self.activations:
            out["activations"] = list(self.activations)
        if self.gates:
            out["gates"] = True
        return out

    def skip_reason(self) -> str | None:
        return "dropout p = 0: nothing to insert" if self.p == 0 else None

    def _dropout(self, rank: int | None) -> nn.Module:
        if self.kind == "channel" and rank in _CHANNEL_BY_RANK:
            return _CHANNEL_BY_RANK[rank](self.p)
        return nn.Dropout(self.p)

    def _wanted(self, act: str | None, where: str) -> bool:
        return act is not None and (not self.activations or act in self.activations) and self.selects(where)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Insert dropout after the selected activations of one traced region."""
        if self.p == 0:
            return PassResult(graph_module, False)
        gm = graph_module
        modified = False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        gates = 0
        for node in list(gm.graph.nodes):
            act = activation_name(node, gm)
            where = node_where(self.prefix, node)
            if not self._wanted(act, where):
                continue
            if not self.gates and act in _GATES and _only_scales(node):
                gates += 1  # squeeze-excitation / gated unit: dropping a gate zeroes what it scales
                continue
            aliases = _later_alias_users(node, gm, order)
            if not node.users and not aliases:
                continue  # dead value
            followers = [u for u in (*node.users, *aliases) if is_dropout(u, gm)]
            if followers:
                # Already followed by dropout: applying twice changes nothing. A placeholder
                # nn.Dropout(p=0) (timm, Hugging Face) is given the requested p instead.
                self._raise_placeholder(gm, followers, where, act)
                continue
            if feeds_model_output(node, gm):
                self.notes.append(f"{where}: {act} output is a model output; no dropout after it")
                continue
            meta = tensor_meta(node)
            module = self._dropout(len(meta.shape) if meta is not None else None)
            path = unique_attr_name(gm, *_dropout_path(node))
            new = insert_module_after(gm, node, path, module)
            for user in aliases:  # in-place activation: later readers of its input see it too
                user.replace_input_with(node.args[0], new)
            self.record(
                where,
                "inserted",
                f"{module} after {act}",
                details={"module": self.qualify(path), "node": node.name, "p": self.p},
            )
            modified = True
        if gates:  # by design, so a count in the report (Report.skipped), not a note
            self.skipped["gates"] = self.skipped.get("gates", 0) + gates
        if modified:
            gm.graph.lint()
            compile_when_called(gm)
        return PassResult(gm, modified)

    def _raise_placeholder(self, gm: fx.GraphModule, followers: list[fx.Node], where: str, act: str) -> None:
        for user in followers:
            module = submodule(gm, user.target) if user.op == "call_module" else None
            if isinstance(module, nn.Dropout) and module.p == 0:
                module.p = self.p
                self.record(
                    where,
                    "updated",
                    f"existing {type(module).__name__} after {act}: p 0 -> {self.p}",
                    details={"module": self.qualify(str(user.target)), "p": self.p},
                )

    def call_opaque(self, region: Region) -> bool:
        """Wrap built-in activation children of an opaque module as ``activation → dropout``."""
        if self.p == 0:
            return False
        modified = False
        for name, child in list(region.module.named_children()):
            if type(child) not in ACTIVATION_MODULES:
                continue
            act = ACTIVATION_MODULES[type(child)]
            where = region.qualify(name)
            if not self._wanted(act, where):
                continue
            info = region.leaf_info.get(name, {})
            if "shape" not in info:
                self.notes.append(f"{where}: {act} did not run on the example inputs; left alone")
                continue
            if info.get("is_model_output"):
                self.notes.append(f"{where}: {act} output is a model output; no dropout after it")
                continue
            if isinstance(child, _UNWRAPPABLE):
                self.notes.append(f"{where}: {act} depends on the training mode; left alone")
                continue
            # The activation itself runs a graph ``act → dropout`` (its class, name and hooks kept).
            adopt_graph(child, fx.Tracer().trace(child))
            act_node = next(n for n in child.graph.nodes if n.op == "call_function")
            module = self._dropout(len(info["shape"]))
            insert_module_after(child, act_node, "dropout", module)
            child.graph.lint()
            child.recompile()
            region.children.append(Region(where, "traced", child, f"{act} given dropout"))
            self.record(
                where,
                "wrapped",
                f"{module} after {act} (inside opaque {type(region.module).__name__})",
                details={"module": f"{where}.dropout", "p": self.p},
            )
            modified = True
        return modified


_GATES = ("Sigmoid", "Hardsigmoid")
_MULS = {operator.mul, operator.imul, torch.mul}


def _only_scales(node: fx.Node) -> bool:
    """True when every user of ``node`` multiplies it with another tensor (a gate)."""
    def scales(user: fx.Node) -> bool:
        is_mul = (user.op == "call_function" and user.target in _MULS) or (user.op == "call_method" and user.target in ("mul", "mul_"))
        others = [a for a in user.args if a is not node]
        return is_mul and len(user.args) == 2 and len(others) == 1 and isinstance(others[0], fx.Node)
    return bool(node.users) and all(scales(u) for u in node.users)


def _dropout_path(node: fx.Node) -> tuple[str, str]:
    """(parent path, base name) for the dropout module following ``node``."""
    if node.op == "call_module":
        parent, _, leaf = str(node.target).rpartition(".")
        return parent, f"{leaf}_dropout"
    return owner_path(node), f"{node.name}_dropout"


def _later_alias_users(node: fx.Node, gm: fx.GraphModule, order: dict) -> list[fx.Node]:
    """Users of an in-place activation's input that run after it (they read the activated value)."""
    if not node.args or not isinstance(node.args[0], fx.Node) or not mutates_input(node, gm):
        return []
    src = node.args[0]
    return [u for u in src.users if u is not node and order.get(u, -1) > order[node]]
