"""fx's registry poisoning (issue 15.5) and the guards graphtricks puts in instead."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.fx as fx
from torch import nn

import graphtricks as gt
from graphtricks.errors import InputShapeError


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x, mask=None):
        y = self.act(self.fc(x))
        return y if mask is None else y * mask


class Outer(nn.Module):
    """Calls its child with mask=None: capture specialises the child on None."""

    def __init__(self):
        super().__init__()
        self.inner = OptionalMask()

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: the root stays opaque, the child is traced alone
            return x
        # Not the model output itself: the child's activation gets dropout, so the child's own code
        # is edited and runs a graph (an unedited child keeps its own forward, specialised on nothing).
        return self.inner(x, None) * 2.0


def _codes(model):
    return [m.code for m in model.modules() if isinstance(m, fx.GraphModule)]


def test_no_assert_is_none_in_generated_graphs():
    result = gt.rewrite(Outer(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 8),))
    codes = _codes(result.model)
    assert codes and not any("_assert_is_none" in c for c in codes)


def test_unpickled_rewrite_then_rewrite_again_in_a_fresh_process():
    # A subprocess: once poisoned, fx stays broken for the whole process.
    code = textwrap.dedent(
        f"""
        import io, torch, torch.fx as fx
        from torch import nn
        import graphtricks as gt
        import sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_input_guards import Outer, OptionalMask
        result = gt.rewrite(Outer(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 8),))
        buf = io.BytesIO(); torch.save(result.model, buf); buf.seek(0)
        again = torch.load(buf, weights_only=False).eval()
        x = torch.randn(2, 8)
        assert torch.equal(again(x), result.model.eval()(x))
        fx.symbolic_trace(nn.Linear(2, 2))
        gt.rewrite(OptionalMask(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 8),))
        gt.rewrite(again, [gt.InsertDropout(p=0.2)], (torch.randn(2, 8),))
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def test_a_value_for_an_input_specialised_on_none_is_one_line():
    result = gt.rewrite(Outer(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 8),))
    inner = result.model.inner
    with pytest.raises(InputShapeError, match="'mask'") as info:
        inner(torch.randn(2, 8), torch.ones(2, 8))
    assert "\n" not in str(info.value)


def test_an_omitted_input_the_graph_was_traced_with_is_named():
    x, mask = torch.randn(2, 8), torch.ones(2, 8)
    result = gt.rewrite(OptionalMask(), [gt.InsertDropout(p=0.1)], (x, mask))
    rm = result.model.eval()
    assert torch.equal(rm(x, mask), rm(x, mask))
    with pytest.raises(InputShapeError, match="'mask' is missing") as info:
        rm(x)
    assert "\n" not in str(info.value)


def test_guards_survive_pickle():
    result = gt.rewrite(Outer(), [gt.InsertDropout(p=0.1)], (torch.randn(2, 8),))
    buf = io.BytesIO()
    torch.save(result.model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with pytest.raises(InputShapeError, match="'mask'"):
        again.inner(torch.randn(2, 8), torch.ones(2, 8))
