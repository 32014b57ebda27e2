"""ONNX Runtime sessions: device choice, provider options and provenance.

A session silently falls back to CPU when the CUDA provider cannot load, so what ran is read
back from ``session.get_providers()`` rather than assumed from what was asked.

A graph reaches ONNX Runtime as a :class:`PreparedGraph`: its structure serialized without the
large initializers, which go in as arrays (``add_external_initializers``). Serializing a
ResNet's weights and having ONNX Runtime parse them back cost more than building the session.
Weights held out of the proto (:mod:`graphtricks.onnx.weights`: views of the model's tensors,
memory maps of an external data file) go in the same way.

``add_external_initializers`` costs a copy of every weight per session: ONNX Runtime (1.32, CPU)
copies those arrays into tensors of its own, so validating the 403 MB MLP (three sessions) took
4.45x its parameter bytes. Weights that are memory maps of a data file therefore go in with
``add_initializer`` instead, which ONNX Runtime uses in place on CPU (one copy however many
sessions); the graph names the real data file for them (``session.model_external_initializers_
file_folder_path``), because ONNX Runtime checks every external reference even when an
initializer overrides it, and refuses its own in-memory address marker in a model. The named
file must hold the same bytes: ONNX Runtime's optimizers (constant folding) read initializers
from it, not from the override (a sparse placeholder file read as zeros there). Views of a
model's tensors (export's one session) still go through ``add_external_initializers``, and so do
the inputs a train-mode BatchNormalization writes its running statistics into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from graphtricks.errors import ValidationError
from graphtricks.onnx.weights import file_source, in_memory_array

__all__ = [
    "DEVICES",
    "TRAIN_BN_DISABLED_OPTIMIZERS",
    "PreparedGraph",
    "RunFailure",
    "Session",
    "cuda_available",
    "make_session",
    "prepare_graph",
    "resolve_device",
    "session_options",
]

DEVICES = ("auto", "cpu", "cuda")

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# ORT's ConstantSharing optimizer merges equal initializers, e.g. a fresh BatchNorm's weight
# (ones) with its running_var (ones). Train-mode BatchNormalization writes its running stats into
# its input buffers before computing Y, so a merged scale is overwritten and Y is wrong, worse at
# every run (onnxruntime#29790, fix pending in #29878). Sessions of train graphs turn it off.
TRAIN_BN_DISABLED_OPTIMIZERS = ("ConstantSharing",)

# ORT's CUDA provider uses TF32 for fp32 matmul/conv by default, which alone exceeds fp32
# tolerances; PyTorch's side is switched off in eager.torch_numerics.
_CUDA_OPTIONS = {"device_id": "0", "use_tf32": "0"}
# With it, a node the CUDA provider cannot run fails session creation, naming the node, instead
# of running on CPU unnoticed.
DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"

# Initializers at least this large go to ONNX Runtime as arrays; smaller ones (shapes, scalars)
# stay in the serialized graph, where they cost nothing.
_INLINE_BYTES = 1024
# Element types ONNX Runtime takes from numpy without conversion.
_ARRAY_TYPES = frozenset(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                          np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)
)


class RunFailure(Exception):
    """ONNX Runtime could not run a graph on valid inputs: a failed check, not a user error."""


def cuda_available() -> bool:
    """True when both onnxruntime-gpu's CUDA provider and a CUDA device for PyTorch exist."""
    return CUDA_PROVIDER in ort.get_available_providers() and torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """Turns ``"auto"``, ``"cpu"`` or ``"cuda"`` into the device validation runs on.

    Args:
        device: What the user asked for.

    Returns:
        ``"cuda"`` or ``"cpu"``.

    Raises:
        ValidationError: ``device`` is unknown, or ``"cuda"`` was asked and is not available.
    """
    if device not in DEVICES:
        raise ValidationError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise ValidationError(
            "device='cuda' asked, but "
            + (
                "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, "
                "and never together with onnxruntime)"
                if CUDA_PROVIDER not in ort.get_available_providers()
                else "PyTorch sees no CUDA device"
            )
            + "; use device='cpu' or 'auto'"
        )
    return device


@dataclass(frozen=True)
class PreparedGraph:
    """A graph ready for any number of sessions.

    On CPU, ONNX Runtime uses the arrays in place (a CUDA session copies them to the device),
    so sessions of one prepared graph share them.

    Attributes:
        structure: The serialized graph, large initializers marked external.
        names: The names of the initializers kept out of ``structure``.
        arrays: Their values, in the order of ``names``.
        shared: Those of ``names`` that sessions take in place (``add_initializer``): memory
            maps of a data file in ``data_folder``, which ``structure`` names for them.
        data_folder: The folder of that data file, or None.
    """

    structure: bytes
    names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]
    shared: frozenset[str] = frozenset()
    data_folder: str | None = None
    values: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def shared_values(self) -> dict[str, Any]:
        """An OrtValue per initializer of ``shared`` (views of the maps), made once per graph:
        every session of the graph uses them in place, so they live as long as the graph."""
        if not self.values and self.shared:
            self.values.update(
                (n, ort.OrtValue.ortvalue_from_numpy(a))
                for n, a in zip(self.names, self.arrays) if n in self.shared
            )
        return self.values


