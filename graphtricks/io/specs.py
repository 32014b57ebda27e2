"""Load: turn a model spec into an ``nn.Module``.

Specs:
    ``path/to/file.py:Name``   a class or zero-argument factory in a Python file
    ``package.module:Name``    the same, from an importable module
    ``tv:NAME``                ``torchvision.models.get_model(NAME, weights=None)`` (and
                               ``weights_backbone=None`` where the builder has a backbone; extra ``zoo``)
    ``timm:NAME``              ``timm.create_model(NAME, pretrained=False)`` (extra ``zoo``)
    ``hf:MODEL_TYPE``          a Hugging Face model built from its config (extra ``zoo``)
    ``hf:PATH``                a folder written by ``save_pretrained``: its config and weights
    ``model.pt``               a whole pickled model: only with ``trust_pickle=True``

Nothing is downloaded: zoo models are architectures with random weights, unless
``pretrained=True`` (``--pretrained``): torchvision's and timm's default weights, or a Hugging
Face checkpoint (``hf:bert-base-uncased``), each from its library's own cache, downloaded there
when missing and online; offline and not cached is one ``SpecError`` line.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import io
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphtricks.errors import SpecError

__all__ = ["load_model", "parse_model_args", "load_weights", "load_matching_weights", "file_sha256", "with_metadata"]

_ZOO_PREFIXES = ("tv:", "timm:", "hf:")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["width=16", "act=relu", "bias=false"]`` → ``{"width": 16, "act": "relu", "bias": False}``.

    Raises:
        SpecError: an item is not ``key=value``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SpecError(f"model argument {item!r} is not key=value (e.g. --model-arg width=16)")
        raw = raw.strip()
        lowered = raw.lower()
        if lowered in ("true", "false"):
            value: Any = lowered == "true"
        elif lowered in ("none", "null"):
            value = None
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key.strip()] = value
    return out


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, to tell later whether a model's source changed."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _import_file(path: Path):
    """Import a Python file as a module (its folder is importable while it runs)."""
    name = f"_graphtricks_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise SpecError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _build(obj: Any, where: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a class or call a factory, checking that an ``nn.Module`` comes out."""
    if not callable(obj):
        raise SpecError(f"{where} is a {type(obj).__name__}, not an nn.Module class or factory")
    try:
        model = obj(**kwargs)
    except TypeError as e:
        raise SpecError(f"cannot build {where}: {e} (pass arguments with --model-arg key=value)") from e
    except Exception as e:
        raise SpecError(f"building {where} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise SpecError(f"{where} returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_code_spec(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise SpecError(f"model spec {spec!r} must be path/to/file.py:Name or package.module:Name")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise SpecError(f"model file {target} does not exist")
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise SpecError(f"cannot import module {target!r}: {e}") from e
        except Exception as e:
            raise SpecError(f"importing {target} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module))
        hint = f"; nn.Module classes there: {', '.join(public)}" if public else ""
        raise SpecError(f"{target} has no attribute {attr!r}{hint}")
    return _build(getattr(module, attr), spec, kwargs)


def _no_torchvision_weights(torchvision, name: str) -> dict[str, Any]:
    """The arguments that keep a torchvision builder from downloading anything.

    Segmentation and detection builders default ``weights_backbone`` to ImageNet weights,
    which they would download even with ``weights=None``.
    """
    out: dict[str, Any] = {"weights": None}
    try:
        params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    except (ValueError, TypeError):  # an unknown name: get_model says so
        return out
    if "weights_backbone" in params:
        out["weights_backbone"] = None
    return out


def _zoo_names(prefix: str, lib) -> list[str]:
    """The model names a zoo knows (for suggestions); empty when the library cannot list them."""
    try:
        if prefix == "tv":
            return list(lib.models.list_models())
        if prefix == "timm":
            return list(lib.list_models())
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return list(CONFIG_MAPPING_NAMES)
    except Exception:  # noqa: BLE001 - suggestions are a courtesy; the build still says what is wrong
        return []


def _check_zoo_name(spec: str, prefix: str, name: str, lib) -> None:
    """An unknown zoo name is one line with the closest known names, not the library's whole list."""
    from graphtricks.suggest import closest

    names = _zoo_names(prefix, lib)
    base = name.split(".")[0] if prefix == "timm" else name  # timm takes name.pretrained_tag
    if names and base not in names:
        near = closest(base, names)
        hint = f"; did you mean {', '.join(f'{prefix}:{n}' for n in near)}?" if near else f" ({len(names)} names known to {lib.__name__})"
        raise SpecError(f"unknown model {spec!r}{hint}")


def _load_zoo(spec: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    prefix, _, name = spec.partition(":")
    if not name:
        raise SpecError(f"model spec {spec!r} names no model (e.g. tv:resnet18)")
    package = {"tv": "torchvision", "timm": "timm", "hf": "transformers"}[prefix]
    try:
        lib = importlib.import_module(package)
    except ImportError as e:
        raise SpecError(f"{spec} needs {package}: install the extra with pip install 'graphtricks[zoo]'") from e
    if prefix == "hf" and Path(name).is_dir():
        return _load_hf_folder(lib, spec, Path(name), kwargs)
    if not (pretrained and prefix == "hf"):  # a checkpoint name is no model type
        _check_zoo_name(spec, prefix, name, lib)
    try:
        if pretrained:
            return _load_pretrained(lib, prefix, name, kwargs)
        if prefix == "tv":
            return lib.models.get_model(name, **{**_no_torchvision_weights(lib, name), **kwargs})
        if prefix == "timm":
            return lib.create_model(name, pretrained=False, **kwargs)
        config = lib.AutoConfig.for_model(name, **kwargs)
        return lib.AutoModel.from_config(config)
    except SpecError:
        raise
    except Exception as e:
        if pretrained:
            raise SpecError(f"cannot load pretrained weights for {spec}: not in {_cache_name(prefix)} and not"
                            f" downloadable now ({type(e).__name__}: {_first_line(e)}); run once online, or"
                            " drop --pretrained for random weights") from e
        raise SpecError(f"cannot build {spec}: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _cache_name(prefix: str) -> str:
    """Where a zoo keeps what it downloads, in words, for error lines."""
    if prefix == "tv":
        return f"torch's cache ({torch.hub.get_dir()}/checkpoints)"
    return "the Hugging Face cache (HF_HOME)"


def _load_pretrained(lib, prefix: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A zoo model with its published weights, through the library's own cache.

    What the library prints while it fetches (``Downloading: ...``) is shown once it succeeded,
    so that a failure offline stays the one line the caller raises.
    """
    said, warned = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(warned):
        model = _fetch_pretrained(lib, prefix, name, kwargs)
    sys.stderr.write(said.getvalue() + warned.getvalue())  # stdout may be --json
    return model


def _fetch_pretrained(lib, prefix: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build the model with the library's pretrained weights (its cache, or a download into it)."""
    if prefix == "tv":
        args = {k: v for k, v in _no_torchvision_weights(lib, name).items() if k != "weights"}
        return lib.models.get_model(name, **{**args, "weights": "DEFAULT", **kwargs})
    if prefix == "timm":
        return lib.create_model(name, pretrained=True, **kwargs)
    return lib.AutoModel.from_pretrained(name, **kwargs)


def _load_hf_folder(lib, spec: str, folder: Path, kwargs: dict[str, Any]) -> nn.Module:
    """A model saved with ``save_pretrained``: the class its config names, its weights; nothing downloaded."""
    if not (folder / "config.json").is_file():
        raise SpecError(f"{spec}: {folder} has no config.json; give a folder written by save_pretrained")
    try:
        config = lib.AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(lib, arch, None) if arch else None
        return (cls or lib.AutoModel).from_pretrained(folder, config=config, local_files_only=True)
    except Exception as e:
        raise SpecError(f"cannot load {spec}: {type(e).__name__}: {_first_line(e)}") from e


def load_model(
    spec: str, model_args: dict[str, Any] | None = None, *, trust_pickle: bool = False, pretrained: bool = False
) -> nn.Module:
    """Build the model a spec names.

    Args:
        spec: see the module docstring.
        model_args: keyword arguments for the class, factory or zoo constructor.
        trust_pickle: allow unpickling a whole-model ``.pt`` file (unpickling runs arbitrary code).
        pretrained: a zoo model's published weights, from its library's cache (see the module docstring).

    Returns:
        The model.

    Raises:
        SpecError: a missing file, module or attribute, a failing constructor, a missing zoo
            extra, or a pickled model without ``trust_pickle``.

    Example:
        >>> model = load_model("models/plain_cnn.py:PlainCNN", {"width": 16})
    """
    kwargs = dict(model_args or {})
    if spec.startswith(_ZOO_PREFIXES):
        return _load_zoo(spec, kwargs, pretrained)
    if pretrained:
        raise SpecError(f"--pretrained applies to tv:, timm: and hf: models, not {spec}; give weights with --weights")
    if ":" not in spec and spec.endswith(_PICKLE_SUFFIXES):
        path = Path(spec)
        if not path.is_file():
            raise SpecError(f"model file {spec} does not exist")
        if not trust_pickle:
            raise SpecError(
                f"{spec} is a pickled model and unpickling runs arbitrary code; pass --trust-pickle only if you"
                " trust its author, or give the model's class (file.py:Name) with --weights"
            )
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise SpecError(f"cannot unpickle {spec}: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise SpecError(f"{spec} holds a {type(model).__name__}, not an nn.Module (a state dict? use --weights)")
        return model
    return _load_code_spec(spec, kwargs)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (safetensors, or a ``.pt`` read with ``weights_only=True``) into ``model``.

    Raises:
        SpecError: the file is missing, unreadable, not a state dict, or does not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"cannot read weights {path}: {first[:300]}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"{path} is not a state dict of tensors")
    try:
        result = model.load_state_dict(with_metadata(state, model), strict=False)
    except (RuntimeError, ValueError) as e:  # shape mismatches raise even when strict=False
        detail = " ".join(str(e).split())[:300]
        raise SpecError(f"weights {path} do not fit the model: {detail}") from e
    problems = []
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:3])}{'…' if len(result.missing_keys) > 3 else ''}")
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:3])}{'…' if len(result.unexpected_keys) > 3 else ''}")
    if problems:
        raise SpecError(f"weights {path} do not fit the model: {'; '.join(problems)}")


def load_matching_weights(model: nn.Module, path: str | Path, renamed: dict[str, str] | None = None) -> list[str]:
    """Copy the tensors of a safetensors file that ``model`` has, by key and shape, into it.

    Unlike :func:`load_weights` this loads a part: what a model that passes then rewrite
    shares with the rewritten one (only the tensors needed are read).

    Args:
        renamed: file key -> the model's key, for tensors stored under another name; such a
            tensor wins over one stored under the model's key itself.

    Returns:
        The model's keys that were loaded.

    Raises:
        SpecError: the file is missing, truncated or not safetensors.
    """
    from safetensors import safe_open

    renamed = renamed or {}
    own = model.state_dict(keep_vars=True)
    chosen: dict[str, str] = {}  # the model's key -> the file's key
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys(), key=lambda k: k in renamed):  # renamed ones last: they win
                target = renamed.get(key, key)
                t = own.get(target)
                lazy = isinstance(t, nn.parameter.UninitializedTensorMixin)  # no shape yet
                if t is not None and not lazy and list(f.get_slice(key).get_shape()) == list(t.shape):
                    chosen[target] = key
            state = {target: f.get_tensor(key) for target, key in chosen.items()}
    except Exception as e:
        first = " ".join(str(e).split())[:300]
        raise SpecError(f"cannot read weights {path}: {first}") from e
    model.load_state_dict(with_metadata(state, model), strict=False)
    return sorted(state)


def with_metadata(state: dict, model: nn.Module) -> dict:
    """``state`` with state-dict metadata: its own, else the model's (what its classes save).

    A layer whose ``_load_from_state_dict`` reads its ``version`` (torchvision MNASNet) refuses
    a state dict without one, as a safetensors file is.
    """
    if getattr(state, "_metadata", None) is not None:
        return state
    out = OrderedDict(state)
    out._metadata = getattr(model.state_dict(keep_vars=True), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out
