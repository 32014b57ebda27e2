"""Checks on the paths a command names, made before torch is imported.

A missing model file, a non-empty ``--out`` or a folder that does not exist is the user's
mistake, found from the file system alone: the command line answers it in a fraction of a
second instead of after importing torch (seconds, hundreds of MB). Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

from graphtricks.errors import OutputError, SavedModelError, SpecError

__all__ = ["RECIPE", "is_saved_model", "check_output_dir", "check_spec_path", "check_saved_folder", "check_onnx_folder"]

RECIPE = "recipe.toml"
WEIGHTS = "model.safetensors"
ONNX_FILES = ("model.train.onnx", "model.infer.onnx")
_ZOO = ("tv:", "timm:", "hf:")
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")


def is_saved_model(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`graphtricks.save`."""
    return Path(path).is_dir() and (Path(path) / RECIPE).is_file()


def check_output_dir(out_dir: str | Path, force: bool = False) -> Path:
    """Refuse an output path that is a file, or a non-empty folder unless ``force``.

    Raises:
        OutputError: with what to do instead.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"output folder {out} is not empty; pass force=True to replace it or choose another folder")
    if not out.parent.exists():
        raise OutputError(f"cannot write {out}: its parent folder {out.parent} does not exist")
    return out


def check_spec_path(spec: str) -> None:
    """A spec that names a file or folder names one that exists (zoo and module specs pass).

    Raises:
        SpecError: a model file, pickled model or saved folder that is not there, or a folder
            that graphtricks did not write.
    """
    if spec.startswith(_ZOO):
        return
    target, colon, _ = spec.rpartition(":")
    if colon and len(target) > 1:  # file.py:Name or package.module:Name (not a drive letter C:\...)
        if (target.endswith(".py") or "/" in target or "\\" in target) and not Path(target).is_file():
            raise SpecError(f"model file {target} does not exist")
        return
    path = Path(spec)
    if path.is_dir():
        if not is_saved_model(path):
            raise SpecError(f"{spec} is a folder but not a graphtricks model (no {RECIPE})")
        return
    if path.exists():
        return
    if spec.endswith(_PICKLE_SUFFIXES):
        raise SpecError(f"model file {spec} does not exist")
    if "/" in spec or "\\" in spec:
        raise SpecError(f"folder {spec} does not exist (give a saved folder DIR, a model spec file.py:Name or"
                        " package.module:Name, or tv:/timm:/hf:NAME)")
    raise SpecError(f"model spec {spec!r} must be path/to/file.py:Name or package.module:Name (or tv:/timm:/hf:NAME,"
                    " or a folder written by graphtricks)")


def check_saved_folder(folder: str | Path) -> Path:
    """``folder`` is a folder written by graphtricks, with its weights.

    Raises:
        SavedModelError: it does not exist, is a file, or lacks ``recipe.toml`` or the weights.
    """
    folder = Path(folder)
    if not folder.exists():
        raise SavedModelError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise SavedModelError(f"{folder} is not a folder written by graphtricks")
    if not (folder / RECIPE).is_file():
        raise SavedModelError(f"{folder} holds no graphtricks model ({RECIPE} is missing)")
    if not (folder / WEIGHTS).is_file():
        raise SavedModelError(f"{folder} holds no weights ({WEIGHTS} is missing)")
    return folder


def check_onnx_folder(folder: str | Path) -> Path:
    """``folder`` is a saved model with both ONNX graphs (what ``validate`` reads).

    Raises:
        SavedModelError: as :func:`check_saved_folder`, or a graph is missing (export first).
    """
    folder = check_saved_folder(folder)
    missing = [name for name in ONNX_FILES if not (folder / name).is_file()]
    if missing:
        raise SavedModelError(f"{' and '.join(missing)} not found in {folder}; run `graphtricks export {folder}` first")
    return folder
