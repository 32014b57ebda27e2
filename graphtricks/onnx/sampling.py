"""Monte Carlo dropout sampling: T stochastic forwards in one call, and the spread they show.

MC dropout (Gal & Ghahramani, 2016) keeps dropout on at inference and reads the spread of T
predictions as the model's uncertainty. :func:`mc_sample` draws the T samples by *tiling* the
batch: the N examples are repeated T times into one batch of T×N rows, run once, and the
output is cut back into ``(T, N, ...)``. Row ``t·N + i`` is sample ``t`` of example ``i``;
each row draws its own dropout masks, so the rows are T independent samples — as long as no
row's output depends on another row, which holds for an MC graph (BatchNorm on running
statistics) and not for a train graph (batch statistics), which is refused.

Two back ends, one result:

- a PyTorch module (a model rewritten with ``gt.InsertDropout``, or any model with dropout):
  run in eval mode — BatchNorm on running statistics, stochastic depth off — with every dropout
  forced on (:class:`~graphtricks.onnx.eager.DropoutInterceptor`, the interceptor validation
  uses), the model's modes restored afterwards;
- an ONNX Runtime session (or the path) of an MC graph, ``model.mc.onnx``: its random ops draw
  fresh masks at every run. A graph with a fixed batch dimension runs in calls of that size.

Example:
    >>> mc = gt.mc_sample(result.model, x, samples=30)
    >>> mc.probs.argmax(1), mc.entropy, mc.mutual_information
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphtricks.errors import GraphtricksError
from graphtricks.onnx.eager import DropoutInterceptor, flatten_outputs

__all__ = ["MCSamples", "mc_sample", "predictive_entropy", "summarise"]


@dataclass(frozen=True)
class MCSamples:
    """What T stochastic forwards say about each example.

    Arrays are torch tensors for a PyTorch model and numpy arrays for an ONNX Runtime session.

    Attributes:
        mean: the mean of the chosen output over the T samples, ``(N, ...)``.
        std: its standard deviation over the samples (population: divides by T), ``(N, ...)``.
        probs: the mean of the samples' softmax over ``class_dim`` (the MC predictive
            distribution), ``(N, ...)``.
        entropy: the predictive entropy of ``probs`` in nats, ``(N, ...)`` without the class axis:
            total uncertainty.
        mutual_information: ``entropy`` minus the mean entropy of each sample's softmax (BALD): the
            part of the uncertainty that comes from the model (the samples disagree), ≥ 0.
        samples: the raw samples ``(T, N, ...)``, when asked for (``keep_samples``), else None.
        runs: how many times the model or session ran (1 when the whole tiled batch fit).
    """

    mean: Any
    std: Any
    probs: Any
    entropy: Any
    mutual_information: Any
    samples: Any = None
    runs: int = 1


def predictive_entropy(probs: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """``-Σ p·log p`` over ``class_dim`` in nats (a zero probability contributes 0).

    Example:
        >>> predictive_entropy(torch.tensor([[0.5, 0.5]]))  # log 2
        tensor([0.6931])
    """
    return -torch.special.xlogy(probs, probs).sum(class_dim)


def summarise(samples: torch.Tensor, class_dim: int = -1, keep_samples: bool = False, runs: int = 1) -> MCSamples:
    """The :class:`MCSamples` of ``samples`` shaped ``(T, N, ...)`` (logits on ``class_dim`` of one sample).

    Statistics are computed in float64 and returned in the samples' dtype (float32 rounding of
    a near-zero entropy difference would make the mutual information negative).
    """
    wide = samples.double()
    dim = class_dim if class_dim < 0 else class_dim + 1  # the class axis of one sample, in (T, N, ...)
    each = torch.softmax(wide, dim)
    probs = each.mean(0)
    entropy = predictive_entropy(probs, dim - 1 if dim > 0 else dim)
    expected = predictive_entropy(each, dim).mean(0)
    info = (entropy - expected).clamp_min(0.0)
    dtype = samples.dtype if samples.is_floating_point() else torch.float32
    cast = lambda t: t.to(dtype)  # noqa: E731 - one conversion for five results
    return MCSamples(cast(wide.mean(0)), cast(wide.std(0, correction=0)), cast(probs), cast(entropy), cast(info),
                     samples if keep_samples else None, runs)


def _tile(inputs: Sequence[torch.Tensor], samples: int) -> tuple[list[torch.Tensor], int]:
    """Each input repeated ``samples`` times along dimension 0, and N (the batch they share)."""
    if not inputs:
        raise GraphtricksError("mc_sample needs at least one input tensor")
    sizes = {tuple(t.shape[:1]) for t in inputs}
    if any(t.ndim == 0 for t in inputs) or len(sizes) != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise GraphtricksError(f"mc_sample tiles every input along dimension 0, so all need the same batch size; "
                               f"got shapes {shapes}")
    n = inputs[0].shape[0]
    return [t.repeat(samples, *([1] * (t.ndim - 1))) for t in inputs], n


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``size`` rows covering ``total``."""
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def _pick(outputs: list, output: int | str, names: Sequence[str]) -> int:
    """The index of the chosen output (by position or by graph output name)."""
    if isinstance(output, str):
        if output not in names:
            raise GraphtricksError(f"mc_sample: no output named {output!r}; the outputs are {', '.join(names)}")
        return list(names).index(output)
    if not -len(outputs) <= output < len(outputs):
        raise GraphtricksError(f"mc_sample: output {output} asked for, but the model gives {len(outputs)} output(s)")
    return output


