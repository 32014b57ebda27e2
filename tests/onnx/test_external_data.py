"""ONNX external data: weights written once to model.data, shared by both graphs, read in place."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from graphtricks.errors import ValidationError
from graphtricks.onnx import export_pair, validate_pair
from graphtricks.onnx.eager import digest_model
from graphtricks.onnx.weights import DATA_FILE, WeightTable


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.flatten(1)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    return model, (torch.randn(4, 3, 8, 8),)


def _external(path) -> dict[str, dict[str, str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        i.name: {e.key: e.value for e in i.external_data}
        for i in graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
    }


def test_graph_over_the_threshold_round_trips_through_one_shared_data_file(tmp_path, net):
    model, inputs = net
    before = digest_model(model)
    result = export_pair(model, inputs, tmp_path, external_data_threshold=10_000)
    assert result.data_path == tmp_path / DATA_FILE and result.data_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [DATA_FILE, "model.infer.onnx", "model.train.onnx"]
    )
    train, infer = _external(result.train_path), _external(result.infer_path)
    assert "fc.weight" in train and train["fc.weight"] == infer["fc.weight"]  # stored once
    assert {e["location"] for e in train.values()} == {DATA_FILE}
    state = dict(model.state_dict())
    for path in (result.train_path, result.infer_path):
        loaded = onnx.load(str(path))  # onnx reads the data file itself
        values = {i.name: numpy_helper.to_array(i) for i in loaded.graph.initializer}
        for name in ("fc.weight", "conv.weight", "bn.running_mean"):
            np.testing.assert_array_equal(values[name], state[name].numpy())
    assert before.differences(digest_model(model)) == []
    report = validate_pair(model, inputs, tmp_path, device="cpu", seeds=(0, 1))
    assert report.passed, [c.message for c in report.checks if not c.passed]


def test_external_data_on_request_and_back_to_self_contained(tmp_path, net):
    model, inputs = net
    assert export_pair(model, inputs, tmp_path, external_data=True).data_path is not None
    result = export_pair(model, inputs, tmp_path)  # small: self-contained again
    assert result.data_path is None and not (tmp_path / DATA_FILE).exists()
    assert _external(result.train_path) == {}
    assert validate_pair(model, inputs, tmp_path, device="cpu", seeds=(0,)).passed


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_data_file_is_a_one_line_validation_error(tmp_path, net, damage):
    model, inputs = net
    export_pair(model, inputs, tmp_path, external_data=True)
    data = tmp_path / DATA_FILE
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        data.unlink()
    with pytest.raises(ValidationError) as info:
        validate_pair(model, inputs, tmp_path, device="cpu", seeds=(0,))
    message = str(info.value)
    assert "\n" not in message and DATA_FILE in message
    assert ("truncated" if damage == "truncated" else "not found") in message


def test_sessions_take_mapped_weights_in_place(tmp_path, net):
    """Weights mapped from model.data go to ONNX Runtime in place (add_initializer), one copy
    for every session."""
    from graphtricks.onnx.runtime import make_session, prepare_graph
    from graphtricks.onnx.validate import load_onnx_file
    from graphtricks.onnx.weights import WeightTable

    model, inputs = net
    export_pair(model, inputs, tmp_path, external_data=True)
    with WeightTable() as table:
        train = load_onnx_file(tmp_path / "model.train.onnx", "train", table)
        prepared = prepare_graph(train)
        assert "fc.weight" in prepared.shared and prepared.data_folder == str(tmp_path.resolve())
        feed = {train.graph.input[0].name: inputs[0].numpy()}
        first = make_session(prepared, "cpu", "train").run(feed)
        again = make_session(prepared, "cpu", "train").run(feed)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert validate_pair(model, inputs, tmp_path, device="cpu").passed


def test_train_batchnorm_inputs_are_never_shared_in_place():
    """ONNX Runtime writes a train-mode BatchNormalization's running stats into its inputs."""
    from onnx import helper

    from graphtricks.onnx.runtime import _written_by_ort

    train_bn = helper.make_node(
        "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1
    )
    eval_bn = helper.make_node("BatchNormalization", ["y", "s2", "b2", "m2", "v2"], ["z"])
    inner = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "s3", "b3", "m3", "v3"], ["w", "a", "c"],
                          training_mode=1)], "inner", [], [])
    branch = helper.make_node("If", ["cond"], ["o"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph([train_bn, eval_bn, branch], "g", [], [])
    assert _written_by_ort(graph) == {"s", "b", "m", "v", "s3", "b3", "m3", "v3"}


class _Tokens(nn.Module):
    """``nn.Linear`` on 3-D input: the exporter writes ``MatMul(x, Transpose(W))``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)  # square: W and W.T share data, bytes and shape
        self.head = nn.Linear(16, 40)
        self.drop = nn.Dropout(0.1)

    def forward(self, ids):
        return self.head(self.drop(torch.relu(self.proj(self.embed(ids)))))


@pytest.mark.parametrize("external", [True, False])
def test_weight_transposes_are_folded_into_the_stored_weight(tmp_path, external):
    """No session has to make a transposed copy of a weight: the file holds W.T."""
    torch.manual_seed(0)
    model, inputs = _Tokens(), (torch.randint(0, 50, (2, 7)),)
    # TorchScript's MatMul(x, Transpose(W)); torch.export's Linear reads W as it is (Gemm)
    result = export_pair(model, inputs, tmp_path, external_data=external, exporter="torchscript")
    for path in (result.train_path, result.infer_path):
        graph = onnx.load(str(path)).graph
        assert not [n for n in graph.node if n.op_type == "Transpose"]
        values = {i.name: numpy_helper.to_array(i, base_dir=str(tmp_path)) for i in graph.initializer}
        for name in ("proj.weight", "head.weight"):
            assert name not in values
            np.testing.assert_array_equal(values[f"{name}.T"], model.state_dict()[name].numpy().T)
    assert validate_pair(model, inputs, tmp_path, device="cpu").passed


def test_self_contained_weights_are_mapped_from_the_file(tmp_path, net):
    """Validation maps a self-contained file's large weights in place (aligned by the writer);
    a file written by onnx.save (unaligned) loads the same values, copied once."""
    from graphtricks.onnx.graph import load_onnx_file
    from graphtricks.onnx.weights import file_source, in_memory_array

    model, inputs = net
    result = export_pair(model, inputs, tmp_path)
    plain = onnx.load(str(result.train_path))
    onnx.save(plain, str(tmp_path / "resaved.onnx"))
    want = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    for path, aligned in ((result.train_path, True), (tmp_path / "resaved.onnx", False)):
        with WeightTable() as table:
            loaded = load_onnx_file(path, "train", table)
            mapped = {i.name: i for i in loaded.graph.initializer if file_source(i) is not None}
            assert "fc.weight" in mapped and "conv.bias" not in mapped  # small ones stay inline
            for name, init in mapped.items():
                where, offset, length = file_source(init)
                assert where == path.resolve() and length == want[name].nbytes
                assert (offset % 64 == 0) or not aligned
                np.testing.assert_array_equal(in_memory_array(init), want[name])
            assert {i.name for i in loaded.graph.initializer} == set(want)
            assert len(loaded.graph.node) == len(plain.graph.node)
    assert validate_pair(model, inputs, tmp_path, device="cpu").passed


@pytest.mark.parametrize("external", [True, False])
def test_export_checks_the_train_graph_on_weights_mapped_from_the_written_files(
    tmp_path, monkeypatch, external
):
    """Export's check against PyTorch runs on the train graph as written: its large weights are
    maps of the staged file that ONNX Runtime uses in place (no copy of the model's tensors)."""
    from graphtricks.onnx import export as export_module

    seen = []
    real = export_module.make_session

    def spy(model, *args, **kwargs):
        session = real(model, *args, **kwargs)
        seen.append(session.graph)
        return session

    monkeypatch.setattr(export_module, "make_session", spy)
    torch.manual_seed(0)
    model, inputs = _Tokens(), (torch.randint(0, 50, (2, 7)),)
    result = export_pair(model, inputs, tmp_path / "out", external_data=external, exporter="torchscript")
    (graph,) = seen
    assert {"embed.weight", "proj.weight.T", "head.weight.T"} <= graph.shared
    staged = Path(graph.data_folder)
    assert staged.parent == tmp_path / "out" and staged.name.startswith(".export.")
    assert not staged.exists()  # the private folder is gone, its files renamed into place
    assert (result.data_path is not None) == external


def test_export_refuses_files_whose_written_weights_differ_from_the_model(tmp_path, net, monkeypatch):
    """The check reads the weights back from the written files: a writer that wrote the wrong
    bytes is caught, and nothing is left in place."""
    from graphtricks.onnx import export as export_module
    from graphtricks.onnx import weights

    def zeroed_writer(paths, graphs, data_path):
        for model in graphs.values():
            for init in model.graph.initializer:
                array = weights.in_memory_array(init)
                if array is not None and init.name == "fc.weight":
                    init.CopyFrom(numpy_helper.from_array(np.zeros_like(array), init.name))
        weights.write_graphs(paths, graphs, data_path)

    monkeypatch.setattr(export_module, "write_graphs", zeroed_writer)
    model, inputs = net
    with pytest.raises(Exception, match="disagrees with PyTorch train mode") as caught:
        export_pair(model, inputs, tmp_path / "out", external_data=True)
    assert "nothing was written" in str(caught.value)
    assert not (tmp_path / "out").exists()


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's maps of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ")[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_released_weights_leave_memory_and_read_back_the_same(tmp_path):
    from graphtricks.onnx.weights import release_pages

    path = tmp_path / "weights.bin"
    values = np.arange(2**20, dtype=np.float32)  # 4 MiB
    values.tofile(path)
    with WeightTable() as table:
        mapped = table.mapped(path)[4096:].view(np.float32)  # a weight at a page boundary
        assert float(mapped.sum()) == float(values[1024:].sum())
        assert _resident_kib(path.resolve()) >= 4000
        release_pages(mapped)
        assert _resident_kib(path.resolve()) <= 8
        assert np.array_equal(mapped, values[1024:])
    release_pages(values)  # not a map: nothing happens


@pytest.mark.parametrize("copy_works", [True, False])
def test_second_self_contained_file_copies_the_weights_the_first_wrote(tmp_path, net, monkeypatch, copy_works):
    """Each weight is read from the model (a transposed one made contiguous) once for the pair;
    where the kernel cannot copy between the files, it is written again, with the same bytes."""
    from graphtricks.onnx import weights

    made: list[tuple] = []
    bytes_of = weights._bytes_of

    def counted(array):
        made.append(weights._array_key(array))
        return bytes_of(array)

    def refused(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(weights, "_bytes_of", counted)
    if not copy_works:
        monkeypatch.setattr(os, "copy_file_range", refused)
    model, inputs = net
    result = export_pair(model, inputs, tmp_path)
    assert made and len(made) == len(set(made)) * (1 if copy_works else 2)
    train, infer = (onnx.load(str(p)) for p in (result.train_path, result.infer_path))
    want = {i.name: numpy_helper.to_array(i) for i in infer.graph.initializer}
    assert want["fc.weight"].size == 8 * 8 * 8 * 10
    for init in train.graph.initializer:
        if init.name in want:
            np.testing.assert_array_equal(numpy_helper.to_array(init), want[init.name])
    assert validate_pair(model, inputs, tmp_path, device="cpu").passed


def test_self_contained_writer_aligns_every_weight_whatever_came_before(tmp_path):
    """Every large weight lands at a multiple of 64 in the file, whatever the bytes before it
    (each residue needs its own padding), so validation maps it instead of copying it."""
    from onnx import helper

    from graphtricks.onnx.weights import (
        file_source,
        in_memory_array,
        load_mapped,
        write_graphs,
    )

    with WeightTable() as table:  # names of every length: the bytes before each weight vary
        arrays = {"w" * (k + 1): np.full(256 + k, k, np.float32) for k in range(70)}
        graph = helper.make_graph(
            [helper.make_node("Identity", [name], [f"out{name}"]) for name in arrays], "g", [],
            [helper.make_tensor_value_info(f"out{name}", onnx.TensorProto.FLOAT, None) for name in arrays],
            [table.stub(name, a) for name, a in arrays.items()],
        )
        write_graphs({"m": str(tmp_path / "m.onnx")}, {"m": helper.make_model(graph)}, None)
    with WeightTable() as table:
        loaded = load_mapped(tmp_path / "m.onnx", table)
        mapped = table.mapped(tmp_path / "m.onnx")
        for init in loaded.graph.initializer:
            assert file_source(init)[1] % 64 == 0, init.name
            assert np.shares_memory(in_memory_array(init), mapped), init.name
            np.testing.assert_array_equal(in_memory_array(init), arrays[init.name])
