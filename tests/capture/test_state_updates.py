"""Item 2 of issue 14: state updates in forward are kept (the forward stays as written), and the
rewrite's own forwards leave parameters, buffers and attributes as they found them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graphtricks as gt


class Counter(nn.Module):
    """Counts its train calls in a buffer, the usual way (no proxy touches the buffer)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.steps += 1
        return torch.relu(self.fc(x))


class Ema(nn.Module):
    """Keeps an EMA of its weight, and the last output in an attribute."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(4, 4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.ema.mul_(0.9).add_(0.1 * torch.ones(4, 4))
        self.calls.add_(1)
        y = torch.tanh(self.fc(x))
        self.last = y.detach()
        return y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = Counter()
        self.ema = Ema()
        self.head = nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(x.shape[0])  # involves a proxy: recorded in the graph
        return self.head(torch.relu(self.ema(self.counter(x))))


class Pure(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = Counter()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


@pytest.mark.parametrize("passes", [[], [gt.InsertDropout(p=0.0)]], ids=["none", "dropout"])
def test_buffers_after_n_train_calls_match_the_original(passes):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 4)
    before = _buffers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = gt.rewrite(model, passes, x)
    rewritten = result.model
    assert all(torch.equal(before[k], v) for k, v in _buffers(model).items())
    for k, v in _buffers(rewritten).items():  # the rewrite's own forwards changed nothing
        assert torch.equal(v, before[k]), k
    assert not hasattr(rewritten.ema, "last")
    model.train()
    rewritten.train()
    for _ in range(4):
        torch.testing.assert_close(rewritten(x), model(x))
    want, got = _buffers(model), _buffers(rewritten)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k}: {got[k]} != {want[k]}"
    assert int(got["counter.steps"]) == 4
    assert torch.equal(rewritten.ema.last, model.ema.last)


def test_the_regions_that_update_state_name_the_reason():
    result = gt.rewrite(Net().eval(), [], torch.randn(3, 4))
    reasons = {r.path: r.reason for r in result.tree.regions() if r.kind == "opaque"}
    assert "" not in reasons  # its update reads the input (x.shape[0] is traced): the graph keeps it
    assert "steps" in reasons["counter"]
    assert "ema" in reasons["ema"] and "self.last" in reasons["ema"]
    assert "state a trace would drop" in str(result.report.regions)


def test_only_the_module_that_updates_state_is_kept_as_written():
    result = gt.rewrite(Pure().eval(), [], torch.randn(3, 4))
    kinds = {r.path: r.kind for r in result.tree.regions()}
    assert kinds[""] == "traced" and kinds["b"] == "opaque"
    m = result.model.train()
    for _ in range(3):
        m(torch.randn(3, 4))
    assert int(m.b.steps) == 3


def test_an_inplace_rewrite_leaves_the_counter_at_zero():
    model = Net().train()
    gt.rewrite(model, [], torch.randn(3, 4), inplace=True)
    assert int(model.counter.steps) == 0 and float(model.seen) == 0 and float(model.ema.calls) == 0
    assert not hasattr(model.ema, "last")
