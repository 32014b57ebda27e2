"""Focused tests of graphtricks.passes.init_draws: fans of each weight, and seeded draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphtricks.passes.init_draws import conv_fans, draw, is_bias, orthogonal, weight_specs

METHODS = ["xavier-uniform", "xavier-normal", "he-uniform", "he-normal", "orthogonal"]


# -- weight_specs --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module,expected",
    [
        (nn.Linear(8, 16), [("weight", 8, 16, 1, False)]),
        (nn.Linear(3, 5, bias=False), [("weight", 3, 5, 1, False)]),
        (nn.Conv2d(8, 16, 3), [("weight", 72, 144, 1, False)]),
        (nn.Conv2d(8, 16, 3, groups=2), [("weight", 36, 72, 1, False)]),  # per group
        (nn.Conv2d(8, 8, 3, groups=8), [("weight", 9, 9, 1, False)]),  # depthwise
        (nn.Conv1d(4, 6, 5), [("weight", 20, 30, 1, False)]),
        (nn.Conv3d(2, 4, (1, 2, 3)), [("weight", 12, 24, 1, False)]),
        # transposed: weight is (in, out/groups, *k); fans are still per group, in then out
        (nn.ConvTranspose2d(8, 16, 3, groups=2), [("weight", 36, 72, 1, False)]),
        (nn.ConvTranspose1d(4, 6, 5), [("weight", 20, 30, 1, False)]),
        (nn.ReLU(), []),
        (nn.LayerNorm(4), []),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_weight_specs_layers(module, expected):
    assert weight_specs(module) == expected


def test_weight_specs_stacked_lstm():
    specs = weight_specs(nn.LSTM(10, 20, num_layers=2))
    assert specs == [
        ("weight_ih_l0", 10, 20, 4, False),
        ("weight_hh_l0", 20, 20, 4, True),
        ("weight_ih_l1", 20, 20, 4, False),
        ("weight_hh_l1", 20, 20, 4, True),
    ]


def test_weight_specs_recurrent_variants():
    assert weight_specs(nn.GRU(6, 8)) == [("weight_ih_l0", 6, 8, 3, False), ("weight_hh_l0", 8, 8, 3, True)]
    assert weight_specs(nn.RNN(6, 8)) == [("weight_ih_l0", 6, 8, 1, False), ("weight_hh_l0", 8, 8, 1, True)]
    bi = weight_specs(nn.LSTM(6, 8, bidirectional=True))
    assert ("weight_ih_l0_reverse", 6, 8, 4, False) in bi and ("weight_hh_l0_reverse", 8, 8, 4, True) in bi
    assert len(bi) == 4
    assert weight_specs(nn.LSTMCell(6, 8)) == [("weight_ih", 6, 8, 4, False), ("weight_hh", 8, 8, 4, True)]
    # projections: hh reads the projected state, hr projects the hidden one
    proj = weight_specs(nn.LSTM(6, 8, proj_size=3))
    assert proj == [("weight_ih_l0", 6, 8, 4, False), ("weight_hh_l0", 3, 8, 4, True), ("weight_hr_l0", 8, 3, 1, False)]


def test_weight_specs_attention():
    specs = weight_specs(nn.MultiheadAttention(16, 4))
    assert specs == [("in_proj_weight", 16, 16, 3, False)]  # out_proj is a Linear of its own
    kv = weight_specs(nn.MultiheadAttention(16, 4, kdim=8, vdim=12))
    assert ("q_proj_weight", 16, 16, 1, False) in kv
    assert ("k_proj_weight", 8, 16, 1, False) in kv
    assert ("v_proj_weight", 12, 16, 1, False) in kv


class StdConv(nn.Module):
    """A plain module applying its own weight with F.conv2d (like timm's StdConv2d)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, None, 1, 1, 1, 2)


class PlainLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 7))

    def forward(self, x):
        return F.linear(x, self.weight)


class PlainConvT(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 2, 2))  # (in, out/groups, k, k)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, groups=2)


@pytest.mark.parametrize(
    "cls,target,expected",
    [
        (StdConv, F.conv2d, [("weight", 36, 72, 1, False)]),  # (16, 4, 3, 3) in 2 groups: 4*9 in, 16/2*9 out
        (PlainLinear, F.linear, [("weight", 7, 5, 1, False)]),
        (PlainConvT, F.conv_transpose2d, [("weight", 16, 12, 1, False)]),
    ],
)
def test_weight_specs_from_the_call(cls, target, expected):
    module = cls()
    gm = fx.symbolic_trace(module)
    call = next(n for n in gm.graph.nodes if n.target is target)
    assert weight_specs(module, call) == expected
    assert weight_specs(module) == []  # without the call, a plain module is not known


def test_conv_fans_and_is_bias():
    assert conv_fans(torch.Size([16, 4, 3, 3]), 2, False) == (36, 72)
    assert conv_fans(torch.Size([8, 3, 2, 2]), 2, True) == (16, 12)
    assert conv_fans(torch.Size([6, 4]), 1, False) == (4, 6)  # no kernel dims
    assert is_bias("bias") and is_bias("bias_ih_l0") and is_bias("bias_hh_l1_reverse") and is_bias("in_proj_bias")
    assert not is_bias("weight") and not is_bias("bias_k") and not is_bias("out_bias")


