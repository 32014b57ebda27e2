"""``gt.export`` and ``gt.validate``: the command line's ``export`` and ``validate`` for Python users.

Thin wrappers over :func:`graphtricks.onnx.export_pair` and :func:`graphtricks.onnx.validate_pair`
that take what a Python user holds — a saved folder, a :class:`~graphtricks.rewriting.RewriteResult`
or a plain module — and return the same report objects the command line prints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphtricks.errors import GraphtricksError

if TYPE_CHECKING:
    from graphtricks.onnx import ExportResult, ValidationReport

__all__ = ["export", "validate"]


def _positional(model: Any, args: tuple, kwargs: dict[str, Any] | None) -> tuple[tuple, list[str] | None]:
    """The inputs as the exporter and validation take them (keyword inputs in their parameter
    places), and the graph input names when there are keywords (None: the exporter's default)."""
    if not kwargs:
        return args, None
    from graphtricks.io.inputs import positional_inputs

    args, names = positional_inputs(model.forward, args, kwargs)
    return args, names


def export(
    model: Any,
    out_dir: str | Path | None = None,
    example_inputs: Any = None,
    *,
    opset: int = 18,
    dynamic_batch: bool = False,
    source: dict[str, Any] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_dims: dict[str, list[int]] | None = None,
    exporter: str = "dynamo",
    mc_dropout: bool = False,
) -> ExportResult:
    """Export ``model.train.onnx`` and ``model.infer.onnx``, as ``graphtricks export`` does.

    Args:
        model: a folder written by :func:`graphtricks.save` (the files go into it unless
            ``out_dir`` is given), a :class:`~graphtricks.rewriting.RewriteResult` (saved to
            ``out_dir`` with ``source`` first, so :func:`validate` can rebuild it), or an
            ``nn.Module`` with ``example_inputs`` (only the ONNX files are written).
        out_dir: where the files go; required unless ``model`` is a saved folder.
        example_inputs: the module's positional inputs (a plain module only).
        example_kwargs: its keyword inputs by name; by default a saved folder's or a
            RewriteResult's own. The graphs take them in the forward's parameter order, as
            inputs named after them (``input_ids``, ``attention_mask``).
        opset: the ONNX opset (``graphtricks.onnx.MIN_OPSET`` to ``MAX_OPSET``).
        dynamic_batch: make dimension 0 symbolic.
        dynamic_dims: more symbolic dimensions by input name (``{"input_ids": [1]}``).
        exporter: ``"dynamo"`` (torch.export, the default) or ``"torchscript"``.
        mc_dropout: also write ``model.mc.onnx`` (eval mode with every dropout on).
        source: for a RewriteResult, how to rebuild the original model (``{"spec": ...}``), as
            for :func:`graphtricks.save`.
        force: replace a non-empty ``out_dir`` when a RewriteResult is saved there.
        progress: called with a line as each stage starts (``print`` shows them).

    Returns:
        The :class:`~graphtricks.onnx.ExportResult` (paths, names, warnings, notes).

    Raises:
        GraphtricksError: a missing argument; InputShapeError for a keyword input without a
            position (keyword-only in the forward, or after a parameter left out); ExportError
            when the exporter fails.

    Example:
        >>> gt.export("out/cnn")                       # a folder written by gt.save
        >>> gt.validate("out/cnn").passed
        True
    """
    from graphtricks.io.folder import is_saved_model, load_saved, save
    from graphtricks.onnx import export_pair
    from graphtricks.rewriting import RewriteResult

    options = {"dynamic_dims": dynamic_dims, "exporter": exporter, "mc_dropout": mc_dropout}
    if isinstance(model, (str, Path)):
        if not Path(model).exists():
            raise GraphtricksError(f"{model} does not exist (give a folder written by graphtricks.save)")
        if not is_saved_model(model):
            raise GraphtricksError(f"{model} is not a folder written by graphtricks.save (no recipe.toml)")
        saved = load_saved(model)
        kwargs = saved.example_kwargs if example_kwargs is None else example_kwargs
        args, names = _positional(saved.model, saved.example_inputs, kwargs)
        return export_pair(saved.model, args, Path(out_dir or model), opset=opset, dynamic_batch=dynamic_batch,
                           input_names=names, progress=progress, **options)
    if out_dir is None:
        raise GraphtricksError("export needs out_dir for a model or a RewriteResult (only a saved folder exports into itself)")
    if isinstance(model, RewriteResult):
        if source is None:
            raise GraphtricksError("exporting a RewriteResult saves it first: pass source={'spec': ...} as for graphtricks.save")
        save(model, out_dir, source, force=force)
        kwargs = model.example_kwargs if example_kwargs is None else example_kwargs
        args, names = _positional(model.model, model.example_inputs, kwargs)
        return export_pair(model.model, args, Path(out_dir), opset=opset, dynamic_batch=dynamic_batch,
                           input_names=names, progress=progress, **options)
    if example_inputs is None and not example_kwargs:
        raise GraphtricksError("exporting a module needs example_inputs (a tensor or a tuple of its positional inputs)"
                               " or example_kwargs (its keyword inputs by name)")
    inputs = () if example_inputs is None else example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    args, names = _positional(model, inputs, example_kwargs)
    return export_pair(model, args, Path(out_dir), opset=opset, dynamic_batch=dynamic_batch, input_names=names,
                       progress=progress, **options)


def validate(
    folder: str | Path,
    model: Any = None,
    example_inputs: Any = None,
    *,
    device: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    inputs: list[tuple] | None = None,
    progress: Callable[[str], None] | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> ValidationReport:
    """Check both ONNX graphs in ``folder`` against PyTorch and each other, as ``graphtricks validate``.

    Args:
        folder: the folder :func:`export` wrote into.
        model: the module the graphs came from, with ``example_inputs``; by default the model is
            rebuilt from ``folder`` (a folder written by :func:`graphtricks.save`).
        example_inputs: the module's positional inputs (with ``model``).
        example_kwargs: its keyword inputs by name, as given to :func:`export`; by default the
            folder's own (a model rebuilt from ``folder``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        atol: absolute tolerance (default by dtype and device).
        rtol: relative tolerance (default by dtype and device).
        inputs: extra input sets to compare on (a list of tuples of tensors).
        progress: called with a line as each check family starts (``"validating: 3/6 checks …"``).

    Returns:
        The :class:`~graphtricks.onnx.ValidationReport`; ``.passed``, ``.summary()``,
        ``.failures``, ``.to_dict()``.

    Raises:
        GraphtricksError: ``folder`` does not exist or holds no model to rebuild;
            ValidationError for missing or truncated ONNX files.
    """
    from graphtricks.io.folder import load_saved
    from graphtricks.onnx import digest_model, validate_pair

    path = Path(folder)
    if not path.exists():
        raise GraphtricksError(f"{path} does not exist (give the folder graphtricks.export wrote)")
    if model is None:
        saved = load_saved(path)
        model, example_inputs = saved.model, saved.example_inputs
        example_kwargs = saved.example_kwargs if example_kwargs is None else example_kwargs
    elif example_inputs is None and not example_kwargs:
        raise GraphtricksError("validate with a model needs its example_inputs (or example_kwargs)")
    example = () if example_inputs is None else example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    example, _ = _positional(model, example, example_kwargs)
    return validate_pair(
        model, example, path, device=device, atol=atol, rtol=rtol, extra_inputs=inputs, baseline=digest_model(model),
        progress=progress,
    )
