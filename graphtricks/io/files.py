"""File modes and paths of what graphtricks writes.

Everything is written into a private staging folder (``tempfile.mkdtemp``: mode 0700, and some
writers create files 0600) and renamed into place; before the rename, :func:`public_modes` gives
every file and folder the mode a plain ``open``/``mkdir`` would have (0666 / 0777 less the
umask), so a saved folder and its weights read alike. Paths recorded in a folder are written
relative to it where possible (:func:`relative_to_folder`) and read back with :func:`from_folder`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["umask", "public_modes", "relative_to_folder", "from_folder", "staged_folder"]


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_modes(*paths: Path) -> None:
    """Give each path, and everything below a folder, mode 0666 (files) / 0777 (folders) less the umask.

    Example:
        >>> public_modes(staging)  # then staging.rename(out)
    """
    mask = umask()
    for root in map(Path, paths):
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if not path.is_symlink():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def relative_to_folder(path: Path, folder: Path) -> str:
    """``path`` written relative to ``folder`` (``../models/net.py``) when they share a parent
    below the filesystem root, else absolute; both are resolved first."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    try:
        common = Path(os.path.commonpath([path, folder]))
    except ValueError:  # different drives
        return str(path)
    if common == Path(common.anchor):
        return str(path)
    return Path(os.path.relpath(path, folder)).as_posix()


def from_folder(path: str, folder: Path) -> Path:
    """A path recorded in ``folder``: relative ones are read against the folder, absolute ones
    (folders written before paths were relative) as they are."""
    p = Path(path)
    return p if p.is_absolute() else (Path(folder).resolve() / p).resolve()


@contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """A path beside ``out_dir`` for several writers to fill; renamed to ``out_dir`` at the end.

    For outputs made in steps (a saved model, then its ONNX graphs): a failure or an interrupt
    in any step removes everything the steps wrote, so ``out_dir`` is either complete or as it
    was. The path is a sibling of ``out_dir``, so paths recorded relative to it stay right after
    the rename. ``out_dir`` must have been checked (absent, empty, or to be replaced).

    Example:
        >>> with staged_folder("out/cnn") as folder:
        ...     save(result, folder, source)
        ...     export_pair(model, inputs, folder)
    """
    out = Path(out_dir)
    pending = out.parent / f".{out.name}.pending-{uuid.uuid4().hex[:8]}"
    try:
        yield pending
        if out.is_dir():  # empty, or --force: replaced
            shutil.rmtree(out)
        pending.rename(out)
    except BaseException:
        shutil.rmtree(pending, ignore_errors=True)
        raise