def _first_line(e: Exception) -> str:
    """``Type: first line of the message``, for one-line errors."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _check_args(samples: int, max_rows: int | None) -> None:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise GraphtricksError(f"mc_sample needs samples ≥ 2 (a spread needs two draws), got {samples!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise GraphtricksError(f"max_rows must be an integer ≥ 1, got {max_rows!r}")


# -- PyTorch ------------------------------------------------------------------------------------
def _sample_torch(model: nn.Module, inputs: tuple, samples: int, output: int | str, max_rows: int | None,
                  seed: int | None) -> tuple[torch.Tensor, int]:
    """``(T, N, ...)`` samples of a module: eval mode, every dropout forced on."""
    tensors = list(inputs)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise GraphtricksError("mc_sample on a PyTorch model takes a tensor or a tuple of tensors (its positional inputs)")
    if isinstance(output, str):
        raise GraphtricksError(f"mc_sample: a PyTorch model's output is chosen by position, not by name ({output!r})")
    tiled, n = _tile(tensors, samples)
    total = samples * n
    spans = _chunks(total, max_rows or total)
    modes = {m: m.training for m in model.modules()}
    interceptor = DropoutInterceptor(neutralise=False, force=True)
    pieces = []
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext(), torch.no_grad(), interceptor:
            if seed is not None:
                torch.manual_seed(seed)
            for start, stop in spans:
                try:
                    outs = flatten_outputs(model(*[t[start:stop] for t in tiled]))
                except Exception as e:  # noqa: BLE001 - the model's own error, as one line naming it
                    raise GraphtricksError(f"mc_sample: {type(model).__name__} rejects the inputs ({_first_line(e)})") from e
                pieces.append(outs[_pick(outs, output, [])].detach())
    finally:
        for m, flag in modes.items():
            m.training = flag
    if not interceptor.calls:
        raise GraphtricksError(f"mc_sample: {type(model).__name__} applies no dropout in its forward, so the "
                               "samples would all be equal; rewrite it with gt.InsertDropout first")
    out = torch.cat(pieces)
    return out.reshape(samples, n, *out.shape[1:]), len(spans)


# -- ONNX Runtime -------------------------------------------------------------------------------
def _session(graph: Any):
    """An ONNX Runtime session from a session or a path (default options: random ops draw every run)."""
    import onnxruntime as ort

    if isinstance(graph, ort.InferenceSession):
        return graph
    path = Path(graph)
    if not path.is_file():
        raise GraphtricksError(f"mc_sample: {path} is not a file (give model.mc.onnx or an onnxruntime session)")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - an unreadable graph is one line for the user
        raise GraphtricksError(f"mc_sample: ONNX Runtime cannot load {path} ({type(e).__name__}: {e})") from e


def _feeds(session, inputs: Any) -> dict[str, np.ndarray]:
    """The session's inputs by name, from a mapping or from arrays in the session's input order."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise GraphtricksError(f"mc_sample: inputs lack {', '.join(missing)}; the graph takes {', '.join(names)}")
        given = [inputs[n] for n in names]
    else:
        given = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        if len(given) != len(names):
            raise GraphtricksError(f"mc_sample: {len(given)} input(s) given, the graph takes {len(names)} "
                                   f"({', '.join(names)})")
    return {n: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for n, v in zip(names, given)}


def _fixed_batch(session) -> int | None:
    """The batch size every input is fixed to, or None when dimension 0 is symbolic somewhere."""
    sizes = {i.shape[0] if i.shape else None for i in session.get_inputs()}
    return sizes.pop() if len(sizes) == 1 and isinstance(next(iter(sizes)), int) else None


