"""Save a rewritten model as a folder, and rebuild it with :func:`load`.

A folder holds ``model.safetensors`` (every weight), ``recipe.toml`` (the source model and
the passes, so the structure can be rebuilt without unpickling anything), ``report.json``,
``example_inputs.safetensors`` (the inputs the rewrite ran on), ``structure.json`` (what the
passes edited and the type of every leaf module, to check a rebuild against), ``model_code.py``
(readable generated code, when the whole model traced) and, for a model from a file, a copy
of that file under ``source/``. Writing is atomic: a failure leaves no folder.

Rebuilding replays the recipe on the source model holding the saved weights that belong to
it, on the saved inputs, so that a branch that depends on the weights or the data goes the
way it went when the model was rewritten; the rebuilt structure is then checked against
``structure.json``, and a difference is an error, never a silently different model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphtricks.errors import GraphtricksError, SavedModelError, SpecError
import graphtricks.io.user_state as user_state
from graphtricks.io.inputs import make_example_inputs, make_keyword_inputs, named_input_text
from graphtricks.io.recipe import Recipe, read_recipe, write_recipe
from graphtricks.io.files import from_folder, public_modes, relative_to_folder
from graphtricks.io.precheck import RECIPE, WEIGHTS, check_output_dir, check_saved_folder, is_saved_model
from graphtricks.io.specs import file_sha256, load_matching_weights, load_model
from graphtricks.report import Report
from graphtricks.rewriting import RewriteResult, model_structure, rewrite

__all__ = ["save", "load", "load_saved", "SavedModel", "is_saved_model", "check_output_dir"]

REPORT = "report.json"
CODE = "model_code.py"
INPUTS = "example_inputs.safetensors"
KWARG = "kwarg."  # key prefix of keyword inputs in INPUTS (positional ones are input0, input1, …)
STRUCTURE = "structure.json"
# Change actions that set values without changing the structure: a replay onto the saved
# weights need not repeat them (init finds its own draws there and leaves them).
VALUE_ACTIONS = {"initialized"}
# A model with more parameter bytes than this is rebuilt on the meta device to prove its source
# (no memory for the weights, no time to initialise them).
PROOF_ON_META_BYTES = 1 << 30


def _source_with_copy(source: dict[str, Any], staging: Path, out: Path) -> dict[str, Any]:
    """Record the hash of a model file and keep a copy of it beside the weights; the spec names
    the file relative to the folder ``out`` where possible (the recipe then moves with both)."""
    source = dict(source)
    target = source.get("spec", "").rpartition(":")[0]
    if target.endswith(".py") and Path(target).is_file():
        path = Path(target).resolve()
        source["spec"] = f"{relative_to_folder(path, out)}:{source['spec'].rpartition(':')[2]}"
        source["sha256"] = file_sha256(path)
        (staging / "source").mkdir()
        shutil.copy2(path, staging / "source" / path.name)
    return source


def save(
    result: RewriteResult,
    out_dir: str | Path,
    source: dict[str, Any],
    *,
    force: bool = False,
    prior_passes: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a rewritten model to ``out_dir`` atomically.

    Args:
        result: what :func:`~graphtricks.rewriting` returned.
        out_dir: the folder to create (must be absent or empty, unless ``force``).
        source: how to rebuild the original model: ``spec`` plus optional ``model_args``,
            ``input_shapes``, ``input_dtype``, ``trust_pickle``. The keyword inputs of ``result``
            are recorded in it as ``input_kwargs`` (``{name = "SHAPE:DTYPE"}``) and
            ``input_kwarg_values`` (keywords given a plain constant).
        force: replace a non-empty ``out_dir``.
        prior_passes: passes already applied to the source (when a saved model was rewritten
            again), recorded before ``result``'s own so the recipe replays the whole chain.

    Returns:
        The folder written.

    Before anything is written, ``source`` is proven: the model it builds (on the meta device
    when the model is large) must have the structure and parameter shapes of the model the
    rewrite was given, so that :func:`load` can rebuild the folder.

    Raises:
        OutputError: ``out_dir`` is a file, or non-empty without ``force``.
        SpecError: ``source`` has no spec, cannot be built (a missing file), or builds another
            model (the first difference is named: ``tv:resnet18`` for a model built with
            ``num_classes=10``).
    """
    from safetensors.torch import save_model

    out = check_output_dir(out_dir, force)
    if not prior_passes:  # a chain's source was proven by the load of the folder it started from
        _prove_source(result, source, out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(result.model, str(staging / WEIGHTS))
        _save_inputs(result.example_inputs, staging / INPUTS, result.example_kwargs)
        source = _with_keyword_inputs(source, result.example_kwargs)
        structure = _structure(result, chained=bool(prior_passes))
        (staging / STRUCTURE).write_text(json.dumps(structure, indent=1))
        recipe = Recipe(passes=list(prior_passes or []) + result.recipe(), source=_source_with_copy(source, staging, out))
        write_recipe(recipe, staging / RECIPE)
        (staging / REPORT).write_text(json.dumps(result.report.to_dict(), indent=2, default=str))
        readable = result.model if isinstance(result.model, fx.GraphModule) else result.tree.root.module
        if isinstance(readable, fx.GraphModule) and all(r.kind == "traced" for r in result.tree.regions()):
            code = readable.print_readable(print_output=False)  # the region's flat graph where the root runs its own forward
            (staging / CODE).write_text("# Generated by graphtricks for reading; rebuild with graphtricks.load(DIR).\n" + code)
        public_modes(staging)  # mkdtemp made it 0700; the files get what a plain open() gives
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _prove_source(result: RewriteResult, source: dict[str, Any], out: Path) -> None:
    """Refuse, in one line, a source that does not build the model ``result`` was given."""
    spec = source.get("spec") if isinstance(source, dict) else None
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"cannot save {out}: give source={{'spec': ...}}, how to build the model again"
                          " (e.g. {'spec': 'models/plain_cnn.py:PlainCNN'} or {'spec': 'tv:resnet18', 'model_args': ...})")
    if result.given is None:
        return  # a RewriteResult not made by rewrite(): nothing recorded to compare with
    large = sum(t.numel() * t.element_size() for t in result.model.state_dict().values()) > PROOF_ON_META_BYTES
    args = source.get("model_args")
    try:
        with torch.device("meta" if large else "cpu"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = load_model(spec, args, trust_pickle=bool(source.get("trust_pickle")))
    except GraphtricksError as e:
        raise SpecError(f"cannot save {out}: its source does not build: {e}") from e
    except Exception as e:  # the model's own constructor failed
        raise SpecError(f"cannot save {out}: building {spec} failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    problem = _first_difference(model_structure(rebuilt), result.given)
    if problem:
        given = f"{spec} with model_args {args}" if args else spec
        raise SpecError(f"cannot save {out}: the source {given} builds another model than the one rewritten: {problem}"
                          " (give the spec and model_args the model was built with); nothing written")


def _first_difference(rebuilt: dict[str, dict], given: dict[str, dict]) -> str | None:
    """The first way the rebuilt structure differs from the given one, in words, or None."""
    for what, noun in (("leaves", "module"), ("shapes", "state-dict entry")):
        mine, theirs = rebuilt[what], given[what]
        for name in (n for n in mine if n not in theirs):
            return f"{noun} {name or '<root>'} is in the rebuilt model only"
        for name in (n for n in theirs if n not in mine):
            return f"{noun} {name or '<root>'} is missing from the rebuilt model"
        for name, value in theirs.items():
            if mine[name] != value and None not in (mine[name], value):
                kind = "is a" if what == "leaves" else "has shape"
                return f"{name or '<root>'} {kind} {mine[name]} in the rebuilt model, {value} in the one rewritten"
    return None


@dataclass
class SavedModel:
    """A model rebuilt from a folder, with its recipe and stored report."""

    model: nn.Module
    recipe: Recipe
    report: Report
    example_inputs: tuple
    result: RewriteResult
    example_kwargs: dict[str, Any] = field(default_factory=dict)


def load_saved(path: str | Path, *, trust_pickle: bool = False) -> SavedModel:
    """Rebuild a saved model: build the source, replay the recipe, load the weights.

    The replay runs on the saved example inputs, with the saved weights that belong to the
    source model loaded into it first (by name, or by where the replay moves them), and what it
    builds is checked against ``structure.json``.

    Raises:
        SavedModelError: not a graphtricks folder, missing/truncated files, weights that do not
            fit the rebuilt structure, or a replay that built another structure than the saved
            one (e.g. the model's source changed).
    """
    folder = check_saved_folder(path)
    # what the release that wrote the folder meant, written out (a chain's prior passes keep it)
    recipe = read_recipe(folder / RECIPE, unversioned=_written_format(folder)).upgraded()
    source = recipe.source
    if "spec" not in source:
        raise SavedModelError(f"{folder / RECIPE} has no [source] spec; cannot rebuild the model")
    target, _, name = source["spec"].rpartition(":")
    if target.endswith(".py"):  # relative to the folder; folders written before: absolute
        source["spec"] = f"{from_folder(target, folder)}:{name}"
    inputs, kwargs = _saved_inputs(folder, source)
    spec = _resolve_source_spec(folder, source)
    source["spec"] = spec  # the copy kept in the folder where the file is gone: a chain saves that one
    structure = _read_structure(folder)
    trust = trust_pickle or bool(source.get("trust_pickle"))
    result, moved = _replay(load_model(spec, source.get("model_args"), trust_pickle=trust), recipe, (inputs, kwargs),
                            folder, {})
    problem = _difference(structure, result)
    if moved and (problem or _went_another_way(structure, result)):
        # The weights of modules the passes moved were missed: again, knowing where they go.
        result, _ = _replay(load_model(spec, source.get("model_args"), trust_pickle=trust), recipe, (inputs, kwargs),
                            folder, moved)
        problem = _difference(structure, result)
    if problem:
        raise SavedModelError(f"rebuilding {folder} did not give the saved model: {problem} (a branch that depends on"
                              " values the folder does not hold, e.g. weights a pass reset, or the model's source changed)")
    try:
        user_state.load_weights(result.model, folder / WEIGHTS, (structure or {}).get("user", {}).get("metadata"))
    except Exception as e:
        first = " ".join(str(e).split())[:300]
        raise SavedModelError(f"cannot load {folder / WEIGHTS} (truncated, or the model's source changed?): {first}") from e
    problem = user_state.restore(result.model, (structure or {}).get("user"))  # frozen flags, modes
    if problem:
        raise SavedModelError(f"rebuilding {folder} did not give the saved model: {problem}")
    report_path = folder / REPORT
    try:
        report = Report.from_dict(json.loads(report_path.read_text())) if report_path.is_file() else result.report
    except (ValueError, TypeError) as e:
        raise SavedModelError(f"{report_path} is not valid JSON: {e}") from e
    return SavedModel(result.model, recipe, report, inputs, result, kwargs)


def _written_format(folder: Path) -> int:
    """The recipe format of a folder whose recipe names none (the first two releases wrote none).

    The second release (format 1) recorded the user's state (``user``) in ``structure.json`` and
    the sites passes skip by design (``skipped``) in ``report.json``; the first wrote neither.
    """
    for name, key in ((STRUCTURE, "user"), (REPORT, "skipped")):
        try:
            if key in json.loads((folder / name).read_text()):
                return 1
        except (OSError, ValueError, TypeError):
            continue  # missing or unreadable: the other file, or the first release
    return 0


# -- what a replay needs, and what it is checked against --------------------------------------
def _save_inputs(inputs: tuple, path: Path, kwargs: dict[str, Any] | None = None) -> None:
    """Keep the example inputs (a rebuild replays on them): positional ones as ``input{i}``,
    keyword tensors as ``kwarg.{name}``; inputs without values are not kept."""
    from safetensors.torch import save_file

    tensors = {f"input{i}": x for i, x in enumerate(inputs)}
    tensors.update({f"{KWARG}{k}": v for k, v in (kwargs or {}).items() if isinstance(v, torch.Tensor)})
    if tensors and all(isinstance(x, torch.Tensor) and x.device.type != "meta" for x in tensors.values()):
        save_file({k: x.detach().cpu().contiguous() for k, x in tensors.items()}, str(path))


def _with_keyword_inputs(source: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``source`` with the keyword inputs' shapes and dtypes, and their plain constants."""
    source = {k: v for k, v in source.items() if k not in ("input_kwargs", "input_kwarg_values")}
    if not kwargs:
        return source
    source["input_kwargs"] = {k: named_input_text(v.shape, v.dtype) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
    if values:
        source["input_kwarg_values"] = values
    return source


def _saved_inputs(folder: Path, source: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword inputs the rewrite ran on, else (older folders, inputs without
    values) seeded ones of the recorded shapes."""
    from safetensors.torch import load_file

    named = dict(source.get("input_kwargs") or {})
    values = dict(source.get("input_kwarg_values") or {})
    path = folder / INPUTS
    if path.is_file():
        try:
            data = load_file(str(path))
            inputs = tuple(data[f"input{i}"] for i in range(sum(1 for k in data if not k.startswith(KWARG))))
        except Exception as e:
            raise SavedModelError(f"cannot read {path} (truncated?): {' '.join(str(e).split())[:200]}") from e
        kwargs = {k[len(KWARG):]: v for k, v in data.items() if k.startswith(KWARG)}
        order = list(named) + [k for k in kwargs if k not in named]  # as the rewrite was given them
        kwargs = {k: kwargs[k] for k in order if k in kwargs}
        return inputs, {**kwargs, **values}
    if "input_shapes" not in source and not named:
        raise SavedModelError(f"{folder / RECIPE} has no [source] input_shapes and {INPUTS} is missing; cannot rebuild the model")
    shapes = [tuple(s) for s in source.get("input_shapes", [])]
    dtype, high = source.get("input_dtype", "float32"), source.get("token_high", 100)
    inputs = make_example_inputs(shapes, dtype, high=high) if shapes else ()
    return inputs, {**make_keyword_inputs(named, dtype, high=high), **values}


def _replay(model: nn.Module, recipe: Recipe, inputs: tuple[tuple, dict[str, Any]], folder: Path, moved: dict[str, str]):
    """Load the saved weights that belong to ``model`` into it, replay the recipe on it.

    Args:
        inputs: the positional and the keyword example inputs.
        moved: saved key -> the source model's key, for weights the passes moved.

    Returns:
        ``(result, moved)``: the rewrite, and where this replay moved the source's tensors.
    """
    try:
        load_matching_weights(model, folder / WEIGHTS, moved)
    except SpecError as e:
        raise SavedModelError(f"{e} (truncated?)") from e
    # Tensors held (not only their ids) so that an id is not reused while the passes run.
    origin = {id(t): (key, t) for key, t in model.state_dict(keep_vars=True).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rewrite(model, recipe.build_passes(), inputs[0], example_kwargs=inputs[1], inplace=True)
    found = {key: origin[id(t)][0] for key, t in result.model.state_dict(keep_vars=True).items() if id(t) in origin}
    return result, {new: old for new, old in found.items() if new != old}


def _edits(result: RewriteResult) -> list[list] | None:
    """``[pass number, pass, action, where]`` of each structural edit; None when not attributable."""
    runs = result.runs
    if len(runs) != len(result.passes) or sum(len(r.changes) for r in runs) != len(result.report.changes):
        return None
    return [[i, c.pass_name, c.action, c.where] for i, run in enumerate(runs, 1) for c in run.changes
            if c.action not in VALUE_ACTIONS]


def _leaves(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if next(m.children(), None) is None}


def _structure(result: RewriteResult, chained: bool) -> dict[str, Any]:
    """What a rebuild must reproduce: the leaf modules' types and the passes' structural edits;
    and which regions were traced (another set hints at values the replay missed).

    The edits of a chain of rewrites are not recorded: one replay of the whole recipe names
    graph nodes otherwise than the rewrite of a rebuilt model did (the leaves are still checked).
    """
    return {"leaves": _leaves(result.model), "edits": None if chained else _edits(result),
            "regions": {r.path: r.kind for r in result.tree.regions()}, "user": user_state.record(result.model)}


def _read_structure(folder: Path) -> dict[str, Any] | None:
    path = folder / STRUCTURE
    if not path.is_file():
        return None  # written before structure records: the weights' keys are still checked
    try:
        structure = json.loads(path.read_text())
    except ValueError as e:
        raise SavedModelError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(structure, dict):
        raise SavedModelError(f"{path} is not a structure record (a JSON object)")
    return structure


def _went_another_way(structure: dict[str, Any] | None, result: RewriteResult) -> bool:
    """True when other modules ran (were traced) on the example inputs than when saved."""
    saved = (structure or {}).get("regions")
    return saved is not None and saved != {r.path: r.kind for r in result.tree.regions()}


def _difference(structure: dict[str, Any] | None, result: RewriteResult) -> str | None:
    """The first way the rebuilt model differs from the saved structure, in words, or None."""
    if structure is None:
        return None
    saved = structure.get("leaves") or {}
    for name, kind in _leaves(result.model).items():
        if name in saved and saved[name] != kind:  # names on one side only: the keys are checked
            return f"{name or '<root>'} is a {kind}, saved as a {saved[name]}"
    saved_edits, edits = structure.get("edits"), _edits(result)
    if saved_edits is None or edits is None:
        return None
    want, got = Counter(tuple(e) for e in saved_edits), Counter(tuple(e) for e in edits)
    for only, side, other in ((want - got, "saved", "rebuilt"), (got - want, "rebuilt", "saved")):
        for number, name, action, where in only:
            return f"pass #{number} ({name}) {action} {where or '<root>'} in the {side} model, not in the {other} one"
    return None


def _resolve_source_spec(folder: Path, source: dict[str, Any]) -> str:
    """Use the recorded model file if it still matches, else the copy saved beside the weights."""
    spec = source["spec"]
    target, _, name = spec.rpartition(":")
    if not target.endswith(".py"):
        return spec
    original = Path(target)
    copy = folder / "source" / original.name
    if original.is_file() and file_sha256(original) == source.get("sha256"):
        return spec
    if copy.is_file():
        return f"{copy}:{name}"
    if original.is_file():
        return spec  # changed since; a structure mismatch is reported when weights load
    raise SavedModelError(f"the model's source {original} is gone and {copy} is missing")


def load(path: str | Path, *, trust_pickle: bool = False) -> nn.Module:
    """Rebuild the model saved in ``path`` (structure from its recipe, weights from safetensors).

    Args:
        path: a folder written by ``graphtricks rewrite --out`` or :func:`save`.
        trust_pickle: needed only when the source model was a pickled ``.pt``.

    Returns:
        The rewritten model, an ordinary ``nn.Module``.

    Raises:
        SavedModelError: see :func:`load_saved`.

    Example:
        >>> model = graphtricks.load("out/plain_cnn")
    """
    try:
        return load_saved(path, trust_pickle=trust_pickle).model
    except SavedModelError:
        raise
    except GraphtricksError as e:
        raise SavedModelError(f"cannot rebuild the model in {path}: {e}") from e
