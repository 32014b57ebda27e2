"""The dropout pass in opaque modules: the rules of traced code, applied to what a probe saw.

An opaque module keeps its own forward. Its activation *children* get their dropout at the
caller (:class:`~graphtricks.layers.caller_dropout.CallerDropout`): only the calls of that
forward that the rules allow (not a model output, data, not a gate unless asked, not already
followed by dropout) get it, and the activation module itself, its hooks and direct calls are
left as they are. A placeholder dropout with p = 0 after one gets the requested p: a dropout
module's ``p``, or the opaque module's attribute that its code passes to ``F.dropout`` (found by
name and kept only when a second probe shows that it is the one: Hugging Face's
``activation_dropout``). Activations that opaque code computes itself (``F.gelu`` in its forward)
cannot be followed and are counted.
"""

from __future__ import annotations

from torch import nn

from graphtricks.capturing import Region
from graphtricks.fxgraph.nodes import unique_attr_name
from graphtricks.layers.caller_dropout import CallerDropout, caller_dropout_of
from graphtricks.passes.dropout_sites import ActivationCall, opaque_activations, probe_sites

__all__ = ["OpaqueDropout", "GATES"]

GATES = ("Sigmoid", "Hardsigmoid")


class OpaqueDropout:
    """The opaque half of :class:`~graphtricks.passes.dropout.InsertDropout` (a mixin: it uses the
    pass's settings, ``record``, ``notes``, ``_skip`` and ``_dropout``)."""

    def call_opaque(self, region: Region) -> bool:
        """Dropout after the activation children an opaque module calls, applied at the caller."""
        probe = getattr(self.state, "probe", None)
        if self.p == 0 or probe is None:
            return False
        parent = region.module
        for act in probe.own_code.get(id(parent), []):
            if self._wanted(act, region.path):
                self._skip(region.path or "<root>", "in_opaque_code", act)
        modified = False
        for name, _child, act in opaque_activations(parent):
            where = region.qualify(name)
            if not self._wanted(act, where):
                continue
            taken = caller_dropout_of(parent)
            if taken is not None and name in taken.sites:
                self._skip(where, "followed_by_dropout", act, f"{region.qualify(taken.sites[name][0])} (graphtricks)")
                continue
            by_index: dict[int, list[ActivationCall]] = {}
            for call in probe.calls.get((id(parent), name)) or []:  # one list per call of the parent
                by_index.setdefault(call.index, []).append(call)
            if not by_index:
                self.notes.append(f"{where}: {act} was not called by {type(parent).__name__}'s forward"
                                  " on the example inputs; left alone")
                continue
            chosen = [_merged(calls) for _, calls in sorted(by_index.items())]
            chosen = [c for c in chosen if self._opaque_call_wanted(region, name, act, c, len(by_index))]
            if chosen:
                self._wrap(region, name, act, chosen, len(by_index))
                modified = True
        return modified

    def _opaque_call_wanted(self, region: Region, name: str, act: str, call: ActivationCall, n: int) -> bool:
        """Whether one call of an activation child gets dropout (the rules of traced code)."""
        where = region.qualify(name) + (f" (call {call.index + 1} of {n})" if n > 1 else "")
        if call.output:
            self.notes.append(f"{where}: {act} output is a model output; no dropout after it")
            return False
        if not self.constants and not call.data:
            self._skip(where, "input_independent", act)
            return False
        if not self.gates and act in GATES and call.consumers and all(c[0] == "mul" for c in call.consumers):
            self._skip(where, "gates", act)
            return False
        drops = [c for c in call.consumers if c[0] == "dropout"]
        if not call.consumers or len(drops) < len(call.consumers):
            return True
        for _, p, module in drops:
            if p != 0:
                kind = type(module).__name__ if module is not None else "F.dropout"
                self._skip(where, "followed_by_dropout", act, f"{kind}(p={p:g})" if p is not None else kind)
            elif module is not None:
                if module.p != self.p:
                    module.p = self.p
                    self.record(where, "updated", f"existing {type(module).__name__} after {act}: p 0 -> {self.p}",
                                details={"module": _path_of(self.tree.model, module), "p": self.p})
            else:
                self._set_placeholder_attribute(region, name, where, act)
        return False

    def _wrap(self, region: Region, name: str, act: str, chosen: list[ActivationCall], n: int) -> None:
        """Register the dropout beside the activation and apply it at the caller, on ``chosen`` calls."""
        parent = region.module
        shape = chosen[0].shape
        module = self._dropout(len(shape) if shape is not None else None)
        module.train(parent.training)
        drop = unique_attr_name(parent, "", f"{name.replace('.', '_')}_dropout")
        parent.add_module(drop, module)
        hooks = caller_dropout_of(parent)
        if hooks is None:
            hooks = CallerDropout({})
            hooks.install(parent)
        hooks.sites[name] = (drop, tuple(c.index for c in chosen))
        calls = "" if n == 1 else f"; calls {', '.join(str(c.index + 1) for c in chosen)} of {n}"
        self.record(
            region.qualify(name),
            "wrapped",
            f"{module} after {act} (applied where opaque {type(parent).__name__} calls it{calls})",
            details={"module": region.qualify(drop), "p": self.p, "calls": [c.index for c in chosen]},
        )

    def _set_placeholder_attribute(self, region: Region, name: str, where: str, act: str) -> None:
        """Note a functional placeholder: which attribute holds its p is found after the regions."""
        parent = region.module
        names = [k for k, v in vars(parent).items() if not k.startswith("_") and type(v) is float and v == 0.0]
        if not names:
            self.notes.append(f"{where}: {act} is followed by F.dropout(p=0) in {type(parent).__name__}'s own code"
                              " and no float attribute of it holds that p; set it in the model's code or config")
        elif not any(m is parent and n == name for m, n, *_ in self.state.pending):
            self.state.pending.append((parent, name, region, where, act, names))

    def _confirm_placeholders(self) -> None:
        """Find, by one probe, the attribute each functional placeholder reads its p from, and set it.

        Each candidate (a float attribute of the opaque module equal to 0) gets a value of its own;
        the value the dropout after the activation then receives names the attribute. Every other
        candidate goes back to 0.
        """
        marks: dict[float, tuple[int, str]] = {}
        for i, (parent, *_, names) in enumerate(self.state.pending):
            for attr in names:
                value = 0.5 + len(marks) * 1e-4  # distinct, and a valid p, for each candidate
                marks[value] = (i, attr)
                setattr(parent, attr, value)
        try:
            probe = probe_sites(self.tree, self.example_inputs, self.example_kwargs)
        except Exception as e:  # a candidate the model cannot run with: no attribute is set
            probe = None
            failed = f"{type(e).__name__}: {e}".splitlines()[0]
        finally:
            for parent, *_, names in self.state.pending:
                for attr in names:
                    setattr(parent, attr, 0.0)
        for i, (parent, name, region, where, act, names) in enumerate(self.state.pending):
            if probe is None:
                self.notes.append(f"{where}: {act} is followed by F.dropout(p=0) in {type(parent).__name__}'s own"
                                  f" code; looking for the attribute that holds its p failed ({failed}): set it yourself")
                continue
            seen = {c[1] for call in probe.calls.get((id(parent), name), []) for c in call.consumers if c[0] == "dropout"}
            found = {marks[p][1] for p in seen if p in marks and marks[p][0] == i}
            if len(found) != 1 or len(seen) != 1:
                self.notes.append(f"{where}: {act} is followed by F.dropout(p=0) in {type(parent).__name__}'s own"
                                  " code, whose p no attribute of it holds; set it in the model's code or config")
                continue
            attr = found.pop()
            setattr(parent, attr, self.p)
            self.record(where, "updated", f"F.dropout after {act}: p 0 -> {self.p} by setting {region.qualify(attr)}",
                        details={"attribute": region.qualify(attr), "p": self.p})


def _merged(calls: list[ActivationCall]) -> ActivationCall:
    """One call index over every call of the parent: data, an output or consumed as any call was."""
    first = calls[0]
    return ActivationCall(first.index, any(c.data for c in calls), any(c.output for c in calls),
                          [k for c in calls for k in c.consumers], first.shape)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` in ``model`` ("" when not found)."""
    return next((name for name, m in model.named_modules() if m is module), "")
