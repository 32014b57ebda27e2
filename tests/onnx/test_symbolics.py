"""Ops the TorchScript exporter cannot export as torch ships it, which graphtricks registers itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphtricks.errors import ExportError
from graphtricks.onnx import export_pair, validate_pair


class UnfoldFold(nn.Module):
    """timm VOLO's outlook attention in small: unfold, a learnt mix, fold back (padding differs per axis)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv1d(4 * 9, 4 * 9, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        cols = self.mix(F.unfold(x, 3, padding=(1, 2)))
        return F.fold(cols, (h, w), kernel_size=3, padding=(1, 2))


def test_fold_exports_as_col2im_and_validates(tmp_path):
    model, x = UnfoldFold().eval(), torch.randn(2, 4, 6, 6)
    export_pair(model, (x,), tmp_path, opset=18)
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def test_fold_below_opset_18_is_one_line(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_pair(UnfoldFold().eval(), (torch.randn(2, 4, 6, 6),), tmp_path, opset=17)
    assert "\n" not in str(caught.value)


def test_the_registration_is_undone_after_the_export(tmp_path):
    from torch.onnx._internal.torchscript_exporter import registration

    before = registration.registry.get_function_group("aten::col2im")
    export_pair(UnfoldFold().eval(), (torch.randn(2, 4, 6, 6),), tmp_path, opset=18)
    after = registration.registry.get_function_group("aten::col2im")
    assert (before is None) == (after is None)
    if after is not None:
        assert after.get(18) is before.get(18)
