"""Inputs named as Hugging Face names them get the values deployment sends (issue 24.4): one table
(``graphtricks.io.inputs.VALUED_INPUTS``) serves the command line's examples and validation's sets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from graphtricks.cli.common import load_source
from graphtricks.io.inputs import (
    MASK_INPUTS,
    VALUED_INPUTS,
    make_keyword_inputs,
    make_valued_input,
    padded_masks,
)
from graphtricks.onnx.inputs import random_like
from tests.keyword_models import SPEC_DIR


def _lengths(mask: torch.Tensor) -> list[int]:
    """Each row's valid length, checking the row is ones then zeros (padded at the end)."""
    out = []
    for row in mask.reshape(-1, mask.shape[-1]).long():
        n = int(row.sum())
        assert row[:n].eq(1).all() and row[n:].eq(0).all(), f"not padded at the end: {row.tolist()}"
        out.append(n)
    return out


@pytest.mark.parametrize("name", ["attention_mask", "decoder_attention_mask"])
@pytest.mark.parametrize(("rows", "length"), [(2, 16), (4, 10), (8, 8)])
def test_sequence_masks_are_padded_rows_of_different_lengths(name, rows, length):
    mask = make_valued_input(name, (rows, length), torch.int64)
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 1}
    lengths = _lengths(mask)
    assert lengths[0] == length, "the first row is not padded"
    assert all(0 < n < length for n in lengths[1:]), "every other row is padded, none empty"
    assert len(set(lengths)) == rows, f"rows of different lengths: {lengths}"
    assert padded_masks([name], [mask]) == [name]


def test_a_single_row_is_padded_and_dtypes_are_kept():
    (length,) = _lengths(make_valued_input("attention_mask", (1, 6), torch.int64))
    assert 0 < length < 6
    as_bool = make_valued_input("attention_mask", (3, 5), torch.bool)
    as_float = make_valued_input("attention_mask", (3, 5), torch.float32)
    assert as_bool.dtype == torch.bool and as_float.dtype == torch.float32
    assert torch.equal(as_bool.long(), as_float.long())


def test_pixel_mask_pads_below_and_right_of_each_image():
    mask = make_valued_input("pixel_mask", (2, 6, 8), torch.int64)
    assert mask[0].eq(1).all()
    rows, cols = mask[1].any(1), mask[1].any(0)
    h, w = int(rows.sum()), int(cols.sum())
    assert 0 < h < 6 and 0 < w < 8
    assert mask[1, :h, :w].eq(1).all() and int(mask[1].sum()) == h * w


def test_token_types_are_a_prefix_of_zeros_then_ones_and_positions_count():
    types = make_valued_input("token_type_ids", (4, 9), torch.int64, seed=3)
    for row in types:
        first_one = int(row.argmax())
        assert 0 < first_one and row[:first_one].eq(0).all() and row[first_one:].eq(1).all()
    one_type = make_valued_input("token_type_ids", (4, 9), torch.int64, high=1)  # RoBERTa
    assert one_type.eq(0).all()
    positions = make_valued_input("position_ids", (3, 7), torch.int64)
    assert torch.equal(positions, torch.arange(7).expand(3, 7))
    assert make_valued_input("input_ids", (3, 7), torch.int64) is None


def test_every_rule_keeps_shape_and_dtype():
    for name in VALUED_INPUTS:
        for dtype in (torch.int64, torch.int32, torch.float32):
            t = make_valued_input(name, (3, 4, 5), dtype)
            assert t.shape == (3, 4, 5) and t.dtype == dtype, name
    assert MASK_INPUTS <= set(VALUED_INPUTS)


def test_keyword_examples_use_the_table_and_other_names_stay_random():
    kw = make_keyword_inputs({"input_ids": "2,16", "attention_mask": "2,16:int64", "token_type_ids": "2,16"},
                             "int64", high=50, highs={"token_type_ids": 1})
    assert kw["input_ids"].max() > 1  # token ids: random below the vocabulary
    assert _lengths(kw["attention_mask"])[0] == 16 and _lengths(kw["attention_mask"])[1] < 16
    assert kw["token_type_ids"].eq(0).all()  # one segment type


def test_command_line_example_attention_mask_is_a_mask():
    # what `--input attention_mask=2,16:int64` makes (random integers 13..996 before)
    *_, keywords = load_source(f"{SPEC_DIR}:KwOnly", None, None, None, None, False,
                               named_inputs=["x=2,8", "attention_mask=2,16:int64"])
    mask = keywords["attention_mask"]
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) == {0, 1}
    assert _lengths(mask)[0] == 16 and _lengths(mask)[1] < 16


def test_validation_sets_follow_the_names_and_the_examples_bounds():
    ids = torch.randint(0, 30, (2, 10))
    examples = (ids, torch.ones(2, 10, dtype=torch.int64), torch.zeros(2, 10, dtype=torch.int64))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    drawn = random_like(examples, seed=1, names=names)
    assert _lengths(drawn[1])[1] < 10 and drawn[2].eq(0).all()  # the example has one segment type
    assert drawn[0].max() < 30
    wider = random_like(examples, seed=1, batch_size=5, names=names)
    assert wider[1].shape == (5, 10) and len(set(_lengths(wider[1]))) == 5
    unnamed = random_like(examples, seed=1)  # no names: as before, integers below the example's max + 1
    assert set(unnamed[1].unique().tolist()) <= {0, 1} and unnamed[0].max() < 30


class TextNet(torch.nn.Module):
    """Takes token ids, a mask and segment ids by position; its config bounds them."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=50, type_vocab_size=1)
        self.embed = torch.nn.Embedding(50, 4)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.embed(input_ids + token_type_ids) * attention_mask[..., None]


def test_positional_examples_are_named_after_the_forwards_parameters():
    _, (ids, mask, types), *_ = load_source(f"{__file__}:TextNet", "2,16;2,16;2,16", None, None, None, False)
    assert ids.dtype == mask.dtype == torch.int64 and ids.max() > 1
    assert _lengths(mask)[0] == 16 and _lengths(mask)[1] < 16
    assert types.eq(0).all()  # type_vocab_size 1
