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


class Diff(nn.Module):
    """``torch.diff`` with fixed arguments, after a learnt scale (so the graphs carry a weight)."""

    def __init__(self, n=1, dim=-1, prepend=None, append=None):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 5))
        self.n, self.dim = n, dim
        self.register_buffer("before", prepend, persistent=False)
        self.register_buffer("after", append, persistent=False)

    def forward(self, x):
        x = x * self.scale if x.is_floating_point() else x
        return torch.diff(x, n=self.n, dim=self.dim, prepend=self.before, append=self.after)


def _run_infer_graph(folder, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.infer.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return out


DIFF_CASES = {
    "n1-last": {},
    "n2-dim0-prepend-append": {"n": 2, "dim": 0, "prepend": torch.full((2, 4, 5), -1.0), "append": torch.ones(1, 4, 5)},
    "n3-dim1-append": {"n": 3, "dim": 1, "append": torch.arange(30.0).reshape(3, 2, 5)},
    "n0-prepend": {"n": 0, "dim": -2, "prepend": torch.zeros(3, 1, 5)},
    "int64-prepend-promotes": {"dim": 2, "prepend": torch.zeros(3, 4, 1, dtype=torch.int64)},
}


@pytest.mark.parametrize("case", sorted(DIFF_CASES))
def test_diff_exports_and_matches_pytorch(tmp_path, case):
    model, x = Diff(**DIFF_CASES[case]).eval(), torch.randn(3, 4, 5)
    export_pair(model, (x,), tmp_path)  # the train graph is checked against PyTorch here
    with torch.no_grad():
        want = model(x)
    got = _run_infer_graph(tmp_path, x)
    assert got.shape == tuple(want.shape) and got.dtype == want.numpy().dtype
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
    report = validate_pair(model, (x,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


@pytest.mark.parametrize(
    ("x", "kwargs"),
    [
        (torch.tensor([[3, 4, 5, 0, 1, 7], [0, 1, 2, 3, 4, 5]]), {"prepend": torch.tensor([[2], [-1]])}),
        (torch.tensor([[True, False, False, True, True]]), {"n": 2}),  # bool: x[1:] != x[:-1]
        (torch.tensor([5, 1, 8], dtype=torch.int32), {"n": 7}),  # n past the length: empty
    ],
    ids=["int64-prepend", "bool-n2", "int32-empty"],
)
def test_diff_of_integers_and_bools_is_exact(tmp_path, x, kwargs):
    class IntDiff(nn.Module):
        def forward(self, x):
            return torch.diff(x, **kwargs)

    export_pair(IntDiff(), (x,), tmp_path, verify=False)
    want = IntDiff()(x)
    got = _run_infer_graph(tmp_path, x)
    assert got.dtype == want.numpy().dtype
    assert got.shape == tuple(want.shape)
    assert (got == want.numpy()).all()


def test_packed_sequence_cumsum_of_bools_exports(tmp_path):
    """transformers' ``find_packed_sequence_indices``: ``(diff(pos, prepend=pos[:, :1] - 1) != 1).cumsum(-1)``."""

    class Packed(nn.Module):
        def forward(self, pos):
            step = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
            return (step != 1).cumsum(-1), (step > 0).to(torch.int32).cumsum(1, dtype=torch.float32)

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    export_pair(Packed(), (pos,), tmp_path, verify=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.infer.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: pos.numpy()})
    for g, w in zip(got, Packed()(pos)):
        assert g.dtype == w.numpy().dtype
        assert (g == w.numpy()).all()
    assert got[0].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8]


def test_llama_for_causal_lm_exports_and_validates(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    ids = torch.randint(0, 100, (2, 7))
    result = export_pair(model, (ids,), tmp_path)
    assert result.output_names == ("logits",)
    report = validate_pair(model, (ids,), tmp_path, device="cpu", seeds=(0,))
    assert report.passed, report.summary()


def test_diff_and_cumsum_registrations_are_undone(tmp_path):
    from torch.onnx._internal.torchscript_exporter import registration

    before = {op: registration.registry.get_function_group(op) for op in ("aten::diff", "aten::cumsum")}
    before = {op: group and group.get(18) for op, group in before.items()}
    export_pair(Diff().eval(), (torch.randn(3, 4, 5),), tmp_path)
    for op, fn in before.items():
        group = registration.registry.get_function_group(op)
        assert (group and group.get(18)) is fn
