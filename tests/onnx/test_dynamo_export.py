"""The torch.export path: train and MC twins, the TorchScript fallback, dynamic dimensions, no warnings."""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphtricks.errors import ExportError
from graphtricks.onnx import INFER_FILE, TRAIN_FILE, export_pair, validate_pair
from graphtricks.onnx.names import MC_FILE
from graphtricks.onnx.portable import BN_TAG, DROPOUT_TAG, portable_dropouts
from graphtricks.onnx.twin import alpha_dropout_values, make_twin
from graphtricks.onnx.cuda_kernels import cuda_gaps
from tests.conftest import EXAMPLE_MODELS, example


class ConvBnDrop(nn.Module):
    """Conv-BN-ReLU, element and channel dropout, a functional dropout, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop2d = nn.Dropout2d(0.2)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.drop2d(F.relu(self.bn(self.conv(x)))))
        return self.head(F.dropout(y.mean((2, 3)), 0.1, self.training))


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def _seq() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.2), nn.Dropout(0.3))


def test_twin_is_the_train_forward_with_explicit_dropout_and_batch_statistics():
    torch.manual_seed(0)
    model, x = _seq().train(), torch.randn(4, 3, 8, 8)
    reference = _seq().train()
    reference.load_state_dict(model.state_dict())
    twin, mode = make_twin(model)
    out, *updated = twin(x)
    expected = reference(x)
    assert out.shape == expected.shape
    assert [n for n, _ in mode.updated] == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    assert int(model[1].num_batches_tracked) == 0  # the twin writes no buffer: its outputs carry them
    assert int(updated[0]) == int(reference[1].num_batches_tracked) == 1
    torch.testing.assert_close(updated[1], reference[1].running_mean)
    torch.testing.assert_close(updated[2], reference[1].running_var)
    for m in (model, reference):  # the deterministic part: every dropout keeps everything
        m[3].p = m[4].p = 0.0
    torch.testing.assert_close(twin(x)[0], reference(x))


def test_twin_dropout_survivors_equal_pytorchs_bit_for_bit():
    x = torch.randn(64, 64)
    twin, _ = make_twin(nn.Dropout(0.3).train())
    (y,) = twin(x)
    kept = y != 0
    assert torch.equal(y[kept], (x * (1.0 / (1.0 - 0.3)))[kept])
    assert 0.6 < kept.float().mean() < 0.8


def test_default_export_is_dynamo_and_validates_with_no_dropout_or_batchnorm_in_train(tmp_path):
    torch.manual_seed(0)
    model, x = ConvBnDrop().eval(), torch.randn(4, 3, 8, 8)
    result = export_pair(model, (x,), tmp_path)
    assert result.exporter == "dynamo"
    assert set(result.graph_exporters) == {TRAIN_FILE, INFER_FILE}
    train_ops = _ops(tmp_path / TRAIN_FILE)
    assert "Dropout" not in train_ops and "BatchNormalization" not in train_ops
    assert train_ops.count("RandomUniformLike") == 3
    train = onnx.load(str(tmp_path / TRAIN_FILE))
    assert len(portable_dropouts(train)) == 3
    assert any(n.name.startswith(BN_TAG) for n in train.graph.node)
    assert [o.name for o in train.graph.output][1:] == [
        "updated.bn.num_batches_tracked", "updated.bn.running_mean", "updated.bn.running_var"]
    assert "BatchNormalization" in _ops(tmp_path / INFER_FILE)  # not folded into the Conv
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def test_train_graph_draws_fresh_masks_in_a_default_session(tmp_path):
    model, x = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5)).eval(), torch.randn(8, 16)
    export_pair(model, (x,), tmp_path)
    session = ort.InferenceSession(str(tmp_path / TRAIN_FILE), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    first, second = session.run(None, feed)[0], session.run(None, feed)[0]
    assert not np.array_equal(first == 0, second == 0)


def test_data_dependent_control_flow_falls_back_to_torchscript_with_a_note(tmp_path, capfd):
    model, inputs = example("models/control_flow.py:DataDependent")
    capfd.readouterr()
    result = export_pair(model, inputs, tmp_path)
    assert capfd.readouterr() == ("", "")  # torch.export's graph dump and warning stay inside
    assert result.exporter == "torchscript"
    assert any("TorchScript exporter instead of torch.export" in n for n in result.notes)
    assert all(v.startswith("torchscript") for v in result.graph_exporters.values())
    assert validate_pair(model, inputs, tmp_path, device="cpu", seeds=(0,)).passed


def test_torchscript_stays_selectable(tmp_path):
    model, x = ConvBnDrop().eval(), torch.randn(4, 3, 8, 8)
    result = export_pair(model, (x,), tmp_path, exporter="torchscript")
    assert result.exporter == "torchscript"
    assert validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,)).passed


def test_no_deprecation_or_tracer_warning_reaches_the_user_on_the_default_path(tmp_path):
    model, x = ConvBnDrop().eval(), torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("error", FutureWarning)
        export_pair(model, (x,), tmp_path)


def test_dynamic_dims_export_symbolic_and_validate_at_other_sizes(tmp_path):
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2))
    x = torch.randn(3, 4, 10)
    result = export_pair(model.eval(), (x,), tmp_path, dynamic_batch=True, dynamic_dims={"input": [2]})
    assert result.dynamic_dims == {"input": [0, 2]} and result.exporter == "dynamo"
    graph = onnx.load(str(tmp_path / INFER_FILE))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[1].dim_value == 4 and not dims[2].HasField("dim_value")
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    assert any("input:0 at 4" in n and "input:2 at 11" in n for n in report.notes)


def test_a_specialised_dynamic_dim_is_a_one_line_error_naming_it(tmp_path):
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], 3, 10)  # 30 features, whatever the size

    with pytest.raises(ExportError, match="cannot keep dimension x:1 .* dynamic") as info:
        export_pair(Fixed(), (torch.randn(2, 30),), tmp_path, dynamic_dims={"x": [1]})
    assert "\n" not in str(info.value)
    assert not (tmp_path / TRAIN_FILE).exists()


def test_unknown_dynamic_input_or_dim_is_an_export_error(tmp_path):
    model, x = ConvBnDrop().eval(), torch.randn(4, 3, 8, 8)
    with pytest.raises(ExportError, match="does not have"):
        export_pair(model, (x,), tmp_path, dynamic_dims={"nope": [0]})
    with pytest.raises(ExportError, match="has 4 dimension"):
        export_pair(model, (x,), tmp_path, dynamic_dims={"x": [7]})


def test_mc_dropout_graph_has_portable_dropout_and_eval_batchnorm(tmp_path):
    torch.manual_seed(0)
    model, x = ConvBnDrop().eval(), torch.randn(4, 3, 8, 8)
    result = export_pair(model, (x,), tmp_path, mc_dropout=True)
    assert result.mc_path == tmp_path / MC_FILE
    mc = onnx.load(str(tmp_path / MC_FILE))
    ops = [n.op_type for n in mc.graph.node]
    assert "Dropout" not in ops and "BatchNormalization" not in ops or "RandomUniformLike" in ops
    assert "Dropout" not in ops and ops.count("RandomUniformLike") == 3
    assert not any(n.name.startswith(BN_TAG) for n in mc.graph.node)  # BatchNorm on running stats
    assert [o.name for o in mc.graph.output] == ["output"]
    # eval-equal once every dropout keeps everything (p -> 0: ratio 0, scale 1)
    for init in mc.graph.initializer:
        if init.name.startswith(DROPOUT_TAG) and init.name.endswith((".ratio", ".scale")):
            fill = 0.0 if init.name.endswith(".ratio") else 1.0
            value = onnx.numpy_helper.to_array(init)
            init.CopyFrom(onnx.numpy_helper.from_array(np.full_like(value, fill), init.name))
    session = ort.InferenceSession(mc.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-5)
    # a later export without the flag removes the stale MC graph
    export_pair(model, (x,), tmp_path)
    assert not (tmp_path / MC_FILE).exists()


def test_mc_dropout_graph_by_torchscript_too(tmp_path):
    model, x = ConvBnDrop().eval(), torch.randn(4, 3, 8, 8)
    export_pair(model, (x,), tmp_path, mc_dropout=True, exporter="torchscript")
    mc = onnx.load(str(tmp_path / MC_FILE))
    ops = [n.op_type for n in mc.graph.node]
    assert "Dropout" not in ops and ops.count("RandomUniformLike") == 3
    assert len(portable_dropouts(mc)) == 3


def test_mc_dropout_graph_by_torchscript_keeps_the_pair_s_dynamic_dimensions(tmp_path):
    model, x = ConvBnDrop().eval(), torch.randn(4, 3, 8, 8)
    export_pair(model, (x,), tmp_path, mc_dropout=True, exporter="torchscript", dynamic_batch=True)
    dims = {p: [d.dim_param or d.dim_value for d in onnx.load(str(tmp_path / p)).graph.input[0].type.tensor_type.shape.dim]
            for p in (INFER_FILE, MC_FILE)}
    assert dims[MC_FILE] == dims[INFER_FILE] and isinstance(dims[MC_FILE][0], str)
    assert validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,)).passed


class _TrainScale(nn.Module):
    """A model whose own code scales by a constant in train mode only (a one-value constant that
    the torch.export-based exporter writes as an initializer of the train graph alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        x = self.fc1(x)
        if self.training:
            x = x * 0.5
        return self.fc2(F.dropout(x, 0.25, self.training))


def test_a_train_only_constant_of_the_model_s_own_code_is_no_weight_difference(tmp_path):
    model, x = _TrainScale().eval(), torch.randn(4, 3)
    export_pair(model, (x,), tmp_path)
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


@pytest.mark.parametrize("spec", sorted(EXAMPLE_MODELS), ids=lambda s: s.split(":")[1])
def test_every_op_the_default_exporter_emits_has_a_cuda_kernel(tmp_path, spec):
    import graphtricks as gt

    model, inputs = example(spec)
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_inputs=inputs)
    exported = export_pair(result.model, inputs, tmp_path, mc_dropout=True)
    for name in (TRAIN_FILE, INFER_FILE, MC_FILE):
        assert cuda_gaps(onnx.load(tmp_path / name)) == [], (name, exported.exporter)


