"""One compile per distinct generated source; each module keeps its own globals and state."""

from __future__ import annotations

import torch
from torch import fx, nn

from graphtricks.fxgraph.codecache import method_from_src, shared_compiles


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + 1


def test_blocks_of_one_design_share_code_and_keep_their_own_weights():
    a, b = _Block(), _Block()
    with shared_compiles():
        ga, gb = fx.symbolic_trace(a), fx.symbolic_trace(b)
    assert ga.code == gb.code
    assert type(ga).forward.__code__ is type(gb).forward.__code__, "one compile for one source"
    x = torch.randn(2, 4)
    assert torch.equal(ga(x), a(x)) and torch.equal(gb(x), b(x)) and not torch.equal(ga(x), gb(x))
    # Outside the context fx compiles as it always does.
    assert type(fx.symbolic_trace(a)).forward.__code__ is not type(ga).forward.__code__


def test_one_source_runs_with_each_callers_globals():
    src = "def forward(self, x):\n    return scale * x\n"
    double, triple = method_from_src(src, {"scale": 2}), method_from_src(src, {"scale": 3})
    assert double.__code__ is triple.__code__
    assert (double(None, 5), triple(None, 5)) == (10, 15)
