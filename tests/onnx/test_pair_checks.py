"""The pair checks judge the model, not what the exporter folds: one tiny model per cause of the
registry's false failures of ``graphs_same_weights`` / ``graphs_same_operators``.

- a dropout on a path that reads no input (Swin V2's ``cpb_mlp``, timm's relative-position MLP,
  EfficientViM's ``sigmoid(alpha)`` gates; in the model, or inserted with ``constants=True``):
  what feeds it is the model's, shared by both graphs;
- shape arithmetic the exporter folds in one mode only (timm NASNet's ``Conv2dSame`` padding).

Each test also checks the case still fails when the graphs really differ.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

import graphtricks as gt
from graphtricks.onnx import export_pair, validate_pair
from graphtricks.onnx.checks.graphs import check_operators, check_weights, eager_modes
from graphtricks.onnx.train_only import data_values, dropout_subgraphs, train_only_feeds


class RelativeBias(nn.Module):
    """Logits plus a bias an MLP computes from a fixed coordinate table (no input reaches it)."""

    def __init__(self, dropout: float | None) -> None:
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 32).reshape(16, 2))
        drop = [nn.Dropout(dropout)] if dropout is not None else []
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), *drop, nn.Linear(8, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.mlp(self.table)


class Gated(nn.Module):
    """Residual branches scaled by the sigmoid of a parameter (EfficientViM's ``alpha``)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(2, 4))
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.alpha).view(2, -1, 1, 1)
        x = x + alpha[0] * (self.conv(x) - x)
        return x + alpha[1] * x.relu()


