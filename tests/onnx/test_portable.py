"""The portable train graph in a default ONNX Runtime session, the float64 tolerance rule, CUDA
session options and the CUDA kernel list (CPU only; GPU tests are marked ``gpu``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from graphtricks.onnx import TRAIN_FILE, export_pair, validate_pair
from graphtricks.onnx.checks.numeric import NOISE_FACTOR, compare_output
from graphtricks.onnx.cuda_kernels import cuda_gaps, cuda_kernels
from graphtricks.onnx.portable import portable_dropouts
from graphtricks.onnx.report import CheckResult, Tolerance
from graphtricks.onnx.runtime import (
    DISABLE_CPU_FALLBACK,
    cuda_available,
    session_options,
)
from tests.conftest import EXAMPLE_MODELS, example

SIGMAS = 5.0


def default_session(path) -> ort.InferenceSession:
    """What a user writes: no options, no disabled optimizer."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_default_session_drops_elements_at_rate_and_scale_after_a_computed_value(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3))  # Relu -> dropout
    export_pair(model, (torch.randn(4, 64),), tmp_path, dynamic_batch=True)
    session = default_session(tmp_path / TRAIN_FILE)
    x = torch.randn(512, 64)
    expected = model.eval()(x).detach().numpy()
    first, second = (session.run(None, {"input": x.numpy()})[0] for _ in range(2))
    assert not np.array_equal(first, second)  # a new mask at every run
    nonzero = expected != 0
    kept = (first != 0) & nonzero
    n, k = int(nonzero.sum()), int(kept.sum())
    assert abs(k - 0.7 * n) < SIGMAS * (n * 0.3 * 0.7) ** 0.5
    scale = np.float32(1) / np.float32(0.7)
    np.testing.assert_allclose(first[kept], expected[kept] * scale, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("drop", [nn.Dropout2d(0.25), nn.Dropout1d(0.25)], ids=["2d", "1d"])
def test_default_session_drops_whole_channels_at_rate_and_scale(tmp_path, drop):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 1) if isinstance(drop, nn.Dropout2d) else nn.Conv1d(3, 64, 1)
    shape = (2, 3, 4, 4) if isinstance(drop, nn.Dropout2d) else (2, 3, 16)
    model = nn.Sequential(conv, drop)
    export_pair(model, (torch.randn(*shape),), tmp_path, dynamic_batch=True)
    x = np.random.default_rng(0).normal(size=(200, *shape[1:])).astype(np.float32)
    (y,) = default_session(tmp_path / TRAIN_FILE).run(None, {"input": x})
    expected = model.eval()(torch.from_numpy(x)).detach().numpy()
    kept = (y != 0).reshape(200, 64, -1)
    assert (kept.all(-1) | ~kept.any(-1)).all()  # each (sample, channel) kept or dropped whole
    whole = kept.all(-1)
    np.testing.assert_allclose(y[whole] * 0.75, expected[whole], rtol=1e-6, atol=1e-6)
    assert abs(whole.mean() - 0.75) < SIGMAS * (0.75 * 0.25 / whole.size) ** 0.5


