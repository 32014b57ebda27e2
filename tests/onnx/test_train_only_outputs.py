"""Train-only outputs (issue 15.6): a model that returns more in train mode than in eval mode.

The train graph carries the extra outputs (named ``train_only.<name>``), the inference graph
does not; validation compares the outputs both have and lists the train-only ones.
"""

from __future__ import annotations

import collections
import time

import onnx
import pytest
import torch
from torch import nn

from graphtricks.errors import ExportError
from graphtricks.onnx import INFER_FILE, TRAIN_FILE, export_pair, validate_pair
from graphtricks.onnx.checks.graphs import check_io

Outputs = collections.namedtuple("Outputs", ["logits", "aux"])


class AuxNet(nn.Module):
    """Train mode returns (main, aux); eval mode returns main. The aux head has its own BN and dropout."""

    def __init__(self, named: bool = False) -> None:
        super().__init__()
        self.named = named
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 4))
        self.aux = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        y = self.head(h)
        if self.training:
            return Outputs(y, self.aux(h)) if self.named else (y, self.aux(h))
        return y


class UnexportableAux(AuxNet):
    """The train-only output needs an operator the TorchScript exporter has no symbolic for."""

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        y = self.head(h)
        if self.training:
            return y, torch.linalg.svd(h)[1]
        return y


def _outputs(path) -> list[str]:
    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


@pytest.mark.parametrize("named", [False, True], ids=["tuple", "namedtuple"])
def test_train_graph_has_the_extra_output_and_validates(tmp_path, named):
    torch.manual_seed(0)
    model = AuxNet(named).eval()
    x = torch.randn(6, 8)
    result = export_pair(model, (x,), tmp_path)
    aux = "train_only.aux" if named else "train_only.output_1"
    assert result.output_names == ("output",)
    assert result.train_only_outputs == (aux,)
    assert any(aux in n for n in result.notes), result.notes
    train, infer = _outputs(tmp_path / TRAIN_FILE), _outputs(tmp_path / INFER_FILE)
    assert infer == ["output"]
    assert [n for n in train if not n.startswith("updated.")] == ["output", aux]
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0, 1))
    assert report.passed, report.summary()
    io = next(c for c in report.checks if c.name == "graphs_same_io")
    assert io.details["train_only_outputs"] == [aux] and aux in io.message
    assert any(aux in n for n in report.notes), report.notes
    # the outputs both have are compared in both modes; the train-only one against train mode
    infer_outputs = {c.output for c in report.checks if c.name == "infer_vs_eager"}
    train_outputs = {c.output for c in report.checks if c.name == "train_deterministic"}
    assert infer_outputs == {"output"} and train_outputs == {"output", aux}
    assert model.training is False


def test_io_check_accepts_only_train_only_extras(tmp_path):
    model = AuxNet().eval()
    export_pair(model, (torch.randn(6, 8),), tmp_path)
    train = onnx.load(str(tmp_path / TRAIN_FILE))
    infer = onnx.load(str(tmp_path / INFER_FILE))
    assert check_io(train, infer).passed
    renamed = onnx.ModelProto()
    renamed.CopyFrom(train)
    out = next(o for o in renamed.graph.output if o.name.startswith("train_only."))
    for node in renamed.graph.node:  # an extra output not marked train-only is a mismatch
        node.output[:] = ["extra" if v == out.name else v for v in node.output]
    out.name = "extra"
    result = check_io(renamed, infer)
    assert not result.passed and "extra" in result.message


def test_wrong_train_only_output_fails_validation(tmp_path):
    model = AuxNet().eval()
    x = torch.randn(6, 8)
    export_pair(model, (x,), tmp_path)
    with torch.no_grad():  # the model changes after export: the aux head's last layer
        model.aux[3].bias += 1.0
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert not report.passed
    failed = {c.output for c in report.failures if c.name == "train_deterministic"}
    assert failed == {"train_only.output_1"}


def test_train_graph_the_exporter_cannot_export_is_one_line(tmp_path):
    with pytest.raises(ExportError) as info:
        export_pair(UnexportableAux().eval(), (torch.randn(6, 8),), tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "train graph" in message and "train_only.output_1" in message, message
    assert not (tmp_path / TRAIN_FILE).exists()


def test_different_outputs_per_mode_still_refused(tmp_path):
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return (self.fc(x)[:, :2], self.fc(x)) if self.training else self.fc(x)

    with pytest.raises(ExportError, match="same tensors"):
        export_pair(Swapped().eval(), (torch.randn(2, 8),), tmp_path)


@pytest.mark.slow  # about 20 s; the corpus has it too (tv:googlenet-aux)
def test_googlenet_with_aux_heads_exports_and_validates(tmp_path):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    x = torch.randn(2, 3, 64, 64)
    start = time.perf_counter()
    result = export_pair(model, (x,), tmp_path)
    assert result.train_only_outputs == ("train_only.aux_logits2", "train_only.aux_logits1")
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    assert time.perf_counter() - start < 120


class DictAux(AuxNet):
    """A mapping output with one more key in train mode, and the shared key not first."""

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        out = {"aux": self.aux(h)} if self.training else {}
        out["logits"] = self.head(h)
        return out


def test_mapping_output_matches_by_key_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = DictAux().eval()
    x = torch.randn(6, 8)
    result = export_pair(model, (x,), tmp_path, dynamic_batch=True)
    assert result.output_names == ("logits",) and result.train_only_outputs == ("train_only.aux",)
    assert [n for n in _outputs(tmp_path / TRAIN_FILE) if not n.startswith("updated.")] == [
        "train_only.aux", "logits"
    ]
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
