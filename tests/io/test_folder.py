"""Tests of save/load: a rebuild replays the recipe on the saved weights and inputs, and is checked.

The models here are rebuilt by ``graphtricks.load`` from this very file (``SPEC``). Their
branches depend on the weights or on the data, so a replay on other weights or inputs would
take the other way and build another structure.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import graphtricks as gt
from graphtricks.io import folder as saving
from graphtricks.errors import SavedModelError
from graphtricks.passes import PASSES
from graphtricks.io.inputs import make_example_inputs

HERE = Path(__file__).resolve()


class Block(nn.Module):
    """A Linear, then a BatchNorm when ``norm`` (traced when it runs: a region of its own)."""

    def __init__(self, norm: bool):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2) if norm else nn.Identity()

    def forward(self, h):
        return self.norm(self.fc(h))


class Branch(nn.Module):
    """``inner`` when the mean of its input is positive, else ``other`` (the one with a BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.inner, self.other = Block(norm=False), Block(norm=True)

    def forward(self, h):
        return self.inner(h) if h.mean() > 0 else self.other(h)


class WeightBranch(nn.Module):
    """The way ``branch`` goes depends on ``first``'s weights; a fresh build (identity) goes ``inner``."""

    def __init__(self):
        super().__init__()
        self.first, self.branch, self.head = nn.Linear(2, 2), Branch(), nn.Linear(2, 1)
        with torch.no_grad():
            self.first.weight.copy_(torch.eye(2))
            self.first.bias.zero_()

    def forward(self, x):
        return self.head(self.branch(self.first(x)))


class DataBranch(nn.Module):
    """The way depends on the input only."""

    def __init__(self):
        super().__init__()
        self.branch, self.head = Branch(), nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.branch(x))


X = torch.rand(4, 2, generator=torch.Generator().manual_seed(0)) + 0.5  # positive: a fresh WeightBranch goes inner


def _source(name: str, x: torch.Tensor = X) -> dict:
    return {"spec": f"{HERE}:{name}", "input_shapes": [list(x.shape)]}


def _rewrite(model, passes, x=X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gt.rewrite(model, passes, (x,))


def _structure(model):
    return sorted((name, type(m).__name__) for name, m in model.named_modules())


def _same_model(reloaded, rewritten, inputs):
    assert _structure(reloaded) == _structure(rewritten)
    a, b = reloaded.state_dict(), rewritten.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x in inputs:
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(x), rewritten.eval()(x))


def _trained(scale: float = -1.0) -> WeightBranch:
    """A WeightBranch whose first layer sends the example inputs the other way (to the BatchNorm)."""
    torch.manual_seed(0)
    model = WeightBranch()
    with torch.no_grad():
        model.first.weight.mul_(scale)
    return model


def test_rebuild_replays_on_the_saved_weights_when_a_branch_depends_on_them(tmp_path):
    result = _rewrite(_trained(), [PASSES["bn_to_ln"]()])
    assert type(result.model.get_submodule("branch.other.norm")).__name__ == "LayerNorm"
    folder = gt.save(result, tmp_path / "out", _source("WeightBranch"))
    _same_model(gt.load(folder), result.model, (X, -X))  # -X takes the other way


def test_rebuild_finds_the_weights_a_pass_moved(tmp_path, monkeypatch):
    """The residual wrap moves first.weight to first.body.weight: the first replay misses it,
    goes the fresh build's way, and a second one puts it where the replay moved it."""
    replays = []
    replay = saving._replay
    monkeypatch.setattr(saving, "_replay", lambda *a: replays.append(a[-1]) or replay(*a))
    result = _rewrite(_trained(-2.0), [PASSES["residual"](["first"]), PASSES["bn_to_ln"]()])  # -2x + x < 0
    assert type(result.model.get_submodule("branch.other.norm")).__name__ == "LayerNorm"
    folder = gt.save(result, tmp_path / "out", _source("WeightBranch"))
    _same_model(gt.load(folder), result.model, (X, -X))
    assert replays == [{}, {"first.body.weight": "first.weight", "first.body.bias": "first.bias"}]