def _sample_onnx(graph: Any, inputs: Any, samples: int, output: int | str,
                 max_rows: int | None) -> tuple[torch.Tensor, int]:
    """``(T, N, ...)`` samples of an MC graph: the tiled batch in as few runs as its batch dimension allows."""
    from graphtricks.onnx.portable import UPDATED_PREFIX

    session = _session(graph)
    out_names = [o.name for o in session.get_outputs()]
    if any(n.startswith(UPDATED_PREFIX) for n in out_names):
        raise GraphtricksError("mc_sample: this is a train graph (BatchNorm on batch statistics, updated.* outputs), "
                               "where one sample's output depends on the others; sample model.mc.onnx "
                               "(graphtricks export --mc-dropout)")
    feeds = _feeds(session, inputs)
    tiled, n = _tile([torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()], samples)
    total = samples * n
    fixed = _fixed_batch(session)
    size = fixed or max_rows or total
    index = _pick(out_names, output, out_names)
    pieces = []
    spans = _chunks(total, size)
    for start, stop in spans:
        rows = [t[start:stop] for t in tiled]
        if stop - start < size and fixed:  # a fixed-batch graph's last call: pad, then drop the padding
            rows = [torch.cat([r, t[:size - (stop - start)]]) for r, t in zip(rows, tiled)]
        try:
            result = session.run([out_names[index]], {k: r.numpy() for k, r in zip(feeds, rows)})[0]
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's error on these inputs, as one line
            raise GraphtricksError(f"mc_sample: ONNX Runtime rejects the inputs ({_first_line(e)}); pass what the "
                                   "graph takes (names, dtypes, fixed dimensions)") from e
        pieces.append(torch.from_numpy(np.asarray(result))[:stop - start])
    out = torch.cat(pieces)
    out = out.reshape(samples, n, *out.shape[1:])
    if out.is_floating_point() and torch.equal(out[0].expand_as(out), out):
        raise GraphtricksError("mc_sample: every sample of the graph is the same, so it draws no dropout mask; "
                               "sample an MC graph (model.mc.onnx from graphtricks export --mc-dropout), "
                               "not the inference graph")
    return out, len(spans)


def mc_sample(
    model: nn.Module | Any,
    inputs: Any,
    samples: int = 30,
    *,
    output: int | str = 0,
    class_dim: int = -1,
    max_rows: int | None = None,
    seed: int | None = None,
    keep_samples: bool = False,
) -> MCSamples:
    """Draw ``samples`` MC-dropout predictions of each example in one tiled call, and summarise them.

    Args:
        model: a PyTorch module with dropout (run in eval mode with every dropout forced on; its
            modes are restored), or an ``onnxruntime.InferenceSession`` / the path of an MC graph
            (``model.mc.onnx``).
        inputs: the batch of N examples: a tensor or a tuple of tensors (positional inputs); for
            a session also arrays in its input order, or a mapping input name → array.
        samples: T, the number of stochastic forwards (≥ 2).
        output: which output to summarise: its position among the flattened outputs, or (ONNX)
            its graph output name.
        class_dim: the class axis of one output (logits) for ``probs``, ``entropy`` and
            ``mutual_information``.
        max_rows: at most this many rows per run (bounds memory; default: all T×N rows at once).
            A graph with a fixed batch dimension runs in calls of that size whatever this says.
        seed: PyTorch only: draw the masks from this seed (the global RNG is left untouched);
            a session draws from its own generator.
        keep_samples: also return the raw ``(T, N, ...)`` samples.

    Returns:
        An :class:`MCSamples`: torch tensors for a module, numpy arrays for a session.

    Raises:
        GraphtricksError: fewer than 2 samples; inputs of different batch sizes; a module that
            applies no dropout or a graph whose samples are all equal (an inference graph); a
            train graph (batch statistics); an unknown output.

    Example:
        >>> mc = mc_sample(rewritten, x, samples=30)           # PyTorch
        >>> mc = mc_sample("out/model.mc.onnx", {"x": x_np})   # ONNX Runtime
        >>> mc.entropy.shape
        (8,)
    """
    _check_args(samples, max_rows)
    if isinstance(model, nn.Module):
        given = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        stacked, runs = _sample_torch(model, given, samples, output, max_rows, seed)
        return summarise(stacked, class_dim, keep_samples, runs)
    stacked, runs = _sample_onnx(model, inputs, samples, output, max_rows)
    result = summarise(stacked, class_dim, keep_samples, runs)
    as_numpy = {k: (getattr(result, k).numpy() if getattr(result, k) is not None else None)
                for k in ("mean", "std", "probs", "entropy", "mutual_information", "samples")}
    return MCSamples(**as_numpy, runs=runs)
