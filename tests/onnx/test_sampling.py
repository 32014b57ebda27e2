"""MC-dropout sampling (``gt.mc_sample``): tiled samples that are real draws, eval elsewhere, honest errors.

The ONNX side runs on graphs with ``RandomUniformLike`` dropout: the portable train graph of a
BatchNorm-free model (which is, op for op, its MC graph) and a small hand-built one.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.nn import functional as F

import graphtricks as gt
from graphtricks.errors import GraphtricksError
from graphtricks.onnx import export_pair
from graphtricks.onnx.eager import DropoutInterceptor, digest_model
from graphtricks.onnx.sampling import predictive_entropy, summarise

ort = pytest.importorskip("onnxruntime")


def bn_net() -> nn.Module:
    """Linear → BatchNorm → ReLU → Linear, rewritten with dropout; running statistics set away from the data's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-2, 2)
        model[1].running_var.uniform_(0.5, 3)
    return gt.rewrite(model, [gt.InsertDropout(p=0.2)], example_inputs=(torch.randn(4, 6),)).model


def test_forced_interceptor_drops_in_eval_and_refuses_both_modes():
    x = torch.ones(10_000)
    with DropoutInterceptor(neutralise=False, force=True) as forced:
        y = F.dropout(x, 0.25, training=False)
    assert forced.calls == [0.25]
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75))
    assert 0.2 < (y == 0).float().mean() < 0.3
    with pytest.raises(ValueError):
        DropoutInterceptor(neutralise=True, force=True)


