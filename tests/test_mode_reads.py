"""Which modules may read a ``training`` flag, and capture skipping the eval trace when none does."""

from __future__ import annotations

import functools
import importlib
import types

import torch
import torch.nn.functional as F
from torch import nn

import graphtricks as gt
from graphtricks.mode_reads import module_reads_training
from graphtricks.passes import PASSES

capture_module = importlib.import_module("graphtricks.capture")  # the package exports a function of that name


def _flag_of(module):
    return module.training


class Direct(nn.Module):
    def forward(self, x):
        return x * 2 if self.training else x


class ViaMethod(nn.Module):
    def scale(self):
        return 2 if self.training else 1

    def forward(self, x):
        return x * self.scale()


class ViaProperty(nn.Module):
    @property
    def factor(self):
        return 2 if self.training else 1

    def forward(self, x):
        return x * self.factor


class ViaGlobalFunction(nn.Module):
    def forward(self, x):
        return x * 2 if _flag_of(self) else x


# A helper reached through a module object (``helpers.flag(self)``), as a real package would.
helpers = types.ModuleType("helpers")
helpers.flag = _flag_of


class ViaModuleAttribute(nn.Module):
    def forward(self, x):
        return x * 2 if helpers.flag(self) else x


class ViaGetattr(nn.Module):
    def forward(self, x):
        return x * 2 if getattr(self, "training") else x  # noqa: B009 - the string form is the point


class ViaLambda(nn.Module):
    def forward(self, x):
        pick = lambda: self.training  # noqa: E731
        return x * 2 if pick() else x


class ViaSuper(nn.BatchNorm1d):
    def forward(self, x):
        return super().forward(x) + 1


def _decorate(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class ViaDecoratedForward(nn.Module):
    @_decorate
    def forward(self, x):
        return F.dropout(x, 0.5, self.training)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)  # a leaf: its own mode is read inside, not traced

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x)))


def test_every_way_of_reading_training_is_found():
    for cls in (Direct, ViaMethod, ViaProperty, ViaGlobalFunction, ViaModuleAttribute, ViaGetattr, ViaLambda,
                ViaDecoratedForward):
        assert module_reads_training(cls()), cls.__name__
    assert module_reads_training(ViaSuper(4))


def test_code_that_never_reads_it_is_cleared():
    assert not module_reads_training(Plain())
    assert not module_reads_training(nn.Sequential(nn.Linear(2, 2)))


class _Outer(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.fc(x))


def _count_traces(monkeypatch) -> list:
    modes = []
    original = capture_module.trace_once

    def counting(module, leaves, concrete, training):
        modes.append(training)
        return original(module, leaves, concrete, training)

    monkeypatch.setattr(capture_module, "trace_once", counting)
    return modes


def test_capture_traces_once_when_nothing_reads_the_mode(monkeypatch):
    modes = _count_traces(monkeypatch)
    gt.rewrite(_Outer(Plain()), [PASSES["dropout"](p=0.1)], torch.randn(2, 4))
    assert modes == [True]


def test_a_helper_reading_the_mode_still_makes_its_module_a_leaf(monkeypatch):
    modes = _count_traces(monkeypatch)
    model = _Outer(ViaModuleAttribute()).eval()
    x = torch.randn(2, 4)
    result = gt.rewrite(model, [PASSES["dropout"](p=0.1)], x)
    assert modes[:2] == [True, False]
    inner = [r for r in result.tree.regions() if r.path == "inner"]
    assert inner and inner[0].kind == "opaque" and "training" in inner[0].reason
    for mode in (True, False):  # the rewritten model keeps the helper's behaviour in both modes
        model.train(mode)
        result.model.train(mode)
        with torch.no_grad():
            assert torch.equal(result.model.inner(x), model.inner(x))
