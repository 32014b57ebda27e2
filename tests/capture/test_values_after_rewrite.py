"""Nothing changes in silence after a rewrite: values a graph was specialised on, blocks called twice.

Every attribute value a regenerated forward read while it was traced (bool, int, float, str, tuple,
enum, a container's length) is checked on each call; a change re-specialises that module (traced
again, the same edits applied) or is refused in one line naming the value. Modules whose own code
no pass edited keep their own forward and need no check.
"""

from __future__ import annotations

import copy
import enum
import io
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphtricks as gt
from graphtricks.fxgraph.adopt import is_adopted


def _guarded(module: nn.Module) -> dict:
    """The values of ``module``'s own attributes its regenerated forward checks."""
    guard = vars(module)["_gt_guard"]
    return {name: value for (path, owner, name), value in zip(guard.entries, guard.expected)
            if not path and owner is None}


def _rewrite(model, inputs, passes=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gt.rewrite(model, passes or [gt.InsertDropout(p=0.3)], inputs)


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 6)
        self.temperature, self.k, self.axes = 1.0, 2, (-1,)

    def forward(self, x):
        h = F.relu(self.fc1(x))  # dropout goes after it: this module's own code is edited
        return (self.fc2(h) / self.temperature).flip(self.axes).topk(self.k, dim=-1).values


def test_float_int_and_tuple_changed_later_re_specialise_the_module():
    torch.manual_seed(0)
    model, x = _Tempered().eval(), torch.randn(3, 8)
    rewritten = _rewrite(model, (x,)).model.eval()
    assert "relu_dropout" in rewritten.code and "/ 1.0" in rewritten.code
    for m in (model, rewritten):
        m.temperature, m.k, m.axes = 2.5, 4, (0, 1)
    with torch.no_grad():
        assert torch.equal(rewritten(x), model(x))
    assert "/ 2.5" in rewritten.code and "relu_dropout" in rewritten.code  # same edit, new values
    assert _guarded(rewritten) == {"temperature": 2.5, "axes": (0, 1), "k": 4}
    rewritten.train()(x).sum().backward()  # trains with the new values


def test_a_copy_and_a_pickle_re_specialise_on_their_own():
    torch.manual_seed(0)
    model, x = _Tempered().eval(), torch.randn(3, 8)
    rewritten = _rewrite(model, (x,)).model.eval()
    buffer = io.BytesIO()
    torch.save(rewritten, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(rewritten), torch.load(buffer, weights_only=False)):
        other.temperature = 3.0
        model.temperature = 3.0
        with torch.no_grad():
            assert torch.equal(other.eval()(x), model(x))
    assert "/ 1.0" in rewritten.code  # the original rewrite is untouched


class _Mode(enum.Enum):
    MEAN = "mean"
    MAX = "max"


class _Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3), nn.ReLU()
        self.pool, self.mode = "avg", _Mode.MEAN

    def forward(self, x):
        h = self.act(self.conv(x))
        h = h.mean((2, 3)) if self.pool == "avg" else h.amax((2, 3))
        return h * 2 if self.mode is _Mode.MAX else h


def test_a_string_or_enum_that_changes_the_code_re_specialises_with_the_same_edit():
    torch.manual_seed(0)
    model, x = _Pooled().eval(), torch.randn(2, 3, 8, 8)
    rewritten = _rewrite(model, (x,)).model.eval()
    for m in (model, rewritten):
        m.pool, m.mode = "max", _Mode.MAX
    with torch.no_grad():
        assert torch.equal(rewritten(x), model(x))
    assert "amax" in rewritten.code and "act_dropout" in rewritten.code
    assert _guarded(rewritten) == {"pool": "max", "mode": _Mode.MAX}
    rewritten.train()(x).sum().backward()