# -- draws ---------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("method", METHODS)
def test_draws_are_reproducible_and_leave_the_global_rng_alone(method):
    shape = (24, 12)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, info_a = draw(shape, method, 1.0, 12, 24, generator=_gen(7))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: same draw
    b, info_b = draw(shape, method, 1.0, 12, 24, generator=_gen(7))
    c, _ = draw(shape, method, 1.0, 12, 24, generator=_gen(8))
    assert torch.equal(a, b) and info_a == info_b
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == shape
    assert info_a["initializer"] == method


@pytest.mark.parametrize(
    "method,mode,gain,expected_fan,fan_mode",
    [
        ("xavier-uniform", "fan_in", 1.0, 384.0, "average"),
        ("xavier-normal", "fan_in", 5 / 3, 384.0, "average"),
        ("he-normal", "fan_in", math.sqrt(2), 256, "fan_in"),
        ("he-uniform", "fan_in", math.sqrt(2), 256, "fan_in"),
        ("he-normal", "fan_out", math.sqrt(2), 512, "fan_out"),
        ("he-uniform", "fan_out", 1.0, 512, "fan_out"),
    ],
)
def test_draw_statistics(method, mode, gain, expected_fan, fan_mode):
    shape = (512, 256)  # 131,072 values: the std is measured to well under 1 %
    w, info = draw(shape, method, gain, 256, 512, mode=mode, generator=_gen(0))
    std = gain / math.sqrt(expected_fan)
    assert info["fan"] == expected_fan and info["fan_mode"] == fan_mode
    assert info["std"] == pytest.approx(std)
    assert float(w.std()) == pytest.approx(std, rel=0.02)
    assert abs(float(w.mean())) < 0.02 * std * 10
    assert info["std_measured"] == pytest.approx(float(w.reshape(-1)[:65536].std()), rel=1e-5)
    if method.endswith("uniform"):
        bound = math.sqrt(3) * std
        assert float(w.abs().max()) <= bound
        assert float(w.abs().max()) > 0.99 * bound
    else:  # normal: about 4.6 % of values beyond 2 std
        beyond = float((w.abs() > 2 * std).float().mean())
        assert 0.040 < beyond < 0.052


def test_he_and_xavier_fans_are_distinct():
    # guards against a draw that ignores fan_out/mode
    w_in, _ = draw((256, 256), "he-normal", 1.0, 64, 1024, mode="fan_in", generator=_gen(1))
    w_out, _ = draw((256, 256), "he-normal", 1.0, 64, 1024, mode="fan_out", generator=_gen(1))
    assert float(w_in.std()) == pytest.approx(1 / 8, rel=0.03)
    assert float(w_out.std()) == pytest.approx(1 / 32, rel=0.03)


def _assert_orthonormal(m, gain=1.0):
    rows, cols = m.shape
    eye = torch.eye(min(rows, cols))
    gram = m @ m.T if rows <= cols else m.T @ m
    torch.testing.assert_close(gram, eye * gain**2, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_orthogonal_draws_are_orthogonal(shape):
    w, info = draw(shape, "orthogonal", 1.5, shape[1], shape[0], generator=_gen(3))
    _assert_orthonormal(w, 1.5)
    assert info["std"] == pytest.approx(1.5 / math.sqrt(max(shape)))
    assert info["fan"] is None and info["fan_mode"] is None


def test_orthogonal_conv_weight_is_orthogonal_when_flattened():
    w, _ = draw((8, 4, 3, 3), "orthogonal", 1.0, 36, 72, generator=_gen(4))
    _assert_orthonormal(w.reshape(8, -1))


def test_orthogonal_draws_one_matrix_per_gate_block():
    hidden = 16
    w, info = draw((4 * hidden, hidden), "orthogonal", 1.0, hidden, hidden, blocks=4, generator=_gen(5))
    for i in range(4):
        _assert_orthonormal(w[i * hidden:(i + 1) * hidden])
    # the blocks are distinct draws, and the whole is not orthogonal as one matrix
    assert not torch.allclose(w[:hidden], w[hidden:2 * hidden])
    assert not torch.allclose(w.T @ w, torch.eye(hidden), atol=1e-3)
    assert info["std"] == pytest.approx(1.0 / math.sqrt(hidden))


def test_orthogonal_function():
    before = torch.random.get_rng_state()
    tall = orthogonal(20, 5, _gen(0), None)
    wide = orthogonal(5, 20, _gen(0), None)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert tall.shape == (20, 5) and wide.shape == (5, 20)
    _assert_orthonormal(tall)
    _assert_orthonormal(wide)
    torch.testing.assert_close(wide, tall.T)
    assert torch.equal(orthogonal(7, 7, _gen(9), None), orthogonal(7, 7, _gen(9), None))


def test_orthogonal_sign_fix_gives_no_bias_to_the_diagonal():
    # LAPACK's Householder QR gives R a diagonal of one sign, which biases diag(Q); with the sign
    # fix (R's diagonal made positive) Q is Haar-distributed and diag(Q) averages ~0 over draws
    gen = _gen(11)
    diag = torch.stack([torch.diagonal(orthogonal(4, 4, gen, None)) for _ in range(400)])
    assert diag.mean().abs() < 0.1