class BnNet(nn.Module):
    """BatchNorm2d (momentum 0.1), BatchNorm2d (cumulative average) and BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, momentum=None)
        self.fc, self.bn3 = nn.Linear(8, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu())).relu()
        return self.bn3(self.fc(h.mean((2, 3))))


def test_default_session_matches_batchnorm_train_mode_and_its_running_stats(tmp_path):
    torch.manual_seed(0)
    model = BnNet()
    with torch.no_grad():  # stats a few steps in, so the update rule matters
        model.bn1.running_mean.uniform_(-1, 1), model.bn1.running_var.uniform_(0.5, 2)
        model.bn2.num_batches_tracked.fill_(4)
    x = torch.randn(6, 3, 10, 10) * 2 + 1
    export_pair(model, (x,), tmp_path)
    session = default_session(tmp_path / TRAIN_FILE)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"x": x.numpy()})))
    reference = BnNet()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = reference.train()(x)
    np.testing.assert_allclose(got["output"], expected.numpy(), atol=2e-5, rtol=1e-4)
    updated = sorted(n for n in names if n.startswith("updated."))
    assert updated == sorted(
        f"updated.{m}.{b}" for m in ("bn1", "bn2", "bn3")
        for b in ("running_mean", "running_var", "num_batches_tracked")
    )
    buffers = dict(reference.named_buffers())
    for name in updated:
        want = buffers[name.removeprefix("updated.")].numpy()
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    stats = [c for c in report.checks if c.name == "running_stats"]
    assert len(stats) == 9 and all(c.passed for c in stats)
    assert all(not s["disabled_optimizers"] for s in
               next(c for c in report.checks if c.name == "provenance").details.values())


def test_validation_measures_portable_dropout_in_a_default_session(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                          nn.Conv2d(8, 8, 1), nn.Dropout2d(0.2))
    x = torch.randn(8, 3, 8, 8)
    export_pair(model, (x,), tmp_path)
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0, 1))
    assert report.passed, report.summary()
    rates = [c for c in report.checks if c.name == "dropout_rate"]
    assert len(rates) == 4 and all(c.details["mask_applied"] for c in rates)
    assert sorted(round(d.ratio, 6) for d in portable_dropouts(onnx.load(tmp_path / TRAIN_FILE))) == [0.2, 0.3]


def base() -> CheckResult:
    return CheckResult(name="t", passed=False, message="", graph="infer", output="y", inputs="s")


def test_float64_reference_passes_float32_noise_and_fails_real_errors():
    truth = torch.tensor([1.0, 1e-6, 3.0], dtype=torch.float64)
    torch32 = torch.tensor([1.0 + 2e-5, 1e-6, 3.0], dtype=torch.float32)  # PyTorch's own error
    tight = Tolerance(1e-6, 1e-6)
    close = np.array([1.0 - 3e-5, 1e-6, 3.0], np.float32)  # 1.5x PyTorch's error: passes
    result = compare_output(close, torch32, tight, base(), truth)
    assert result.passed and result.details["judged_by"] == "float64 reference"
    assert result.details["pytorch_vs_float64_max_abs"] == pytest.approx(2e-5, rel=1e-2)
    assert result.details["noise_factor"] == NOISE_FACTOR and "vs float64" in result.message
    far = np.array([1.0, 1e-6, 3.01], np.float32)  # a wrong weight: far beyond the noise
    failed = compare_output(far, torch32, tight, base(), truth)
    assert not failed.passed and failed.details["onnx_vs_float64_max_abs"] > 1e-3
    loose = compare_output(far, torch32, Tolerance(0.1, 0.0), base(), truth)
    assert loose.passed and loose.details["judged_by"] == "fixed tolerance"


def test_cuda_sessions_disable_cpu_fallback_and_tf32():
    options, providers = session_options("cuda")
    assert options.get_session_config_entry(DISABLE_CPU_FALLBACK) == "1"
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"})
    relaxed, _ = session_options("cuda", strict=False)  # --device auto: fallback is reported
    with pytest.raises(RuntimeError):
        relaxed.get_session_config_entry(DISABLE_CPU_FALLBACK)
    cpu, cpu_providers = session_options("cpu")
    assert cpu_providers == ["CPUExecutionProvider"]
    assert cpu.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_kernel_list_reads_and_flags_what_cuda_lacks():
    kernels = cuda_kernels()
    assert {"RandomUniformLike", "ReduceMean", "GreaterOrEqual", "Conv"} <= set(kernels)
    assert "Col2Im" not in kernels
    node = onnx.helper.make_node("Col2Im", ["x", "s", "b"], ["y"], name="fold")
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([3, 3]), "s"),
         onnx.numpy_helper.from_array(np.array([2, 2]), "b")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    assert cuda_gaps(model) == ["Col2Im 'fold' (no CUDA kernel for version 18)"]


@pytest.mark.parametrize("spec", sorted(EXAMPLE_MODELS), ids=lambda s: s.split(":")[1])
def test_every_op_of_the_example_models_has_a_cuda_kernel(tmp_path, spec):
    import graphtricks as gt

    model, inputs = example(spec)
    result = gt.rewrite(model, [gt.InsertDropout(p=0.1)], example_inputs=inputs)
    export_pair(result.model, inputs, tmp_path)
    for name in ("model.train.onnx", "model.infer.onnx"):
        assert cuda_gaps(onnx.load(tmp_path / name)) == [], name


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU with onnxruntime-gpu and torch CUDA")
def test_portable_pair_validates_on_cuda_without_fallback(tmp_path):
    torch.manual_seed(0)
    model = BnNet()
    x = torch.randn(6, 3, 10, 10)
    export_pair(model, (x,), tmp_path)
    report = validate_pair(model, (x,), tmp_path, device="cuda", seeds=(0,))
    assert report.passed, report.summary()
    assert all(p[0] == "CUDAExecutionProvider" for p in report.providers.values())


class StdConv(nn.Conv2d):
    """timm's StdConv2dSame in small: standardises its weight with batch statistics in every mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.nn.functional.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, w, self.bias)


def test_weight_standardisation_in_eval_mode_is_no_train_op(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(StdConv(3, 4, 3), nn.ReLU(), nn.Dropout(0.2))
    x = torch.randn(4, 3, 8, 8)
    export_pair(model, (x,), tmp_path)
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    (check,) = [c for c in report.checks if c.name == "infer_has_no_train_ops"]
    assert check.passed, check.message
    assert report.passed, report.summary()
