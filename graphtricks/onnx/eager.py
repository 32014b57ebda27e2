"""The PyTorch side of validation: reference runs on copies, dropout interception, snapshots.

The model handed to export or validation must not change, so every reference run happens on a
copy that shares its parameters (only its modules and buffers are its own); a snapshot of modes, parameters and buffers taken before and after proves it. Export
and reference runs flatten the model's outputs the same way (:func:`flatten_outputs`), so the
graph's outputs and PyTorch's line up.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from graphtricks.errors import ValidationError
from graphtricks.onnx.draws import DRAW_FUNCTIONS, Draw, call_argument, draw

__all__ = [
    "FLOAT64_COPY_MAX_BYTES",
    "DropoutInterceptor",
    "ModelDigest",
    "digest_model",
    "flatten_outputs",
    "float64_copy",
    "named_outputs",
    "non_tensor_outputs",
    "reference_copy",
    "run_reference",
    "torch_numerics",
]


@dataclass(frozen=True)
class _Site:
    """Where a function takes its drop probability and training flag, and how to neutralise it."""

    p_name: str
    p_index: int
    p_default: float
    training_name: str | None = None  # None: the function always applies its dropout when p > 0
    training_index: int = -1
    training_default: bool = True
    elementwise: bool = True  # True: identity when neutralised; False: call again with p=0


def _dropout_like(training_default: bool = True) -> _Site:
    return _Site("p", 1, 0.5, "training", 2, training_default)


# Every entry point through which PyTorch code applies dropout, as seen by a TorchFunctionMode.
# A mode does not see calls made inside a function it already intercepted, so composite
# functions that drop out internally (attention) are listed themselves.
_SITES: dict[Any, _Site] = {
    F.dropout: _dropout_like(),
    F.dropout1d: _dropout_like(),
    F.dropout2d: _dropout_like(),
    F.dropout3d: _dropout_like(),
    F.alpha_dropout: _dropout_like(training_default=False),
    F.feature_alpha_dropout: _dropout_like(training_default=False),
    torch.dropout: _Site("p", 1, 0.5, "train", 2),
    torch.alpha_dropout: _Site("p", 1, 0.5, "train", 2),
    torch.feature_dropout: _Site("p", 1, 0.5, "train", 2),
    torch.feature_alpha_dropout: _Site("p", 1, 0.5, "train", 2),
    F.scaled_dot_product_attention: _Site("dropout_p", 4, 0.0, elementwise=False),
    F.multi_head_attention_forward: _Site(
        "dropout_p", 10, 0.0, "training", 13, True, elementwise=False
    ),
}


class DropoutInterceptor(TorchFunctionMode):
    """Records every dropout and random draw a forward makes and, optionally, neutralises them.

    Neutralised, a dropout becomes the identity and a random draw takes a fixed value (see
    :mod:`graphtricks.onnx.draws`: stochastic depth then keeps every sample and still scales
    it by ``1 / keep_prob``). Forced, a dropout whose training flag is off drops all the same
    (MC dropout: a model in eval mode, BatchNorm on running statistics, every dropout on); a
    site that passes p = 0 in eval mode (``p if self.training else 0.``) stays off.

    Attributes:
        calls: The drop probability of each dropout actually applied (p > 0, training on),
            in call order.
        draws: Each random draw (stochastic depth masks and the like), in call order.
    """

    def __init__(self, neutralise: bool, force: bool = False) -> None:
        super().__init__()
        if neutralise and force:
            raise ValueError("a dropout cannot be both neutralised and forced")
        self.neutralise = neutralise
        self.force = force
        self.calls: list[float] = []
        self.draws: list[Draw] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in DRAW_FUNCTIONS:
            record, result = draw(func, args, kwargs, self.neutralise)
            self.draws.append(record)
            return result
        site = _SITES.get(func)
        if site is None:
            return func(*args, **kwargs)
        p = float(call_argument(args, kwargs, site.p_name, site.p_index, site.p_default))
        training = True
        if site.training_name is not None:
            training = bool(
                call_argument(
                    args, kwargs, site.training_name, site.training_index, site.training_default
                )
            )
        if not (p > 0 and (training or self.force)):
            return func(*args, **kwargs)
        self.calls.append(p)
        if not self.neutralise:
            if not training:  # forced: the same call with its training flag on
                args, kwargs = _with_argument(args, kwargs, site.training_name, site.training_index, True)
            return func(*args, **kwargs)
        if site.elementwise:
            return args[0] if args else kwargs["input"]
        args, kwargs = _with_argument(args, kwargs, site.p_name, site.p_index, 0.0)
        return func(*args, **kwargs)


def _with_argument(args: Sequence, kwargs: dict, name: str, index: int, value: Any) -> tuple[list, dict]:
    """A call's arguments with one argument (by keyword, else by position) set to ``value``."""
    args, kwargs = list(args), dict(kwargs)
    if name not in kwargs and index < len(args):
        args[index] = value
    else:
        kwargs[name] = value
    return args, kwargs


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, depth first (dict values in key order)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flatten_outputs(item)]
    if isinstance(value, Mapping):  # Hugging Face ModelOutput is an OrderedDict
        return [t for item in value.values() for t in flatten_outputs(item)]
    return []  # None, a Cache object, ...: not a graph output