def _stub(init: onnx.TensorProto, index: int) -> onnx.TensorProto:
    """An initializer with no data, marked external: its value comes from session options."""
    stub = onnx.TensorProto(
        name=init.name, data_type=init.data_type, dims=init.dims,
        data_location=onnx.TensorProto.EXTERNAL,
    )
    # Never opened: ONNX Runtime matches external initializers by name.
    entry = stub.external_data.add()
    entry.key, entry.value = "location", f"graphtricks_in_memory_{index}"
    return stub


def _copy_fields(source, target, skip: str) -> None:
    """Copies every set field of one protobuf message into another, but ``skip``."""
    for descriptor, value in source.ListFields():
        name = descriptor.name
        if name == skip:
            continue
        # protobuf 7 has ``is_repeated`` only, protobuf < 5 ``label`` only
        repeated = getattr(descriptor, "is_repeated", None)
        if repeated is None:
            repeated = descriptor.label == descriptor.LABEL_REPEATED
        if repeated:
            getattr(target, name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, name).CopyFrom(value)
        else:
            setattr(target, name, value)


def _as_array(init: onnx.TensorProto) -> np.ndarray | None:
    """The value of a large in-file initializer that numpy can carry, or a stub's array, else None."""
    held = in_memory_array(init)
    if held is not None:  # a view of the model's tensor or a memory map of the data file
        return held
    if init.data_location == onnx.TensorProto.EXTERNAL or not init.data_type:
        return None
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype not in _ARRAY_TYPES or int(np.prod(init.dims)) * dtype.itemsize < _INLINE_BYTES:
        return None
    if dtype == np.int64:  # shapes and axes: ONNX Runtime reads them when it loads the graph
        return None
    # Often a read-only view of the protobuf's bytes, not copied: ONNX Runtime only reads
    # initializers (train-mode BatchNorm updates its running stats in buffers of its own).
    return np.asarray(numpy_helper.to_array(init), order="C")  # keeps 0-d arrays 0-d


def prepare_graph(model: onnx.ModelProto) -> PreparedGraph:
    """Serializes ``model`` once, keeping its large initializers out as arrays.

    Args:
        model: The graph; it is not changed.

    Returns:
        What :func:`make_session` builds sessions from, as many as needed.
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    written = _written_by_ort(model.graph)
    weights = _weight_operands(model.graph)
    names, arrays, shared, folder = [], [], set(), None
    for init in model.graph.initializer:
        array = _as_array(init)
        if array is None:
            light.graph.initializer.append(init)
            continue
        shareable = init.name not in written and init.name in weights
        source = file_source(init) if shareable else None
        if source is not None and folder in (None, str(source[0].parent)):
            folder = str(source[0].parent)
            light.graph.initializer.append(_file_reference(init, source))
            shared.add(init.name)
        else:
            light.graph.initializer.append(_stub(init, len(names)))
        names.append(init.name)
        arrays.append(array)
    return PreparedGraph(
        light.SerializeToString(), tuple(names), tuple(arrays), frozenset(shared), folder
    )


# Operands ONNX Runtime reads as weights and never edits in place. Its transpose optimizer reshapes
# other constants in place when it moves a Transpose past an elementwise op (ConvNeXt's (C, 1, 1)
# layer scale became (1, 1, 1, C) in the graph): a tensor handed in with ``add_initializer`` keeps
# its shape, and the session then fails or broadcasts wrongly. Only these are shared in place.
_WEIGHT_OPERANDS = {("MatMul", 0), ("MatMul", 1), ("Gemm", 0), ("Gemm", 1), ("Conv", 1), ("ConvTranspose", 1), ("Gather", 0)}


def _weight_operands(graph: onnx.GraphProto) -> set[str]:
    """Names every use of which is a weight operand (``_WEIGHT_OPERANDS``) of a node of ``graph``."""
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, i))
        for attr in node.attribute:  # read by a subgraph: not shared
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                for inner in sub.node:
                    for name in inner.input:
                        uses.setdefault(name, set()).add(("subgraph", -1))
    for out in graph.output:
        uses.setdefault(out.name, set()).add(("output", -1))
    return {name for name, used in uses.items() if used <= _WEIGHT_OPERANDS}


def _written_by_ort(graph: onnx.GraphProto) -> set[str]:
    """Inputs of train-mode BatchNormalization nodes: ONNX Runtime writes running stats into them."""
    written: set[str] = set()
    for node in graph.node:
        if node.op_type == "BatchNormalization" and any(
            a.name == "training_mode" and a.i for a in node.attribute
        ):
            written.update(node.input[1:5])
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                written |= _written_by_ort(sub)
    return written


def _file_reference(init: onnx.TensorProto, source: tuple[Path, int, int]) -> onnx.TensorProto:
    """An initializer whose data is where ``source`` says (a data file, offset, length)."""
    path, offset, length = source
    ref = onnx.TensorProto(
        name=init.name, data_type=init.data_type, dims=init.dims,
        data_location=onnx.TensorProto.EXTERNAL,
    )
    for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(length))):
        entry = ref.external_data.add()
        entry.key, entry.value = key, value
    return ref


@dataclass
class Session:
    """An ONNX Runtime session with what it is and where it really runs.

    Attributes:
        role: Which graph it runs (``"infer"``, ``"train_deterministic"``, ``"train_dropout"``).
        device: ``"cuda"`` or ``"cpu"``: where it runs, hence where PyTorch must run to compare.
        providers: ``session.get_providers()``.
        inner: The ``onnxruntime.InferenceSession``.
        asked: The device that was asked for: differs from ``device`` after a fallback.
        disabled_optimizers: The ORT graph optimizers turned off for this session.
        graph: What the session was built from: ONNX Runtime reads its arrays in place.
    """

    role: str
    device: str
    providers: list[str]
    inner: Any
    asked: str = "cpu"
    disabled_optimizers: tuple[str, ...] = ()
    graph: PreparedGraph | None = field(default=None, repr=False)

    @property
    def provider(self) -> str:
        """The provider ONNX Runtime tries first for every node."""
        return self.providers[0]

    @property
    def output_names(self) -> list[str]:
        """The graph outputs, in order."""
        return [o.name for o in self.inner.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Runs the graph.

        Raises:
            RunFailure: ONNX Runtime raised while running.
        """
        try:
            return self.inner.run(None, feed)
        except Exception as e:  # ORT raises its own pybind exception types
            raise RunFailure(f"ONNX Runtime failed to run the {self.role} graph: {e}") from e