def test_summary_statistics_match_their_definitions():
    # two samples of one example over two classes: softmax (0.5, 0.5) and (e/(1+e), 1/(1+e))
    samples = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]]])
    mc = summarise(samples, keep_samples=True)
    p1 = torch.tensor([math.e / (1 + math.e), 1 / (1 + math.e)])
    probs = (torch.tensor([0.5, 0.5]) + p1) / 2
    h = -(probs * probs.log()).sum()
    expected = (math.log(2) - (p1 * p1.log()).sum()) / 2
    assert torch.allclose(mc.mean, torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(mc.std, torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(mc.probs, probs[None])
    assert torch.allclose(mc.entropy, h[None].float())
    assert torch.allclose(mc.mutual_information, (h - expected)[None].float(), atol=1e-6)
    assert mc.samples is samples
    assert torch.allclose(predictive_entropy(torch.tensor([[1.0, 0.0]])), torch.zeros(1))


def test_torch_samples_are_draws_around_the_eval_output_with_bn_on_running_statistics():
    model = bn_net().train()
    before = digest_model(model)
    x = torch.randn(5, 6) * 2 + 3  # batch statistics far from the running ones
    mc = gt.mc_sample(model, x, samples=400, seed=0, keep_samples=True)
    assert mc.samples.shape == (400, 5, 4) and mc.runs == 1
    assert not torch.equal(mc.samples[0], mc.samples[1])  # fresh masks per sample
    with torch.no_grad():
        eval_out = model.eval()(x)
    model.train()
    # dropout before the last Linear is unbiased: E[sample] = the eval output (BatchNorm in eval)
    err = (mc.mean - eval_out).abs()
    assert (err <= 5 * mc.std / math.sqrt(400) + 1e-6).all(), err
    assert (mc.entropy <= math.log(4) + 1e-6).all() and (mc.mutual_information >= 0).all()
    assert digest_model(model).differences(before) == []  # modes and running statistics untouched


def test_torch_tiling_in_chunks_and_seed_reproduce():
    model = bn_net()
    x = torch.randn(3, 6)
    one = gt.mc_sample(model, x, samples=8, seed=1, keep_samples=True)
    again = gt.mc_sample(model, x, samples=8, seed=1, keep_samples=True)
    chunked = gt.mc_sample(model, x, samples=8, seed=1, max_rows=5, keep_samples=True)
    assert torch.equal(one.samples, again.samples)
    assert chunked.runs == 5 and chunked.samples.shape == one.samples.shape


def test_torch_keep_rate_and_scale_of_a_forced_dropout():
    model = nn.Sequential(nn.ReLU(), nn.Dropout(0.25))
    mc = gt.mc_sample(model, torch.ones(50, 40), samples=20, seed=0, keep_samples=True)
    values = mc.samples.flatten()
    kept = values[values != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75))
    n = values.numel()
    rate = float((values == 0).float().mean())
    assert abs(rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)


@pytest.mark.parametrize("bad, message", [
    (dict(samples=1), "samples ≥ 2"),
    (dict(max_rows=0), "max_rows"),
    (dict(output=3), "output 3"),
])
def test_bad_arguments_are_one_line_errors(bad, message):
    with pytest.raises(GraphtricksError, match=message):
        gt.mc_sample(bn_net(), torch.randn(2, 6), **{"samples": 4, **bad})


def test_a_model_without_dropout_and_mismatched_batches_are_refused():
    with pytest.raises(GraphtricksError, match="applies no dropout"):
        gt.mc_sample(nn.Linear(6, 4), torch.randn(2, 6))

    class Two(nn.Module):
        def forward(self, a, b):
            return F.dropout(a, 0.5, self.training) + b

    with pytest.raises(GraphtricksError, match="same batch size"):
        gt.mc_sample(Two(), (torch.randn(2, 3), torch.randn(3, 3)))


@pytest.fixture(scope="module")
def portable_pair(tmp_path_factory):
    """The exported pair of a BatchNorm-free dropout MLP, dynamic and fixed batch."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    model = gt.rewrite(plain, [gt.InsertDropout(p=0.3)], example_inputs=(torch.randn(4, 6),)).model
    out = tmp_path_factory.mktemp("mc")
    return model, {dyn: export_pair(model, (torch.randn(4, 6),), out / str(dyn), dynamic_batch=dyn)
                   for dyn in (True, False)}


def test_onnx_dynamic_batch_samples_in_one_run(portable_pair):
    model, pairs = portable_pair
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    session = ort.InferenceSession(str(pairs[True].train_path), providers=["CPUExecutionProvider"])
    mc = gt.mc_sample(session, {"input": x}, samples=300, keep_samples=True)
    assert mc.runs == 1 and isinstance(mc.mean, np.ndarray) and mc.samples.shape == (300, 4, 4)
    with torch.no_grad():
        eval_out = model.eval()(torch.from_numpy(x)).numpy()
    assert (np.abs(mc.mean - eval_out) <= 5 * mc.std / math.sqrt(300) + 1e-6).all()
    by_name = gt.mc_sample(str(pairs[True].train_path), x, samples=3, output="output")
    assert by_name.entropy.shape == (4,)


def test_onnx_fixed_batch_runs_in_calls_of_its_size(portable_pair):
    _, pairs = portable_pair
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    mc = gt.mc_sample(str(pairs[False].train_path), x, samples=5, keep_samples=True)
    assert mc.runs == 5 and mc.samples.shape == (5, 4, 4)
    assert not np.array_equal(mc.samples[0], mc.samples[1])


def test_inputs_a_model_or_graph_rejects_are_one_line_errors(portable_pair):
    model, pairs = portable_pair
    with pytest.raises(GraphtricksError, match="rejects the inputs"):
        gt.mc_sample(model, torch.randn(2, 7), samples=2)
    with pytest.raises(GraphtricksError, match="ONNX Runtime rejects the inputs"):
        gt.mc_sample(str(pairs[True].train_path), np.zeros((2, 6), np.int64), samples=2)


def test_onnx_inference_graph_is_refused(portable_pair):
    _, pairs = portable_pair
    with pytest.raises(GraphtricksError, match="draws no dropout mask"):
        gt.mc_sample(str(pairs[True].infer_path), np.zeros((2, 6), np.float32), samples=3)
    with pytest.raises(GraphtricksError, match="not a file"):
        gt.mc_sample("no/such/model.mc.onnx", np.zeros((2, 6), np.float32))


def test_onnx_train_graph_with_batch_statistics_is_refused(tmp_path):
    result = export_pair(bn_net(), (torch.randn(4, 6),), tmp_path, dynamic_batch=True)
    with pytest.raises(GraphtricksError, match="train graph"):
        gt.mc_sample(str(result.train_path), np.zeros((2, 6), np.float32))


def test_hand_built_random_uniform_graph_pads_the_last_fixed_batch_call(tmp_path):
    # y = x * (RandomUniformLike(x) >= 0.5) * 2 with batch fixed at 4: 3 examples × 3 samples = 9 rows, 3 calls
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["u"], dtype=TensorProto.FLOAT),
        helper.make_node("GreaterOrEqual", ["u", "half"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["mask", "two"], ["scaled"]),
        helper.make_node("Mul", ["x", "scaled"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 50])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 50])],
        [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    path = tmp_path / "hand.mc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    mc = gt.mc_sample(str(path), np.ones((3, 50), np.float32), samples=3, keep_samples=True)
    assert mc.runs == 3 and mc.samples.shape == (3, 3, 50)
    assert set(np.unique(mc.samples)) <= {0.0, 2.0}


def test_a_timm_model_samples_its_own_dropout_with_drop_path_off():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, drop_rate=0.2, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 64, 64)
    mc = gt.mc_sample(model, x, samples=6, seed=0, keep_samples=True)
    assert mc.samples.shape == (6, 2, 1000) and (mc.std > 0).any()
    with DropoutInterceptor(neutralise=False, force=True) as seen, torch.no_grad():
        model(x)
    assert seen.calls == [0.2] and not seen.draws  # the head's dropout forced on; stochastic depth stays off in eval
