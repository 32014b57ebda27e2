"""Capture traces once only when no traced code read a ``training`` flag; every way of reading one is seen."""

from __future__ import annotations

import functools
import importlib
import types

import pytest
import torch
from torch import nn

import graphtricks as gt
from graphtricks.capturing.mode_reads import TrainingReads, overrides_train
from graphtricks.passes import PASSES

capture_module = importlib.import_module("graphtricks.capturing.regions")  # where capture() looks trace_once up


def _scale(module: nn.Module, x):
    return x * 2 if module.training else x


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
        return _scale(self, x)


helpers = types.SimpleNamespace(utils=types.SimpleNamespace(scale=_scale))  # ``pkg.utils.scale(self, x)``


class ViaDottedPath(nn.Module):
    def forward(self, x):
        return helpers.utils.scale(self, x)


class ViaGetattr(nn.Module):
    def forward(self, x):
        return x * 2 if getattr(self, "training") else x  # noqa: B009 - the string form is the point


class ViaStoredFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fn = functools.partial(_scale, self)

    def forward(self, x):
        return self.fn(x)


class _Head(nn.Module):
    def head(self, x):  # called as a method, not through __call__ (timm's forward_head)
        return x * 2 if self.training else x


class ViaSubmoduleMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Head()

    def forward(self, x):
        return self.inner.head(x)


class ViaChildHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Identity())  # kept as a called module for its hook
        self.inner.register_forward_hook(lambda m, args, out: out * 2 if m.training else out)

    def forward(self, x):
        return self.inner(x)


class ViaOwnTrain(nn.Module):
    """Overrides train() to set a flag of another name, which its forward reads."""

    def __init__(self):
        super().__init__()
        self.noisy = True

    def train(self, mode: bool = True):
        self.noisy = mode
        return super().train(mode)

    def forward(self, x):
        return x * 2 if self.noisy else x


READERS = [Direct, ViaMethod, ViaProperty, ViaGlobalFunction, ViaDottedPath, ViaGetattr, ViaStoredFunction,
           ViaSubmoduleMethod, ViaChildHook, ViaOwnTrain]


class _Outer(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.relu(self.fc(x)))


def _count_traces(monkeypatch) -> list:
    modes = []
    original = capture_module.trace_once

    def counting(module, leaves, concrete, training):
        modes.append(training)
        return original(module, leaves, concrete, training)

    monkeypatch.setattr(capture_module, "trace_once", counting)
    return modes


@pytest.mark.parametrize("reader", READERS, ids=lambda c: c.__name__)
def test_every_way_of_reading_the_mode_keeps_both_modes(monkeypatch, reader):
    modes = _count_traces(monkeypatch)
    model = _Outer(reader()).eval()
    x = torch.randn(2, 4)
    result = gt.rewrite(model, [], x)
    if reader is not ViaChildHook:  # a module with hooks stays a called module: its hook is not traced
        assert modes[:2] == [True, False], "the eval trace was skipped"
    for mode in (False, True):
        model.train(mode)
        result.model.train(mode)
        with torch.no_grad():
            assert torch.equal(result.model(x), model(x)), f"differs in {'train' if mode else 'eval'} mode"


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)  # a leaf: its own flag is read inside it, which is not traced

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x)))


def test_capture_traces_once_when_nothing_reads_the_mode(monkeypatch):
    modes = _count_traces(monkeypatch)
    gt.rewrite(_Outer(Plain()), [PASSES["dropout"](p=0.1)], torch.randn(2, 4))
    assert modes == [True]


def test_counting_property_is_removed_afterwards_even_on_errors():
    module = nn.Linear(2, 2)
    with TrainingReads() as outer:
        with pytest.raises(RuntimeError):
            with TrainingReads() as inner:
                assert module.training
                raise RuntimeError("trace failed")
        module.eval()
        assert not module.training
    assert (outer.count, inner.count) == (2, 1)
    assert "training" not in nn.Module.__dict__
    assert module.__dict__["training"] is False


def test_overrides_train_sees_descendants():
    assert overrides_train(nn.Sequential(nn.Linear(2, 2), ViaOwnTrain()))
    assert not overrides_train(nn.Sequential(nn.Linear(2, 2), nn.Dropout()))