def test_rebuild_traces_the_modules_that_ran_when_saved(tmp_path):
    """No edit in the branch, yet the replay must go the same way: the module that ran and the one
    that did not (traced without inputs, issue 14) are regions in the saved model and in the rebuilt
    one (same state-dict order); with no edit of their own code, both keep their own forward."""
    result = _rewrite(_trained(-2.0), [PASSES["residual"](["first"])])
    ran = {name: isinstance(result.model.get_submodule(f"branch.{name}"), fx.GraphModule) for name in ("inner", "other")}
    assert ran == {"inner": False, "other": False}
    assert {"branch.inner", "branch.other"} <= {r.path for r in result.tree.regions() if r.kind == "traced"}
    reloaded = gt.load(gt.save(result, tmp_path / "out", _source("WeightBranch")))
    assert {name: isinstance(reloaded.get_submodule(f"branch.{name}"), fx.GraphModule) for name in ran} == ran
    assert list(reloaded.state_dict()) == list(result.model.state_dict())


def test_rebuild_that_takes_another_way_is_an_error_naming_the_difference(tmp_path):
    """init resets the weights the branch read: the folder holds only the new ones, on which the
    replay goes inner and gives the BatchNorm that did not run the channel form, not the LayerNorm
    of the saved model. That must fail, not load another model."""
    result = _rewrite(_trained(), [PASSES["bn_to_ln"](), PASSES["init"](seed=1)])
    assert result.model.get_submodule("first")(X).mean() > 0, "premise: init's weights go the other way"
    folder = gt.save(result, tmp_path / "out", _source("WeightBranch"))
    with pytest.raises(SavedModelError, match="branch.other.norm is a ChannelLayerNorm, saved as a LayerNorm") as info:
        gt.load(folder)
    assert "\n" not in str(info.value)


def test_rebuild_replays_on_the_saved_inputs(tmp_path):
    x = X  # goes inner; seeded inputs of that shape would go to the BatchNorm, and have it swapped
    assert make_example_inputs([tuple(x.shape)])[0].mean() < 0, "premise: seeded inputs go the other way"
    torch.manual_seed(0)
    result = _rewrite(DataBranch(), [PASSES["bn_to_ln"]()], x)
    folder = gt.save(result, tmp_path / "out", _source("DataBranch", x))
    saved = saving.load_saved(folder)
    assert torch.equal(saved.example_inputs[0], x)
    _same_model(saved.model, result.model, (x, -x))


def test_edits_the_replay_does_not_make_are_named(tmp_path):
    result = _rewrite(_trained(), [PASSES["dropout"](p=0.1)])  # nothing to edit: no activation
    folder = gt.save(result, tmp_path / "out", _source("WeightBranch"))
    structure = json.loads((folder / saving.STRUCTURE).read_text())
    assert structure["edits"] == []
    structure["edits"] = [[1, "dropout", "inserted", "branch.other.norm"]]
    (folder / saving.STRUCTURE).write_text(json.dumps(structure))
    with pytest.raises(SavedModelError, match=r"pass #1 \(dropout\) inserted branch.other.norm in the saved model, not"):
        gt.load(folder)


def test_folders_without_inputs_or_structure_still_load(tmp_path):
    """Folders written before those files: seeded inputs from the recorded shapes, keys checked."""
    torch.manual_seed(0)
    model = DataBranch()
    x = make_example_inputs([(4, 2)])[0]
    result = _rewrite(model, [PASSES["bn_to_ln"]()], x)
    folder = gt.save(result, tmp_path / "out", _source("DataBranch", x))
    (folder / saving.INPUTS).unlink()
    (folder / saving.STRUCTURE).unlink()
    saved = saving.load_saved(folder)
    assert torch.equal(saved.example_inputs[0], x)
    _same_model(saved.model, result.model, (x,))


def test_truncated_inputs_are_a_saved_model_error(tmp_path):
    folder = gt.save(_rewrite(_trained(), [PASSES["bn_to_ln"]()]), tmp_path / "out", _source("WeightBranch"))
    data = (folder / saving.INPUTS).read_bytes()
    (folder / saving.INPUTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(SavedModelError, match=saving.INPUTS):
        gt.load(folder)


def test_inputs_are_kept_with_their_dtype_unless_they_have_no_values(tmp_path):
    """Meta inputs have no values to keep: the rebuild falls back to the recorded shapes."""
    saving._save_inputs((torch.empty(4, 2, device="meta"),), tmp_path / saving.INPUTS)
    assert not (tmp_path / saving.INPUTS).exists()
    saving._save_inputs((X, torch.tensor([1, 2])), tmp_path / saving.INPUTS)
    loaded, kwargs = saving._saved_inputs(tmp_path, {})
    assert kwargs == {} and len(loaded) == 2 and torch.equal(loaded[0], X) and loaded[1].dtype == torch.int64