class _Blocks(nn.Module):
    def __init__(self, n: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.blocks:
            x = F.gelu(block(x))
        return self.head(x)


def test_the_length_of_a_container_is_guarded():
    torch.manual_seed(0)
    model, x = _Blocks().eval(), torch.randn(3, 4)
    rewritten = _rewrite(model, (x,)).model.eval()
    extra = nn.Linear(4, 4)
    model.blocks.append(extra)
    rewritten.blocks.append(copy.deepcopy(extra))
    with torch.no_grad():
        assert torch.equal(rewritten(x), model(x))
    # The same edits, not new ones: the new block's activation gets no dropout (rewrite again for that),
    # and what followed the old last block's now follows it into the new block.
    assert rewritten.code.count("_dropout(") == 2 and len(rewritten.blocks) == 3


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
        self.use_act = True

    def forward(self, x):
        h = self.fc(x)
        if self.use_act:
            h = F.relu(h)
        return self.head(h * 2)


def test_an_edit_that_cannot_be_placed_again_is_refused_in_one_line():
    torch.manual_seed(0)
    model, x = _Gated().eval(), torch.randn(3, 4)
    rewritten = _rewrite(model, (x,)).model.eval()
    rewritten.use_act = False  # the ReLU the dropout follows is gone
    with pytest.raises(gt.GraphtricksError) as raised:
        rewritten(x)
    message = str(raised.value)
    assert "\n" not in message
    assert "_Gated.use_act was True when this model was rewritten and is False now" in message
    assert "rewrite" in message
    rewritten.use_act = True
    with torch.no_grad():
        assert torch.equal(rewritten(x), _Gated.forward(model, x))


def test_a_module_whose_own_code_is_unedited_keeps_its_own_forward():
    torch.manual_seed(0)
    model = nn.Sequential(_Blocks(), nn.Tanh()).eval()  # the Sequential's own code gets no edit
    x = torch.randn(3, 4)
    rewritten = _rewrite(model, (x,)).model
    assert not is_adopted(rewritten) and is_adopted(rewritten[0])
    assert "_gt_guard" not in vars(rewritten)


# -- real models ---------------------------------------------------------------------------------
def test_timm_vit_reset_classifier_with_another_pooling_is_honoured():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32,
                              patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    rewritten = _rewrite(model, (x,)).model.eval()
    assert not is_adopted(rewritten), "the root's own code has no edit: it runs its own forward"
    for m in (model, rewritten):
        torch.manual_seed(1)
        m.reset_classifier(10, global_pool="avg")
    with torch.no_grad():
        out = rewritten(x)
        assert torch.equal(out, rewritten.forward_head(rewritten.forward_features(x)))
        assert torch.equal(out, model(x))


def test_timm_resnet_drop_rate_set_later_is_applied():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    rewritten = _rewrite(model, (x,)).model
    rewritten.drop_rate = model.drop_rate = 0.5
    with torch.no_grad():
        assert torch.equal(rewritten.eval()(x), model(x))
    rewritten.train()
    features = torch.ones(4, rewritten.num_features, 2, 2)
    torch.manual_seed(0)
    head = rewritten.forward_head(features)
    assert not torch.equal(head, rewritten.fc(torch.ones(4, rewritten.num_features)))  # F.dropout ran
    torch.manual_seed(3)
    rewritten(x).sum().backward()  # the root's graph now depends on the mode: traced for train mode
    assert "dropout" in rewritten.code and "act1_dropout" in rewritten.code


# -- a block called twice --------------------------------------------------------------------------
class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(self.block(x)))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


class _TwiceLast(nn.Module):
    """The second call's activation is the model output: no dropout after it there."""

    def __init__(self):
        super().__init__()
        self.block = _Block()

    def forward(self, x):
        return self.block(self.block(x))


def _fired(model: nn.Module, name: str, x) -> int:
    count: Counter = Counter()
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: count.update(["call"]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return count["call"]


def test_a_block_called_twice_with_equal_edits_stays_one_called_module():
    torch.manual_seed(0)
    model, x = _Twice().eval(), torch.randn(3, 4)
    result = _rewrite(model, (x,))
    rewritten = result.model.eval()
    assert not result.report.inlined
    assert _fired(rewritten, "block", x) == _fired(model, "block", x) == 2
    dropouts = [name for name, m in rewritten.named_modules() if isinstance(m, nn.Dropout)]
    assert dropouts == ["block.1_dropout"], "the second call's equal dropout was unified into the first's"
    guard = vars(rewritten.block)["_gt_guard"]  # the Sequential iterates itself: its length is guarded
    assert guard.now(rewritten.block) == guard.expected == (4,)
    with torch.no_grad():
        assert torch.equal(rewritten(x), model(x))
    rewritten.train()
    torch.manual_seed(0)
    out = rewritten(x)
    out.sum().backward()


def test_a_block_called_twice_with_different_edits_stays_inlined_and_named():
    torch.manual_seed(0)
    model, x = _TwiceLast().eval(), torch.randn(3, 4)
    result = _rewrite(model, (x,))
    assert "block" in result.report.inlined
    with torch.no_grad():
        assert torch.equal(result.model.eval()(x), model(x))