def session_options(device: str, strict: bool = True) -> tuple[Any, list[Any]]:
    """The session options and providers validation runs a graph with on ``device``.

    Graph optimizations stay at ONNX Runtime's default (all on): graphs are run as users run
    them. On CUDA (``strict``), CPU fallback is disabled (``session.disable_cpu_ep_fallback``)
    and TF32 is off.

    Returns:
        An ``onnxruntime.SessionOptions`` and the providers list for ``InferenceSession``.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the library never prints; ORT warns on unused initializers
    # ORT's pool threads spin for a while after each run, taking the cores from the PyTorch
    # reference runs between ORT runs (twice the time on a busy 2-core machine). Spinning
    # changes no result.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")
    if device != "cuda":
        return options, [CPU_PROVIDER]
    if strict:
        options.add_session_config_entry(DISABLE_CPU_FALLBACK, "1")
    return options, [(CUDA_PROVIDER, dict(_CUDA_OPTIONS)), CPU_PROVIDER]


def make_session(
    model: onnx.ModelProto | PreparedGraph,
    device: str,
    role: str,
    strict: bool = True,
    disabled_optimizers: tuple[str, ...] = (),
) -> Session:
    """Creates a session for ``model`` on ``device`` and checks where it landed.

    Args:
        model: The graph to run; prepare it first (:func:`prepare_graph`) to build several
            sessions of it.
        device: ``"cuda"`` or ``"cpu"`` (already resolved).
        role: Names the graph in messages and in the report.
        strict: Raise when CUDA was asked and the session fell back to CPU; otherwise the
            session's ``device`` says ``"cpu"`` and the caller reports the fallback.
        disabled_optimizers: ONNX Runtime graph optimizers to turn off (see
            ``TRAIN_BN_DISABLED_OPTIMIZERS``).

    Returns:
        The session.

    Raises:
        ValidationError: ONNX Runtime cannot load the graph (e.g. an opset it does not
            support), or (``strict``) CUDA was asked and the session fell back to CPU.
    """
    graph = model if isinstance(model, PreparedGraph) else prepare_graph(model)
    options, providers = session_options(device, strict)
    if graph.names:
        for name, value in graph.shared_values().items():  # used in place: no copy per session
            options.add_initializer(name, value)
        # Copied by ONNX Runtime, which wants them contiguous (a transposed weight's view is
        # not): these arrays and OrtValues go once the session is made.
        rest = [
            (n, a if a.flags.c_contiguous else a.copy(order="C"))  # (keeps 0-d arrays 0-d)
            for n, a in zip(graph.names, graph.arrays)
            if n not in graph.shared
        ]
        if rest:
            options.add_external_initializers(
                [n for n, _ in rest], [ort.OrtValue.ortvalue_from_numpy(a) for _, a in rest]
            )
    if graph.data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", graph.data_folder
        )
    try:
        inner = ort.InferenceSession(
            graph.structure, options, providers=providers,
            disabled_optimizers=list(disabled_optimizers) or None,
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(f"ONNX Runtime cannot load the {role} graph: {first}") from e
    used = list(inner.get_providers())
    on_cuda = bool(used) and used[0] == CUDA_PROVIDER
    if device == "cuda" and not on_cuda and strict:
        raise ValidationError(
            f"the {role} graph was asked to run on CUDA but ONNX Runtime fell back to {used}; "
            "check the CUDA/cuDNN versions onnxruntime-gpu needs, or use device='cpu'"
        )
    return Session(
        role=role, device="cuda" if on_cuda else "cpu", providers=used, inner=inner,
        asked=device, disabled_optimizers=tuple(disabled_optimizers), graph=graph,
    )