def named_outputs(value: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of :func:`flatten_outputs` with default graph output names.

    A mapping's tensors take their keys (``last_hidden_state``, ``pooler_output``), and a
    namedtuple's its field names (torchvision ``GoogLeNetOutputs``: ``logits``,
    ``aux_logits2``), suffixed ``_0, _1, ...`` when a key holds several; otherwise one tensor
    is ``output`` and several are ``output_0, output_1, ...``.
    """
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        value = dict(zip(value._fields, value))
    if isinstance(value, Mapping):
        named = []
        for key, item in value.items():
            tensors = flatten_outputs(item)
            names = [str(key)] if len(tensors) == 1 else [f"{key}_{i}" for i in range(len(tensors))]
            named += zip(names, tensors)
        return named
    tensors = flatten_outputs(value)
    names = ["output"] if len(tensors) == 1 else [f"output_{i}" for i in range(len(tensors))]
    return list(zip(names, tensors))


def non_tensor_outputs(value: Any) -> list[str]:
    """``"key: Type"`` for each entry of a mapping output that holds no tensor and is not None.

    Such values (a Hugging Face ``past_key_values`` ``DynamicCache``) are no graph output.
    """
    if not isinstance(value, Mapping):
        return []
    return [
        f"{key}: {type(item).__name__}"
        for key, item in value.items()
        if item is not None and not flatten_outputs(item)
    ]


def _moves(model: nn.Module, device: str) -> bool:
    """Whether some parameter of ``model`` lives elsewhere than ``device``."""
    return any(p.device.type != torch.device(device).type for p in model.parameters())


def reference_copy(
    model: nn.Module, *, train: bool, device: str, share: bool = True
) -> nn.Module:
    """A copy of ``model`` on ``device``, in train or eval mode, for reference runs.

    The copy shares the model's parameters when they are on ``device`` already (a forward
    without autograd only reads them; the side-effect check proves it did): its modules,
    buffers (BatchNorm statistics a train-mode run updates) and attributes are its own. A copy
    that must move to another device is a full deep copy, and so is one asked not to
    ``share``: converting a copy in place (``.to(dtype)``) would convert shared parameters.

    Raises:
        ValidationError: The model cannot be deep-copied.
    """
    memo: dict[int, Any] = {}
    if share and not _moves(model, device):
        memo = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    try:
        twin = copy.deepcopy(model, memo)
    except Exception as e:
        raise ValidationError(
            f"cannot deep-copy the model for reference runs ({type(e).__name__}: {e}); "
            "make its attributes copyable"
        ) from e
    if not memo:
        twin = twin.to(device)
    twin.train(train)  # not its result: a module overriding train() may return None (timm's attention)
    return twin


# Above this many parameter bytes, the float64 reference converts one module's own tensors at a
# time, while it runs, instead of holding a float64 copy of the whole model (twice its size).
FLOAT64_COPY_MAX_BYTES = 256 * 2**20


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _upcast_while_running(module: nn.Module, _args: Any) -> None:
    """Forward pre-hook: the module's own floating tensors become float64 copies."""
    saved = {}
    for store in (module._parameters, module._buffers):
        for name, t in store.items():
            if t is not None and t.is_floating_point() and t.dtype != torch.float64:
                saved[(id(store), name)] = t
                wide = t.detach().to(torch.float64)
                store[name] = nn.Parameter(wide, t.requires_grad) if isinstance(t, nn.Parameter) else wide
    module.__dict__["_graphtricks_narrow"] = saved