class SamePadConv(nn.Conv2d):
    """A convolution padded like TensorFlow's ``SAME``, sizes computed in forward (timm
    ``Conv2dSame``): traced by TorchScript, the padding is arithmetic on the input's shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n, s, k in zip(x.size()[-2:], self.stride, self.kernel_size):
            if isinstance(n, torch.Tensor):  # the tracer's sizes are tensors
                pads.append(torch.clamp(((n / s).ceil() - 1) * s + k - n, min=0))
            else:
                pads.append(max((-(-n // s) - 1) * s + k - n, 0))
        x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SamePadCell(nn.Module):
    """Two branches of dropout then a SAME-padded strided convolution (a NASNet cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.left = nn.Sequential(nn.ReLU(), nn.Dropout(0.1), SamePadConv(4, 4, 3, stride=2))
        self.right = nn.Sequential(nn.ReLU(), nn.Dropout(0.1), SamePadConv(4, 4, 5, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.left(x) + self.right(x)


def _pair(model: nn.Module, x: torch.Tensor, out: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    result = export_pair(model, (x,), out)
    return onnx.load(result.train_path), onnx.load(result.infer_path)


def _validated(model: nn.Module, x: torch.Tensor, out: Path):
    report = validate_pair(model, (x,), out, device="cpu", seeds=(0,))
    assert report.passed, report.summary()
    return {c.name: c for c in report.checks}


def _models():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4)
    in_model = RelativeBias(0.1).eval()  # timm swinv2_cr / vit_relpos: dropout in the MLP already
    # swin_v2 and efficientvim: dropout inserted where no input reaches, as constants=True asks
    inserted = gt.rewrite(RelativeBias(None).eval(), [gt.InsertDropout(p=0.1, constants=True)], (x,)).model
    gated_x = torch.randn(2, 4, 3, 3)
    gated = gt.rewrite(Gated().eval(), [gt.InsertDropout(p=0.1, constants=True)], (gated_x,)).model
    return {"dropout_in_model": (in_model, x), "dropout_inserted": (inserted, x), "gate": (gated, gated_x)}


@pytest.mark.parametrize("case", ["dropout_in_model", "dropout_inserted", "gate"])
def test_dropout_on_an_input_independent_path_keeps_its_weights_shared(case, tmp_path):
    model, x = _models()[case]
    train, infer = _pair(model, x, tmp_path)
    checks = _validated(model, x, tmp_path)
    weights = checks["graphs_same_weights"]
    # every parameter and buffer of the model is compared, in both graphs
    assert weights.details["only_train"] == weights.details["only_infer"] == []
    assert weights.details["train_count"] == weights.details["infer_count"] >= len(model.state_dict())
    assert checks["graphs_same_operators"].passed
    # the dropout's mask is applied to the fixed path, not spread over what follows it
    subs = dropout_subgraphs(train)
    assert subs and all(len(s.consumers) == 1 for s in subs)
    assert not {i.name for i in train.graph.initializer if i.name in train_only_feeds(train)} & {
        i.name for i in infer.graph.initializer}


def test_a_weight_changed_behind_such_a_dropout_still_fails(tmp_path):
    model, x = _models()["dropout_inserted"]
    train, infer = _pair(model, x, tmp_path)
    (fc2,) = [i for i in train.graph.initializer if i.name.startswith("mlp.") and i.name.endswith("bias")
              and i.dims == [4]]
    fc2.raw_data = (onnx.numpy_helper.to_array(fc2) + 1).astype("float32").tobytes()
    result = check_weights(train, infer)
    assert not result.passed and fc2.name in result.details["differing"]


def test_shape_arithmetic_folded_in_one_mode_only_is_not_the_model(tmp_path):
    torch.manual_seed(0)
    model, x = SamePadCell().eval(), torch.randn(2, 3, 9, 9)
    # the premise is a TorchScript artefact: torch.export's graphs fold the size in both modes
    result = export_pair(model, (x,), tmp_path, exporter="torchscript")
    train, infer = onnx.load(result.train_path), onnx.load(result.infer_path)
    # premise: the exporter left a Ceil of a constant size in the train graph only
    ceil = lambda g: sum(n.op_type == "Ceil" for n in g.graph.node)  # noqa: E731
    assert ceil(train) > ceil(infer)
    checks = _validated(model, x, tmp_path)
    assert checks["graphs_same_operators"].passed
    # shape arithmetic carries no data; the convolutions and the padding do
    data = data_values(train)
    assert all(o in data for n in train.graph.node if n.op_type in ("Conv", "Pad") for o in n.output)
    assert not any(o in data for n in train.graph.node if n.op_type in ("Ceil", "Shape") for o in n.output)
    # an operator on data that only one graph has still fails the check
    last = infer.graph.node[-1]
    last.output[0], name = "pre", last.output[0]
    infer.graph.node.append(helper.make_node("Neg", ["pre"], [name]))
    wrong = check_operators(train, infer)
    assert not wrong.passed and "Neg=(0, 1)" in wrong.message


class CachedBias(nn.Module):
    """Adds a bias table read by index in train mode and, in eval mode, a cache of it that the
    first eval forward fills (timm EfficientFormerV2's and LeViT's attention biases); like
    timm's, its ``train()`` clears the cache and returns None."""

    def __init__(self, heads: int = 2, n: int = 3) -> None:
        super().__init__()
        self.biases = nn.Parameter(torch.randn(heads, n * n))
        self.register_buffer("idxs", torch.randint(0, n * n, (n * n, n * n)))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):  # noqa: D102 -- returns None, as timm's does
        super().train(mode)
        self.cache = {}

    def bias(self) -> torch.Tensor:
        if self.training:
            return self.biases[:, self.idxs]
        if "bias" not in self.cache:
            self.cache["bias"] = self.biases[:, self.idxs]
        return self.cache["bias"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.bias()).softmax(-1)


class CachedBiasPerHead(CachedBias):
    """Reads the cache one head at a time (timm EfficientViT's cascaded attention): the exporter
    folds each head's slice of it into a constant of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias()
        return torch.stack([(x[:, h] + bias[h]).softmax(-1) for h in range(x.shape[1])], 1)


class CachedBiasNet(nn.Module):
    def __init__(self, attn: type[CachedBias] = CachedBias) -> None:
        super().__init__()
        self.proj, self.attn, self.head = nn.Linear(9, 9), attn(), nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, heads, 9, 9)
        return self.head(F.dropout(self.attn(self.proj(x)), 0.1, self.training))


def _cached_bias_pair(tmp_path, exporter: str = "dynamo", attn: type[CachedBias] = CachedBias):
    torch.manual_seed(0)
    model, x = CachedBiasNet(attn).eval(), torch.randn(2, 2, 9, 9)
    result = export_pair(model, (x,), tmp_path, exporter=exporter)
    assert result.exporter == exporter
    return model, x, onnx.load(result.train_path), onnx.load(result.infer_path)


@pytest.mark.parametrize(("exporter", "attn"), [("dynamo", CachedBias), ("torchscript", CachedBias),
                                               ("dynamo", CachedBiasPerHead)])
def test_weights_the_model_reads_in_one_mode_only_are_no_difference(exporter, attn, tmp_path):
    model, x, train, infer = _cached_bias_pair(tmp_path, exporter, attn)
    checks = _validated(model, x, tmp_path)
    assert checks["graphs_same_operators"].passed
    weights = checks["graphs_same_weights"]
    if exporter == "dynamo":  # premise: the train graph indexes the table, the inference graph adds the cache
        assert "attn.idxs" in {i.name for i in train.graph.initializer} - {i.name for i in infer.graph.initializer}
        assert "attn.idxs" in weights.details["read_in_one_mode"]
        # the cache whole, or folded into one constant per head
        cached = [i.name for i in infer.graph.initializer if i.name.startswith("constant.")
                  and list(i.dims) == ([2, 9, 9] if attn is CachedBias else [9, 9])]
        assert len(cached) == (1 if attn is CachedBias else 2) and set(cached) <= set(weights.details["read_in_one_mode"])
    # every weight both forwards read is still compared
    assert {"proj.weight", "head.weight", "head.bias"} <= {
        i.name for i in train.graph.initializer} & {i.name for i in infer.graph.initializer}


def test_eager_modes_records_what_each_forward_reads():
    torch.manual_seed(0)
    model, x = CachedBiasNet().eval(), torch.randn(2, 2, 9, 9)
    modes = eager_modes(model, (x,))
    assert {"attn.biases", "attn.idxs"} <= modes.state["train"] - modes.state["eval"]
    cache = model.attn.biases.detach()[:, model.attn.idxs].numpy()
    assert len(modes.fixed["eval"] - modes.fixed["train"]) == 1
    assert modes.call_difference()["__getitem__"] == (1, 0)
    assert cache.shape == (2, 9, 9)


def test_a_shared_weight_that_differs_or_a_changed_cache_still_fails(tmp_path):
    model, x, train, infer = _cached_bias_pair(tmp_path)
    modes = lambda: eager_modes(model, (x,))  # noqa: E731
    assert check_weights(train, infer, modes).passed
    inits = {i.name: i for i in infer.graph.initializer}
    # the eval cache made from other values is no longer what the model reads
    (cache,) = [i for i in infer.graph.initializer if list(i.dims) == [2, 9, 9]]
    original = cache.raw_data
    cache.raw_data = (onnx.numpy_helper.to_array(cache) + 1).astype("float32").tobytes()
    result = check_weights(train, infer, modes)
    assert not result.passed and cache.name in result.details["only_infer"]
    cache.raw_data = original
    # a weight both forwards read, changed in one graph, fails whatever the modes read
    weight = inits["proj.weight"]
    weight.raw_data = (onnx.numpy_helper.to_array(weight) + 1).astype("float32").tobytes()
    result = check_weights(train, infer, modes)
    assert not result.passed and result.details["differing"] == ["proj.weight"]


def test_a_model_whose_train_returns_none_exports_and_validates(tmp_path):
    torch.manual_seed(0)
    model, x = CachedBias(), torch.randn(2, 2, 9, 9)  # timm's attention modules as the root
    assert model.train(False) is None and model.eval() is None  # premise
    export_pair(model, (x,), tmp_path)
    _validated(model, x, tmp_path)