@pytest.mark.slow
def test_bert_with_a_dynamic_sequence_validates_at_another_length_and_has_cuda_kernels(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)
        result = export_pair(model, (ids, mask), tmp_path, input_names=["input_ids", "attention_mask"],
                             dynamic_batch=True, dynamic_dims={"input_ids": [1], "attention_mask": [1]},
                             mc_dropout=True)
    assert result.exporter == "dynamo"
    longer = torch.ones(2, 24, dtype=torch.int64)
    longer[0, 19:] = 0
    report = validate_pair(model, (ids, mask), tmp_path, device="cpu", seeds=(0,),
                           extra_inputs=[(torch.randint(0, 100, (2, 24)), longer)])
    assert report.passed, report.summary()
    for name in (TRAIN_FILE, INFER_FILE, MC_FILE):
        assert cuda_gaps(onnx.load(tmp_path / name)) == [], name


class SeluNet(nn.Module):
    """A self-normalising net: element and channel alpha dropout, a cumulative-average BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=None)
        self.drop = nn.AlphaDropout(0.2)
        self.conv2, self.drop2d = nn.Conv2d(8, 8, 1), nn.FeatureAlphaDropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.selu(self.bn(self.conv1(x))))
        return self.drop2d(F.selu(self.conv2(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channel", [False, True])
def test_twin_alpha_dropout_equals_pytorchs_for_the_same_mask_bit_for_bit(dtype, channel):
    torch.manual_seed(0)
    x, p = (torch.randn(32, 16, 5, 5) * 3).to(dtype), 0.3
    alpha = 1.7580993408473766  # ATen's alpha dropout, step by step, on PyTorch's own mask
    a = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p))
    expected = (F.feature_alpha_dropout if channel else F.alpha_dropout)(x, p, True)
    module = (nn.FeatureAlphaDropout if channel else nn.AlphaDropout)(p).train()
    twin, _ = make_twin(module)
    (y,) = twin(x)
    # the twin's own draw, element or channel, keeps 1 - p
    dropped = y == twin_dropped_value(p, dtype)
    assert abs(dropped.float().mean().item() - p) < 0.1
    if channel:  # each (sample, channel) dropped whole (in half precision a kept x may round to it)
        share = dropped.flatten(2).float().mean(-1)
        assert ((share == 1) | (share < 0.5)).all()
    # PyTorch's mask, read off its output, through the twin's formula gives PyTorch's values
    noise = (expected != twin_dropped_value(p, dtype)).to(dtype)
    b = noise.add(-1).mul_(alpha * a).add_(alpha * a * p)
    assert torch.equal(x * noise.mul(a) + b, expected)  # premise: ATen's formula, reproduced
    scale, kept_shift, dropped_shift = alpha_dropout_values(p, dtype)
    shift = torch.where(noise.bool(), x.new_full((), kept_shift), x.new_full((), dropped_shift))
    assert torch.equal(x * (noise * scale) + shift, expected)


def twin_dropped_value(p: float, dtype: torch.dtype) -> float:
    return alpha_dropout_values(p, dtype)[2]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_alpha_dropout_and_cumulative_batchnorm_export_as_the_twin_and_validate(exporter, tmp_path):
    torch.manual_seed(0)
    model, x = SeluNet().eval(), torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        model.bn.num_batches_tracked.fill_(4)  # the factor is 1/5: the update rule matters
        model.bn.running_mean.uniform_(-1, 1)
    result = export_pair(model, (x,), tmp_path, mc_dropout=True, exporter=exporter)
    # the default path keeps them: no fallback to TorchScript
    assert result.exporter == exporter and not any("instead of torch.export" in n for n in result.notes)
    train = onnx.load(str(tmp_path / TRAIN_FILE))
    drops = portable_dropouts(train)
    assert len(drops) == 2 and all(d.shift for d in drops)
    assert "BatchNormalization" not in _ops(tmp_path / TRAIN_FILE)
    # the running statistics of one train step, as PyTorch writes them
    session = ort.InferenceSession(str(tmp_path / TRAIN_FILE), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x.numpy()})))
    reference = SeluNet()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference.train()(x)
    assert int(got["updated.bn.num_batches_tracked"]) == 5
    for stat in ("running_mean", "running_var"):
        np.testing.assert_allclose(got[f"updated.bn.{stat}"], getattr(reference.bn, stat).numpy(),
                                   rtol=1e-5, atol=1e-6)
    for name in (TRAIN_FILE, INFER_FILE, MC_FILE):  # alpha dropout's Where and Add run on CUDA too
        assert cuda_gaps(onnx.load(tmp_path / name)) == [], name
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0, 1))
    assert report.passed, report.summary()
    rates = [c for c in report.checks if c.name == "dropout_rate"]
    assert {c.graph for c in rates} == {"train", "mc"}  # the MC graph's alpha dropouts too
    assert len(rates) == 8 and all(c.details["shift_values"] and c.details["mask_applied"] for c in rates)


@pytest.mark.parametrize("constant", ["shift_dropped", "shift_kept", "scale"])
def test_an_alpha_dropout_with_wrong_values_fails_validation(constant, tmp_path):
    torch.manual_seed(0)
    model, x = SeluNet().eval(), torch.randn(8, 3, 10, 10)
    export_pair(model, (x,), tmp_path)
    train = onnx.load(str(tmp_path / TRAIN_FILE))
    (init,) = [i for i in train.graph.initializer if i.name == f"{DROPOUT_TAG}0.{constant}"]
    # what a plain dropout's form would give: no shift, or the 1/(1-p) scale
    wrong = 0.0 if constant.startswith("shift") else 1.0 / (1.0 - 0.2)
    init.CopyFrom(onnx.numpy_helper.from_array(np.full_like(onnx.numpy_helper.to_array(init), wrong), init.name))
    onnx.save(train, str(tmp_path / TRAIN_FILE))
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    failed = {c.name for c in report.checks if not c.passed}
    assert "dropout_rate" in failed, report.summary()