def _restore_after_running(module: nn.Module, _args: Any, _out: Any) -> None:
    """Forward hook: puts back the tensors :func:`_upcast_while_running` replaced."""
    saved = module.__dict__.pop("_graphtricks_narrow", {})
    for store in (module._parameters, module._buffers):
        for name in list(store):
            if (id(store), name) in saved:
                store[name] = saved[(id(store), name)]


def float64_copy(model: nn.Module, *, train: bool, device: str) -> nn.Module:
    """A float64 twin of ``model`` on ``device``: the "truth" fp32 results are judged by.

    Up to :data:`FLOAT64_COPY_MAX_BYTES` of parameters, a float64 deep copy. Above, a copy
    sharing the parameters whose every module converts its own tensors to float64 just
    before it runs and drops them after: a float64 run in one module's extra memory. A
    parameter used outside its module's forward then meets float64 data in float32 and the
    run fails, which leaves the outputs to fixed tolerances (``checks.numeric``).

    Raises:
        ValidationError: The model cannot be deep-copied.
    """
    if _parameter_bytes(model) <= FLOAT64_COPY_MAX_BYTES or _moves(model, device):
        full = reference_copy(model, train=train, device=device, share=False)
        return full.to(torch.float64)
    twin = reference_copy(model, train=train, device=device)
    for module in twin.modules():
        if module._parameters or module._buffers:
            module.register_forward_pre_hook(_upcast_while_running)
            module.register_forward_hook(_restore_after_running)
    return twin


def run_reference(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    device: str,
    neutralise: bool,
    dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], DropoutInterceptor]:
    """Runs ``model`` (a reference copy) on ``inputs``.

    Args:
        model: A copy from :func:`reference_copy`; it may change (BN running stats).
        inputs: The inputs, on any device.
        device: Where the copy lives.
        neutralise: Whether dropout becomes the identity and random draws fixed during the run.
        dtype: Converts floating-point inputs to it (a float64 copy takes float64 inputs).

    Returns:
        The flattened outputs on CPU, and the interceptor: the drop probabilities of the
        dropouts applied (``.calls``) and the random draws made (``.draws``).

    Raises:
        ValidationError: The model rejects the inputs.
    """
    interceptor = DropoutInterceptor(neutralise)
    try:
        with torch.no_grad(), interceptor:
            moved = [t.to(device) for t in inputs]
            if dtype is not None:
                moved = [t.to(dtype) if t.is_floating_point() else t for t in moved]
            out = model(*moved)
    except Exception as e:
        raise ValidationError(
            f"the model rejects the validation inputs ({type(e).__name__}: {e}); "
            "pass example inputs of the shapes and dtypes it expects"
        ) from e
    return [t.detach().cpu() for t in flatten_outputs(out)], interceptor


@dataclass(frozen=True)
class ModelDigest:
    """Per-module training flags and a digest of every parameter and buffer."""

    modes: dict[str, bool]
    tensors: dict[str, tuple[str, tuple[int, ...], str, str]]

    def differences(self, other: ModelDigest) -> list[str]:
        """What changed from ``self`` to ``other``, one short phrase per change."""
        changes = [
            f"module '{name or '<root>'}' training {flag} -> {other.modes.get(name)}"
            for name, flag in self.modes.items()
            if other.modes.get(name) != flag
        ]
        for name in sorted(set(self.tensors) | set(other.tensors)):
            if self.tensors.get(name) != other.tensors.get(name):
                changes.append(f"tensor '{name}' changed")
        return changes


def _digest(tensor: torch.Tensor) -> str:
    if tensor.device.type == "meta":
        return "meta"
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    # Hashed in place (no bytes copy); SHA-256 runs on the SHA extensions of current x86 and
    # ARM CPUs, twice as fast as BLAKE2 there.
    return hashlib.sha256(raw.numpy()).hexdigest()


def digest_model(model: nn.Module) -> ModelDigest:
    """Takes a :class:`ModelDigest` of ``model`` (hashes, not copies, to spare memory)."""
    modes = {name: module.training for name, module in model.named_modules()}
    tensors = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        tensors[name] = (str(t.dtype), tuple(t.shape), str(t.device), _digest(t))
    return ModelDigest(modes, tensors)


@contextlib.contextmanager
def torch_numerics(device: str) -> Iterator[None]:
    """Full-precision fp32 on CUDA (TF32 off) and an untouched global RNG, restored on exit."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            if device == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
