"""Residual shortcuts around named blocks or graph spans: ``H(x) = act(F(x) + α·S(x))``.

Blocks are named by qualified-name globs matched one path segment at a time (``*`` and ``?``
stop at dots, ``**`` crosses them): ``stages.*`` names the stages, not every layer inside
them. A block must take one tensor and return one. The shortcut is chosen from the shapes
recorded on the example inputs (:func:`~graphtricks.layers.residual.choose_shortcut`), and
every selected block and span is validated before anything is edited.

Wherever the block lives, it becomes ``body`` of a :class:`~graphtricks.layers.residual.Residual`
at its old path, so its state-dict keys gain ``body.`` (``stages.1.0.weight`` →
``stages.1.body.0.weight``) beside the new ``stages.1.shortcut.*`` and ``stages.1.gate``.
Inside a traced region the block's nodes stay in the graph (retargeted to ``body``) and the
shortcut, gate, sum and ReLU are added as nodes, so later passes see them; a child of an
opaque module is replaced by the wrapper itself. A span ``FIRST:LAST`` (node names;
``REGION/FIRST:LAST`` when the names occur in several regions) takes its parts from a
:class:`~graphtricks.layers.residual.ResidualSpan` at ``residual_FIRST_LAST``.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult

from graphtricks.capturing import Region, RegionTree
from graphtricks.capturing.hooks import hook_kinds
from graphtricks.errors import PassError
from graphtricks.fxgraph.adopt import compile_when_called
from graphtricks.fxgraph.nodes import (
    find_submodule,
    module_nodes,
    name_glob,
    outer_stack,
    stack_types,
    unique_attr_name,
)
from graphtricks.layers.residual import (
    GATES,
    POST_ACTS,
    REGISTRY,
    SHORTCUTS,
    Residual,
    ResidualSpan,
    choose_shortcut,
    make_shortcut,
)
from graphtricks.passes.base import GraphtricksPass, as_patterns, register_pass
from graphtricks.passes.residual_blocks import (
    SPAN,
    Block,
    candidate_blocks,
    has_own_shortcut,
    measure_blocks,
    opaque_child,
    register_wrapped,
    single_io,
    span_block,
    span_nodes,
    traced_block,
    wrapped_names,
)
from graphtricks.passes.residual_graph import add_merge_nodes, retarget

# REGISTRY (layers.residual) and candidate_blocks (blocks) are re-exported: callers import them from here.
__all__ = ["REGISTRY", "AddResidual", "candidate_blocks"]


@register_pass
class AddResidual(GraphtricksPass):
    """Wrap blocks (or graph spans) with a residual shortcut.

    Args:
        blocks: qualified-name globs of submodules to wrap (``stages.*``, ``layer?.0``).
        spans: ``FIRST:LAST`` node-name spans of a traced region (``REGION/FIRST:LAST``).
        shortcut: ``auto`` (identity / pad / conv from the shapes), ``identity``, ``pad`` or ``conv``.
        shortcut_norm: BatchNorm after a conv shortcut.
        post_act: ``none`` or ``relu`` (after the sum).
        gate: ``none``; ``zero`` (``H = F + α·S``, α a learnable scalar starting at 0: the model
            computes exactly what it did); ``zero-branch`` (``H = α·F + S``: each block starts as its
            shortcut, the form that lets a deep plain net that does not train start to).
        include: fnmatch globs a block's qualified name must match; empty = all.
        exclude: fnmatch globs of blocks never wrapped.

    Raises:
        PassError: an unknown option value, or a malformed span.

    Example:
        >>> result = gt.rewrite(model, [AddResidual(["stages.*"], gate="zero")], example_inputs=(x,))
    """

    name = "residual"
    preserves_eval = False

    def __init__(self, blocks=(), *, spans=(), shortcut="auto", shortcut_norm=False, post_act="none", gate="none",
                 include=(), exclude=(), strict: bool = True):
        super().__init__(include=include, exclude=exclude, strict=strict)
        self.blocks = as_patterns(blocks, "residual: block")
        self.spans = as_patterns(spans, "residual: span")
        for span in self.spans:
            if not isinstance(span, str) or not SPAN.fullmatch(span):
                raise PassError(f"residual: span {span!r} is not FIRST:LAST (graph node names, or REGION/FIRST:LAST)")
        for option, value, allowed in (("shortcut", shortcut, SHORTCUTS), ("post_act", post_act, POST_ACTS),
                                       ("gate", gate, GATES)):
            if value not in allowed:
                raise PassError(f"residual: unknown {option} {value!r}; choose one of {', '.join(allowed)}")
        if shortcut_norm and shortcut in ("identity", "pad"):
            raise PassError(f"residual: shortcut_norm applies to conv shortcuts, not shortcut={shortcut!r}")
        self.shortcut, self.shortcut_norm, self.post_act, self.gate = shortcut, bool(shortcut_norm), post_act, gate
        # Per instance: with a zero gate and nothing after the sum, H = F exactly until α moves.
        self.preserves_eval = gate == "zero" and post_act == "none"

    def options(self) -> dict:
        out = {"blocks": list(self.blocks), "shortcut": self.shortcut, "shortcut_norm": self.shortcut_norm}
        if self.spans:
            out["spans"] = list(self.spans)
        return {**out, "post_act": self.post_act, "gate": self.gate}

    def skip_reason(self) -> str | None:
        return None if self.blocks or self.spans else "residual: no blocks or spans named; nothing to wrap"

    def selections(self) -> list:
        """The block patterns too (matched by segment, as :meth:`_select` does)."""
        blocks = [("blocks", p, lambda _, name, glob=name_glob(p): glob.fullmatch(name) is not None) for p in self.blocks]
        return blocks + super().selections()

    # -- planning: everything is validated before the first edit ------------------------
    def _planned(self, module: nn.Module) -> list[Block]:
        """The wraps planned for the region whose module is ``module`` (planned once per tree)."""
        if self.tree is None:  # called on one graph module, outside ``rewrite``
            return self._make_plan(RegionTree(module, Region("", "traced", module))).get(id(module), [])
        if not hasattr(self.state, "plan"):
            self.state.plan = self._make_plan(self.tree)
        return self.state.plan.pop(id(module), [])

    def _make_plan(self, tree: RegionTree) -> dict[int, list[Block]]:
        regions = tree.regions()
        for region in regions:
            if region.kind == "traced":
                register_wrapped(region.graph_module)  # a re-captured graph has the list, but not deepcopy-safe
        plan: dict[int, list[Block]] = {}
        measured: list[Block] = []
        for q in self._select(tree.model, regions):
            host = max((r for r in regions if r.path != q and (not r.path or q.startswith(r.path + "."))),
                       key=lambda r: len(r.path))
            local = q[len(host.path) + 1 :] if host.path else q
            with _refusal():
                if host.kind == "traced":
                    item = traced_block(host.module, local, q)
                    if has_own_shortcut(host.module, local):
                        self.notes.append(f"{q}: already has a shortcut (its forward adds its input back);"
                                          " wrapped again, so its output is F(x) + S(x) on top of that")
                else:
                    item = Block(q, local, opaque_child(host, local, q))
                    measured.append(item)
            plan.setdefault(id(host.module), []).append(item)
        reasons = measure_blocks(tree.model, self.example_inputs, measured, self.example_kwargs)
        for item, reason in zip(measured, reasons):
            if reason:
                raise PassError(f"residual: {item.where} {reason}")
        for span in self.spans:
            with _refusal():
                found = span_block(regions, span)
            if found is None:
                self.notes.append(f"span {span}: already has a residual shortcut; left alone")
                continue
            host, item = found
            taken = [i for i in plan.get(id(host.module), []) if i.nodes & item.nodes]
            if taken:
                raise PassError(f"residual: span {span} overlaps {taken[0].where}; wrap one of them")
            plan.setdefault(id(host.module), []).append(item)
        for item in itertools.chain(*plan.values()):
            try:
                item.kind, item.stride = choose_shortcut(self.shortcut, item.in_shape, item.out_shape, *item.dtypes)
            except ValueError as e:
                ins, outs = _fmt(item.in_shape, item.dtypes[0]), _fmt(item.out_shape, item.dtypes[1])
                shapes = f"input {ins} → output {outs}"
                raise PassError(f"residual: no {self.shortcut} shortcut fits {item.where}: {shapes}: {e}") from None
        return plan

    def _select(self, model: nn.Module, regions: list[Region]) -> list[str]:
        """Qualified names matched by ``blocks``, minus wrapped ones and graphtricks' own parts."""
        names = [name for name, _ in model.named_modules() if name]
        for region in (r for r in regions if r.kind == "traced"):
            # Parameter-free blocks inlined in a trace exist only as paths in the module stacks.
            names += map(region.qualify, stack_types(region.graph_module.graph))
        names = list(dict.fromkeys(names))
        chosen: dict[str, None] = {}
        for pattern in self.blocks:
            regex = name_glob(pattern)
            hits = [name for name in names if regex.fullmatch(name)]  # none: refused by check_selections
            chosen.update(dict.fromkeys(hits))
        wrapped, own = wrapped_names(model)
        out = []
        for name in chosen:
            above = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
            if name in wrapped or (name.endswith(".body") and name[: -len(".body")] in wrapped):
                self.notes.append(f"{name}: already has a residual shortcut; left alone")
            elif name in own or any(a in own or (a in wrapped and not name.startswith(a + ".body.")) for a in above):
                continue  # a shortcut, gate or span part that graphtricks added
            elif self.selects(name):
                out.append(name)
        for name in out:
            outer = next((a for a in out if name.startswith(a + ".")), None)
            if outer is not None:
                raise PassError(f"residual: blocks {outer} and {name} are nested; select one of them")
        return out

    # -- editing ----------------------------------------------------------------------
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Wrap the planned blocks and spans of one traced region."""
        gm = graph_module
        items = self._planned(gm)
        for item in items:
            (self._wrap_span if ":" in item.local else self._wrap_traced)(gm, item)
        if items:
            gm.graph.lint()
            compile_when_called(gm)
        return PassResult(gm, bool(items))

    def _wrap_traced(self, gm: fx.GraphModule, item: Block) -> None:
        local = item.local
        nodes = module_nodes(gm.graph, local)  # found again: an earlier wrap may now feed its input
        with _refusal():
            entry, exit_ = single_io(nodes, item.where)
        outer = outer_stack(exit_, local)
        block = find_submodule(gm, local) or nn.Module()  # a parameter-free inlined block has no module left
        wrapper = self._wrapper(item, block)
        gm.add_submodule(local, wrapper)  # replaces the block at the same position in its parent
        retarget(gm.graph, local, f"{local}.body", Residual)
        register_wrapped(gm, local, "block")
        self._rename_regions(item.where, f"{item.where}.body")
        add_merge_nodes(gm, entry, exit_, set(nodes), local, wrapper, {**outer, local: (local, Residual)})
        self._record(item, wrapper, block, item.where)

    def _wrap_span(self, gm: fx.GraphModule, item: Block) -> None:
        first, last = item.local.split(":")
        with _refusal():
            nodes = span_nodes(gm.graph, first, last, item.where)
            entry, exit_ = single_io(nodes, item.where)
        device = _device(gm, self.example_inputs)
        parts = ResidualSpan(self._shortcut(item, device), span=item.local, gate=self.gate, post_act=self.post_act,
                             dtype=_float(item.dtypes[0]), device=device)
        path = unique_attr_name(gm, "", f"residual_{first}_{last}")
        gm.add_submodule(path, parts)
        register_wrapped(gm, path, parts.gt_residual)
        add_merge_nodes(gm, entry, exit_, set(nodes), path, parts, {path: (path, ResidualSpan)})
        self._record(item, parts, None, self.qualify(path))

    def call_opaque(self, region: Region) -> bool:
        """Replace the planned children of an opaque module with ``Residual`` wrappers."""
        items = self._planned(region.module)
        for item in items:
            container_path, _, leaf = item.local.rpartition(".")
            container = region.module.get_submodule(container_path) if container_path else region.module
            child = container._modules[leaf]
            wrapper = self._wrapper(item, child)
            setattr(container, leaf, wrapper)
            self._rename_regions(item.where, f"{item.where}.body")
            # The wrapper runs its own forward: an opaque region, with the body's region below it.
            below = [r for r in region.children if r.module is child]
            if isinstance(wrapper.shortcut, nn.Sequential):
                below.append(Region(f"{item.where}.shortcut", "opaque", wrapper.shortcut, "a Sequential in a wrapper"))
            at = next((i for i, r in enumerate(region.children) if r.module is child), len(region.children))
            region.children[at : at + 1] = [Region(item.where, "opaque", wrapper, "residual wrapper", below)]
            self._record(item, wrapper, child, item.where)
            self.stale_shapes = True  # the wrapper's children have no recorded shapes yet
        return bool(items)

    def _shortcut(self, item: Block, device: torch.device) -> nn.Module:
        return make_shortcut(item.kind, item.in_shape, item.out_shape, item.stride, norm=self.shortcut_norm,
                             dtype=item.dtypes[0], device=device, seed_name=item.where)

    def _wrapper(self, item: Block, block: nn.Module) -> Residual:
        device = _device(block, self.example_inputs)
        wrapper = Residual(block, self._shortcut(item, device), gate=self.gate, post_act=self.post_act,
                           dtype=_float(item.dtypes[0]), device=device)
        return wrapper.train(block.training)

    def _rename_regions(self, old: str, new: str) -> None:
        """Regions at or below a wrapped block now sit under its ``body``."""
        for region in self.tree.regions() if self.tree is not None else ():
            if region.path == old or region.path.startswith(old + "."):
                region.path = new + region.path[len(old) :]

    def _record(self, item: Block, parts: nn.Module, block: nn.Module | None, at: str) -> None:
        desc = {"identity": "identity", "pad": "zero-pad", "conv": "1x1 conv" if len(item.in_shape) > 2 else "linear"}
        what = desc[item.kind] + (" + BatchNorm" if item.kind == "conv" and self.shortcut_norm else "")
        what += f" /{'x'.join(map(str, item.stride))}" if any(s > 1 for s in item.stride) else ""
        what += (", gate α=0" if self.gate == "zero" else "") + (", ReLU after sum" if self.post_act == "relu" else "")
        details = {"shortcut": item.kind, "stride": list(item.stride), "in_shape": list(item.in_shape),
                   "out_shape": list(item.out_shape), "norm": item.kind == "conv" and self.shortcut_norm,
                   "gate": self.gate, "post_act": self.post_act, "module": at}
        if item.kind == "conv":
            details["init"] = "kaiming_normal_(fan_out, relu)"
        if block is not None:
            details["keys"] = f"{item.where}.* -> {item.where}.body.*"
            kinds = hook_kinds(block)
            if kinds:  # the block is still called, as the wrapper's body: its hooks fire as before
                self.notes.append(f"{item.where}: the user's {' and '.join(kinds)} hooks stay on the block, now "
                                  f"{item.where}.body (they see its output before the shortcut is added)")
        self.record(
            item.where, "wrapped", f"residual: {what} shortcut, {_fmt(item.in_shape)} -> {_fmt(item.out_shape)}",
            new_params=[f"{at}.{n}" for n, _ in parts.named_parameters() if not n.startswith("body.")],
            copied_params=[f"{at}.body.{n}" for n, _ in block.named_parameters()] if block is not None else [],
            details=details,
        )


# -- small helpers -----------------------------------------------------------------------------
@contextmanager
def _refusal():
    """Block helpers refuse a block with a ValueError naming it: report it as this pass's error."""
    try:
        yield
    except ValueError as e:
        raise PassError(f"residual: {e}") from None


def _fmt(shape, dtype: torch.dtype | None = None) -> str:
    """``2x8x4x4``, with `` float32`` appended when a dtype is given."""
    text = "x".join(str(int(d)) for d in shape)
    return f"{text} {str(dtype).replace('torch.', '')}" if dtype is not None else text


def _float(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype for a gate: the activations' when floating point (an integer α cannot learn)."""
    return dtype if dtype is not None and dtype.is_floating_point else None


def _device(module: nn.Module, inputs: tuple = ()) -> torch.device:
    """Where new parts go: the block's parameters or buffers, else the inputs, else the CPU."""
    tensors = itertools.chain(module.parameters(), module.buffers(), (i for i in inputs if isinstance(i, torch.Tensor)))
    return next((t.device for t in tensors), torch.device("cpu"))
