"""Dropout after activations: the seed technique of graphtricks.

After every activation (module, functional, method or in-place form) a dropout module is
inserted, named after the activation (``layer1.0.relu_dropout``), and every user of the
activation sees the dropped tensor. Eval-mode output is bitwise unchanged: ``nn.Dropout`` is
the identity in eval mode.

The same rules hold in traced and opaque code: never after a value that is a model output, nor
after one that does not depend on the model's inputs (parameters or buffers only), nor (unless
asked) after a gate; an activation already followed by dropout keeps that one, and a placeholder
dropout with p = 0 gets the requested p. In opaque code the dropout is applied at the caller
(``layers/caller_dropout.py``); what opaque code does with a value is seen by a probe
(``dropout_sites.py``). When the pass changes nothing, its notes say why, activation by activation.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from graphtricks.capturing.shapes import tensor_meta
from graphtricks.errors import PassError
from graphtricks.fxgraph.activations import activation_name, normalise_activation_name
from graphtricks.fxgraph.adopt import compile_when_called
from graphtricks.fxgraph.dataflow import data_nodes
from graphtricks.fxgraph.kinds import VIEW_METHODS
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
from graphtricks.passes.base import GraphtricksPass, PassRun, as_patterns, register_pass
from graphtricks.passes.dropout_opaque import GATES, OpaqueDropout
from graphtricks.passes.dropout_sites import probe_sites

__all__ = ["InsertDropout", "DROPOUT_KINDS"]

DROPOUT_KINDS = ("element", "channel")
_CHANNEL_BY_RANK = {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}
# Why an activation is left alone by design: the keys of the pass's ``skipped`` counts.
_WHY = {
    "gates": "is a gate (its output only scales another tensor); gates=True / --dropout-gates includes it",
    "input_independent": "does not depend on the model's inputs (parameters, buffers or shapes only);"
                 " constants=True / --dropout-constants includes it",
    "followed_by_dropout": "already followed by",
    "in_opaque_code": "computed by opaque code itself; no dropout can follow it",
}


@register_pass
class InsertDropout(OpaqueDropout, GraphtricksPass):
    """Insert dropout after activations.

    Args:
        p: probability of zeroing an element (or channel), in [0, 1). p = 0 inserts nothing.
        kind: ``"element"`` (``nn.Dropout``) or ``"channel"`` (``nn.Dropout1d/2d/3d`` chosen by
            the activation's rank; channels-first layout, vectors fall back to ``nn.Dropout``).
        activations: activation names to follow (``["ReLU", "GELU"]``); empty = all.
        gates: also follow gates — a Sigmoid/Hardsigmoid whose every user multiplies it with
            another tensor (squeeze-excitation, gated units). Off by default: dropping a gate
            zeroes what it scales; each region notes how many it skipped.
        constants: also follow activations whose value does not depend on the model's inputs
            (computed from parameters or buffers only: a learnt gate ``sigmoid(self.alpha)``, a
            position-bias MLP on a coordinates table). Off by default: they are no data.
        include: qualified-name globs to edit; empty = everything.
        exclude: qualified-name globs never edited.

    What it leaves alone by design is counted in the run's ``skipped`` (``gates``,
    ``input_independent``, ``followed_by_dropout``, ``in_opaque_code``); a model output is a note.
    When it changes nothing, each of those activations is a note of its own, saying why.

    Raises:
        PassError: p outside [0, 1), an unknown kind or activation name.

    Example:
        >>> result = gt.rewrite(model, [InsertDropout(p=0.1)], example_inputs=(x,))
    """

    name = "dropout"
    preserves_eval = True

    def __init__(
        self, p: float = 0.1, *, kind: str = "element", activations=(), gates: bool = False, constants: bool = False,
        include=(), exclude=(), strict: bool = True,
    ):
        super().__init__(include=include, exclude=exclude, strict=strict)
        self.gates = bool(gates)
        self.constants = bool(constants)
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
        if self.constants:
            out["constants"] = True
        return out

    def skip_reason(self) -> str | None:
        return "dropout p = 0: nothing to insert" if self.p == 0 else None

    def _dropout(self, rank: int | None) -> nn.Module:
        if self.kind == "channel" and rank in _CHANNEL_BY_RANK:
            return _CHANNEL_BY_RANK[rank](self.p)
        return nn.Dropout(self.p)

    def _wanted(self, act: str | None, where: str) -> bool:
        return act is not None and (not self.activations or act in self.activations) and self.selects(where)

    # -- the run: a probe of opaque code first, the reasons per activation last -----------------
    def begin(self) -> None:
        self.state.sites = []  # (where, why) of each activation left alone, for notes
        self.state.pending = []  # functional placeholders whose p's attribute a second probe finds
        self.state.probe = None
        tree = self.tree
        if tree is not None and (tree.root.kind == "opaque" or tree.root.children) and self.p > 0:
            try:
                self.state.probe = probe_sites(tree, self.example_inputs, self.example_kwargs)
            except Exception as e:  # the model's own error, whatever its type
                raise PassError(f"dropout: the forward that watches opaque code failed: {type(e).__name__}: {e}") from e

    def run(self, run: PassRun) -> PassRun:
        """Apply to every region, confirm placeholder attributes, and say why where nothing changed."""
        super().run(run)
        with self.bound(run):
            if self.state.pending:
                self._confirm_placeholders()
            if not run.changes:  # the report says why, activation by activation
                for where, why in self.state.sites:
                    self.notes.append(f"{where}: {why}")
        return run

    def _skip(self, where: str, key: str, act: str, what: str = "") -> None:
        """Leave one activation alone by design: counted, and kept for the notes."""
        self.skipped[key] = self.skipped.get(key, 0) + 1
        why = f"already followed by {what}; no second dropout" if key == "followed_by_dropout" else _WHY[key]
        self.state.sites.append((where, f"{act} {why}"))

    # -- traced regions ------------------------------------------------------------------------
    def _data(self, gm: fx.GraphModule) -> set[fx.Node]:
        """The nodes of ``gm`` that carry data (all placeholders, unless the probe says otherwise)."""
        probe = self._run.state.probe if self._run is not None and hasattr(self._run.state, "probe") else None
        region = self._run.region if self._run is not None else None
        inputs = probe.data_inputs.get(id(gm)) if probe is not None and region is not None and region.path else None
        return data_nodes(gm, inputs)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Insert dropout after the selected activations of one traced region."""
        if self.p == 0:
            return PassResult(graph_module, False)
        gm = graph_module
        if not hasattr(self.state, "sites"):  # run on one graph module alone
            self.begin()
        modified = False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        data = self._data(gm)
        for node in list(gm.graph.nodes):
            act = activation_name(node, gm)
            where = node_where(self.prefix, node)
            if not self._wanted(act, where):
                continue
            aliases = _later_alias_users(node, gm, order)
            if not node.users and not aliases:
                continue  # dead value
            if not self.constants and node not in data:
                self._skip(where, "input_independent", act)
                continue
            if not self.gates and act in GATES and _only_scales(node):
                self._skip(where, "gates", act)  # dropping a gate zeroes what it scales
                continue
            # A functional dropout with p = 0 in a graph has its mode baked in: no placeholder to raise.
            followers = [u for u in (*node.users, *aliases) if is_dropout(u, gm) and (u.op == "call_module" or _functional_p(u) != 0)]
            if followers:
                # Already followed by dropout: applying twice changes nothing. A placeholder with
                # p = 0 (timm, Hugging Face) is given the requested p instead.
                modified |= self._follow_existing(gm, followers, where, act)
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
        if modified:
            gm.graph.lint()
            compile_when_called(gm)
        return PassResult(gm, modified)

    def _follow_existing(self, gm: fx.GraphModule, followers: list[fx.Node], where: str, act: str) -> bool:
        """Give placeholder dropouts (p = 0) after an activation the requested p; True if any."""
        changed = False
        for user in followers:
            module = submodule(gm, user.target) if user.op == "call_module" else None
            p = module.p if module is not None else _functional_p(user)
            if p != 0:
                what = f"{type(module).__name__}(p={p})" if module is not None else f"{user.target.__name__}(p={p})"
                self._skip(where, "followed_by_dropout", act, what)
                continue
            module.p = self.p
            self.record(where, "updated", f"existing {type(module).__name__} after {act}: p 0 -> {self.p}",
                        details={"module": self.qualify(str(user.target)), "p": self.p})
            changed = True
        return changed


_MULS = {operator.mul, operator.imul, torch.mul}


def _only_scales(node: fx.Node) -> bool:
    """True when every user of ``node`` multiplies it with another tensor (a gate), also through
    views of it (``sigmoid(a).view(1, -1, 1, 1) * x``)."""
    def scales(user: fx.Node, value: fx.Node) -> bool:
        if user.op == "call_method" and user.target in VIEW_METHODS and user.args and user.args[0] is value:
            return bool(user.users) and all(scales(u, user) for u in user.users)
        is_mul = (user.op == "call_function" and user.target in _MULS) or (user.op == "call_method" and user.target in ("mul", "mul_"))
        others = [a for a in user.args if a is not value]
        return is_mul and len(user.args) == 2 and len(others) == 1 and isinstance(others[0], fx.Node)
    return bool(node.users) and all(scales(u, node) for u in node.users)


def _functional_p(node: fx.Node) -> float | None:
    """The p of a functional dropout node (``F.dropout(x, p)``, ``torch.dropout(x, p, train)``)."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else None


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
