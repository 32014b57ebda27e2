"""Tests of export_pair: files, names, opsets, repairs, atomicity, no side effects."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import onnx
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import graphtricks.onnx.export as export_module
from graphtricks.errors import ExportError
from graphtricks.onnx import (
    INFER_FILE,
    MAX_OPSET,
    MIN_OPSET,
    TRAIN_FILE,
    digest_model,
    export_pair,
    fixups,
    validate_pair,
)
from graphtricks.onnx.graph import dropout_infos, train_mode_batchnorms
from graphtricks.onnx.portable import portable_dropouts
from graphtricks.onnx.runtime import make_session
from graphtricks.onnx.train_only import mask_dropouts


class ConvBnNet(nn.Module):
    """Conv-BN-ReLU-Dropout, the smallest model with both train-only behaviours."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class QrNet(nn.Module):
    """``torch.linalg.qr`` has no ONNX form in either exporter: export must fail cleanly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(self.conv(x))[0]


@pytest.fixture
def cnn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return ConvBnNet(), (torch.randn(4, 3, 8, 8),)


def test_export_writes_both_graphs_and_no_temp_files(tmp_path, cnn):
    model, inputs = cnn
    result = export_pair(model, inputs, tmp_path / "out", train_graph="standard")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([TRAIN_FILE, INFER_FILE])
    train, infer = onnx.load(result.train_path), onnx.load(result.infer_path)
    assert train_mode_batchnorms(train) and not train_mode_batchnorms(infer)
    assert [d.training for d in dropout_infos(train)] == [True]
    assert dropout_infos(infer) == []
    for graph in (train, infer):
        assert [i.name for i in graph.graph.input] == ["x"]
        assert [o.name for o in graph.graph.output] == ["output"]
    assert result.to_dict()["opset"] == 18 and result.warnings == ()


def test_portable_train_graph_is_the_default(tmp_path, cnn):
    model, inputs = cnn
    result = export_pair(model, inputs, tmp_path / "out")
    train, infer = onnx.load(result.train_path), onnx.load(result.infer_path)
    assert not train_mode_batchnorms(train) and dropout_infos(train) == []
    assert [d.ratio for d in portable_dropouts(train)] == [pytest.approx(0.3)]
    assert [o.name for o in train.graph.output] == [
        "output", "updated.bn.num_batches_tracked", "updated.bn.running_mean", "updated.bn.running_var"
    ]
    assert [o.name for o in infer.graph.output] == ["output"]
    assert not any("disabled_optimizers" in note for note in result.notes)
    assert any("updated.bn.running_mean" in note for note in result.notes)
    with pytest.raises(ExportError, match="train_graph"):
        export_pair(model, inputs, tmp_path / "bad", train_graph="other")


def test_export_leaves_model_modes_and_buffers_alone(tmp_path, cnn):
    model, inputs = cnn
    model.train()
    model.bn.eval()  # a frozen BN inside a training model: per-module flags must survive
    before = digest_model(model)
    export_pair(model, inputs, tmp_path)
    assert before.differences(digest_model(model)) == []
    assert model.training and not model.bn.training
    assert int(model.bn.num_batches_tracked) == 0


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_train_graph_carries_the_models_running_stats(tmp_path, cnn, exporter):
    model, inputs = cnn
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
    result = export_pair(model, inputs, tmp_path, exporter=exporter)
    for path in (result.train_path, result.infer_path):
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
        assert (inits["bn.running_mean"] == 0.5).all()
    assert not any("reset" in r for r in result.repairs)  # the twin writes no buffer: nothing to undo


@pytest.mark.parametrize("opset", [7, MIN_OPSET - 1, MAX_OPSET + 1, 99, "18", True])
def test_unsupported_opset_is_a_one_line_export_error(tmp_path, cnn, opset):
    model, inputs = cnn
    with pytest.raises(ExportError, match="opset") as info:
        export_pair(model, inputs, tmp_path / "out", opset=opset)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_exporter_failure_writes_nothing_and_prints_nothing(tmp_path, capfd):
    model = QrNet()
    with pytest.raises(ExportError, match="linalg_qr") as info:
        export_pair(model, (torch.randn(2, 3, 4, 4),), tmp_path / "out")
    assert "\n" not in str(info.value) and info.value.__cause__ is not None
    assert not (tmp_path / "out").exists()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize(
    ("drop", "shape"),
    [(nn.Dropout1d(0.3), (2, 4, 5)), (nn.Dropout2d(0.3, inplace=True), (2, 4, 3, 3)),
     (nn.Dropout3d(0.3), (2, 4, 2, 2, 2))],
    ids=["Dropout1d", "Dropout2d-inplace", "Dropout3d"],
)
def test_channel_dropout_exports_as_a_mask_dropout_and_validates(tmp_path, drop, shape):
    torch.manual_seed(0)
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(shape)](4, 4, 1)
    model = nn.Sequential(conv, nn.ReLU(), drop).eval()
    x = torch.randn(*shape)
    result = export_pair(model, (x,), tmp_path, dynamic_batch=True, train_graph="standard")
    train, infer = onnx.load(result.train_path), onnx.load(result.infer_path)
    (mask,) = mask_dropouts(train)  # Dropout(ones(N, C, 1, ...)) read by one Mul(x, mask)
    assert [train.graph.node[j].op_type for j in mask.consumers] == ["Mul"]
    assert [d.ratio for d in dropout_infos(train)] == [pytest.approx(0.3)]
    assert [n.op_type for n in infer.graph.node] == [conv.__class__.__name__[:4], "Relu"]
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    assert [c.name for c in report.checks].count("dropout_rate") == 2  # batch 2, and 3 (dynamic)


def test_channel_dropout_zeroes_whole_channels_at_rate_p(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Dropout2d(0.25))
    result = export_pair(
        model, (torch.randn(2, 3, 4, 4),), tmp_path, dynamic_batch=True, train_graph="standard"
    )
    assert any("EliminateDropout" in note for note in result.notes)
    # as the note says: ORT's optimizer would remove the Dropout, and nothing would drop
    session = make_session(onnx.load(result.train_path), "cpu", "train", True, ("EliminateDropout",))
    x = np.random.default_rng(0).normal(size=(200, 3, 4, 4)).astype(np.float32)
    (y,) = session.run({"input": x})
    expected = model.eval()(torch.from_numpy(x)).detach().numpy()
    kept = (y != 0).reshape(200, 64, 16)
    assert (kept.all(-1) | ~kept.any(-1)).all()  # each (sample, channel) is kept or dropped whole
    whole = kept.all(-1)
    np.testing.assert_allclose(y[whole] * 0.75, expected[whole], rtol=1e-5, atol=1e-6)
    rate, n = whole.mean(), whole.size  # 12800 channels: the keep rate within 5 sigma of 0.75
    assert abs(rate - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5


def test_note_on_onnx_runtime_removing_train_dropouts_holds(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 64))
    result = export_pair(model, (torch.randn(2, 64),), tmp_path, train_graph="standard")
    assert any("disabled_optimizers=['EliminateDropout']" in note for note in result.notes)
    x = {"input": np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)}
    train = onnx.load(result.train_path)
    for disabled, drops in (((), False), (("EliminateDropout",), True)):
        session = make_session(train, "cpu", "train", True, disabled)
        first, second = session.run(x)[0], session.run(x)[0]
        assert (not np.array_equal(first, second)) == drops, disabled


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_channel_dropout_symbolic_is_registered_only_during_export(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout2d(0.2)).train()
    export_pair(model, (torch.randn(2, 3, 4, 4),), tmp_path)
    with pytest.raises(Exception, match="feature_dropout"):  # torch's own exporter, as shipped
        torch.onnx.export(model, (torch.randn(2, 3, 4, 4),), io.BytesIO(), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING)


def test_attention_dropout_gets_its_training_mode(tmp_path):
    torch.manual_seed(0)
    result = export_pair(AttentionNet(), (torch.randn(2, 5, 16),), tmp_path, train_graph="standard")
    assert any("training_mode" in r for r in result.repairs)
    assert [d.training for d in dropout_infos(onnx.load(result.train_path))] == [True]


def test_model_dropping_out_in_eval_mode_is_refused(tmp_path):
    class FunctionalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.lin(x), 0.5, self.training)

    # traced in train mode, fx bakes training=True in: eval() no longer turns the dropout off
    traced = torch.fx.symbolic_trace(FunctionalDropout().train())
    with pytest.raises(ExportError, match="eval mode"):
        export_pair(traced, (torch.randn(2, 4),), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_graph_disagreeing_with_pytorch_is_not_written(tmp_path, cnn, monkeypatch):
    real = export_module.export_mode

    def inference_bn(model, inputs, *, train, opset, **kwargs):
        graph, shown = real(model, inputs, train=train, opset=opset, **kwargs)
        for node in graph.graph.node if train else ():  # batch statistics scaled by the bias
            node.input[:] = ["bn.bias" if i == "bn.weight" else i for i in node.input]
        return graph, shown

    monkeypatch.setattr(export_module, "export_mode", inference_bn)
    model, inputs = cnn
    with pytest.raises(ExportError, match="disagrees with PyTorch train mode"):
        export_pair(model, inputs, tmp_path / "out", exporter="torchscript")
    assert not (tmp_path / "out").exists()


def test_names_and_dynamic_batch(tmp_path, cnn):
    model, inputs = cnn
    result = export_pair(
        model, inputs, tmp_path, input_names=["image"], output_names=["logits"], dynamic_batch=True
    )
    for path in (result.train_path, result.infer_path):
        graph = onnx.load(path).graph
        assert graph.input[0].name == "image" and graph.output[0].name == "logits"
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with pytest.raises(ExportError, match="output_names"):
        export_pair(model, inputs, tmp_path / "bad", output_names=["a", "b"])


def test_bad_inputs_and_out_dir_are_export_errors(tmp_path, cnn):
    model, inputs = cnn
    with pytest.raises(ExportError, match="example_inputs"):
        export_pair(model, ("not a tensor",), tmp_path / "a")
    with pytest.raises(ExportError, match="rejects"):
        export_pair(model, (torch.randn(4, 5, 8, 8),), tmp_path / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_pair(model, inputs, tmp_path / "file")


def _graph(nodes, inits, outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [4]) for o in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fixups_on_hand_made_graphs():
    # SDPA's Dropout without training_mode: switched on in the train graph
    untagged = _graph([helper.make_node("Dropout", ["x", "r"], ["y"], name="d")],
                      {"r": np.array(0.1, np.float32)})
    assert fixups.activate_untagged_dropouts(untagged) == ["d"]
    assert dropout_infos(untagged)[0].training is True
    # an inert Dropout in the inference graph disappears, its consumers rewired
    inert = _graph([helper.make_node("Dropout", ["x", "r"], ["h"], name="d"),
                    helper.make_node("Neg", ["h"], ["y"])], {"r": np.array(0.1, np.float32)})
    assert fixups.strip_inert_dropouts(inert) == (["d"], [])
    assert [n.op_type for n in inert.graph.node] == ["Neg"] and inert.graph.node[0].input[0] == "x"
    # a training Dropout in the inference graph is reported, not removed
    training = _graph([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="d")],
                      {"r": np.array(0.1, np.float32), "t": np.array(True)})
    assert fixups.strip_inert_dropouts(training) == ([], ["d"])
    # eval-mode initializer dedup (Identity from a shared weight) is undone
    dedup = _graph([helper.make_node("Identity", ["w"], ["w2"]),
                    helper.make_node("Add", ["x", "w2"], ["y"])], {"w": np.ones(4, np.float32)})
    assert fixups.undo_initializer_dedup(dedup) == ["w2"]
    assert [n.op_type for n in dedup.graph.node] == ["Add"]
    onnx.checker.check_model(dedup)


def test_graph_the_onnx_checker_rejects_is_not_written(tmp_path, cnn, monkeypatch):
    real = export_module.export_mode

    def invalid_infer(model, inputs, *, train, opset, **kwargs):
        graph, shown = real(model, inputs, train=train, opset=opset, **kwargs)
        if not train:  # a node reading a value nothing produces: checked on the written file
            graph.graph.node[0].input[0] = "nowhere"
        return graph, shown

    monkeypatch.setattr(export_module, "export_mode", invalid_infer)
    model, inputs = cnn
    with pytest.raises(ExportError, match="not valid ONNX"):
        export_pair(model, inputs, tmp_path / "out", exporter="torchscript")
    assert not list((tmp_path / "out").glob("*")), "a graph or a temporary file was left behind"


class Positions(nn.Module):
    """Weights, and buffers shape inference needs the values of (positions sliced by length)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.emb = nn.Linear(32, 32), nn.Embedding(16, 32)
        self.register_buffer("positions", torch.arange(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.emb(self.positions[: x.shape[1]])


def test_shape_inference_gets_no_weights_and_the_graphs_stay_the_same(monkeypatch):
    from graphtricks.onnx import torchscript
    from graphtricks.onnx.weights import WeightTable

    torch.manual_seed(0)
    model, inputs = Positions(), (torch.randn(2, 8, 32),)
    full = torch._C._jit_pass_onnx_graph_shape_type_inference
    seen: list[dict[str, tuple]] = []

    def recorded(graph, params, opset):
        seen.append({k: (v.dtype, v.numel()) for k, v in params.items()})
        return full(graph, params, opset)

    def structure(train: bool) -> bytes:
        with WeightTable() as table:
            graph, _ = torchscript.export_mode(model, inputs, train=train, opset=18, table=table)
        for init in graph.graph.initializer:  # stubs name their table
            init.ClearField("external_data")
        return graph.SerializeToString()

    monkeypatch.setattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", recorded)
    light = [structure(train) for train in (True, False)]
    # the positions' values are kept (they decide a shape), the weights' are not
    assert seen and all("positions" in p and not {"fc.weight", "emb.weight"} & set(p) for p in seen)
    seen.clear()
    monkeypatch.setattr(torchscript, "_shape_inference_on_types", contextlib.nullcontext)
    assert [structure(train) for train in (True, False)] == light
    assert seen and all({"fc.weight", "emb.weight", "positions"} <= set(params) for params in seen)
    assert torch._C._jit_pass_onnx_graph_shape_type_inference is recorded  # put back


def test_files_are_flushed_to_disk_before_they_are_renamed_into_place(tmp_path, cnn, monkeypatch):
    model, inputs = cnn
    synced: set[str] = set()
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        fsync(fd)
        synced.add(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))

    def checked_replace(src, dst) -> None:
        assert os.path.basename(src) in synced, f"{src} renamed before it was flushed"
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", checked_replace)
    for external in (False, True):
        synced.clear()
        export_pair(model, inputs, tmp_path / str(external), external_data=external)
        assert synced == {"model.train.onnx", "model.infer.onnx"} | ({"model.data"} if external else set())


class FailsInTrainMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x.view(-1, 3)  # the example inputs do not fit this
        return self.fc(x)


class ReturnsNoTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"shape": tuple(x.shape)}


def test_models_rejecting_the_inputs_in_a_mode_or_returning_no_tensor_are_one_line_errors(tmp_path):
    with pytest.raises(ExportError, match="rejects the example inputs in train mode") as info:
        export_pair(FailsInTrainMode(), (torch.randn(2, 4),), tmp_path / "a")
    assert "\n" not in str(info.value)
    with pytest.raises(ExportError, match="returns no tensor"):
        export_pair(ReturnsNoTensor(), (torch.randn(2, 4),), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
