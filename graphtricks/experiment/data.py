"""Data for experiments: scikit-learn's bundled sets (nothing downloaded) or the user's ``npz:FILE``.

Every set is split once, with a fixed generator, so all variants and seeds see the same
training and validation examples; only the order of batches follows the run's seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphtricks.experiment.errors import DataError, require

__all__ = ["DATASETS", "Dataset", "load_data"]

# name → (scikit-learn loader, image shape of one example or None, how to scale raw features)
DATASETS: dict[str, tuple[str, tuple[int, ...] | None, str]] = {
    "digits": ("load_digits", (1, 8, 8), "divide16"),
    "breast-cancer": ("load_breast_cancer", None, "standardise"),
    "wine": ("load_wine", None, "standardise"),
}
VAL_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass
class Dataset:
    """Training and validation tensors of one classification task.

    Attributes:
        name: what ``--data`` said (``digits``, ``npz:path``).
        x_train, y_train, x_val, y_val: float32 features (natural layout) and int64 labels.
        n_classes: number of classes (labels are ``0 .. n_classes-1``).
        image_shape: the layout a conv model takes one example in (digits: ``(1, 8, 8)``), or None.
        notes: what was done to the data (subset, label noise), for the report.
        x_unseen: validation examples of classes held out of training (``known_classes``), or None.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int
    image_shape: tuple[int, ...] | None = None
    notes: tuple[str, ...] = ()
    x_unseen: torch.Tensor | None = None

    def layouts(self) -> list[tuple[int, ...]]:
        """Shapes of one example to try on a model, natural layout first."""
        natural = tuple(self.x_train.shape[1:])
        return [natural] + ([self.image_shape] if self.image_shape and self.image_shape != natural else [])

    def reshaped(self, shape: tuple[int, ...]) -> Dataset:
        """The same data with each example in ``shape``."""
        unseen = None if self.x_unseen is None else self.x_unseen.reshape(-1, *shape)
        return Dataset(self.name, self.x_train.reshape(-1, *shape), self.y_train, self.x_val.reshape(-1, *shape),
                       self.y_val, self.n_classes, self.image_shape, self.notes, unseen)


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """A fixed shuffled split, ``VAL_FRACTION`` of the examples for validation."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_val = max(1, int(round(len(x) * VAL_FRACTION)))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _bundled(name: str) -> tuple[np.ndarray, ...]:
    """A scikit-learn set, split and scaled (statistics from the training part only)."""
    loader, _, scaling = DATASETS[name]
    datasets = require("sklearn.datasets")
    bunch = getattr(datasets, loader)()
    x_train, y_train, x_val, y_val = _split(bunch.data.astype(np.float32), bunch.target.astype(np.int64))
    if scaling == "divide16":
        x_train, x_val = x_train / 16.0, x_val / 16.0
    else:
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    return x_train, y_train, x_val, y_val


def _labels(y: np.ndarray, what: str, path: Path) -> np.ndarray:
    """Integer class labels from an array, or a DataError naming the file and key."""
    if y.ndim != 1:
        raise DataError(f"{path}: '{what}' must be a 1-D array of class labels, got shape {tuple(y.shape)}")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
        raise DataError(f"{path}: '{what}' must hold integer class labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: '{what}' has negative labels; use 0 .. C-1")
    return y.astype(np.int64)


def _npz(path: Path) -> tuple[np.ndarray, ...]:
    """Arrays ``x``, ``y`` and optional ``x_val``, ``y_val`` from the user's file."""
    if not path.is_file():
        raise DataError(f"--data npz:{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
        raise DataError(f"--data npz:{path} is not a readable .npz file ({type(e).__name__}: {e})") from e
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path} has no array {' or '.join(repr(m) for m in missing)}; expected x, y and optionally x_val, y_val")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{path}: give both x_val and y_val, or neither")
    x, y = arrays["x"], _labels(arrays["y"], "y", path)
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2 or len(x) != len(y) or len(x) < 2:
        raise DataError(f"{path}: 'x' must be a numeric array (N, ...) with one row per label in 'y' "
                        f"(x {tuple(x.shape)}, y {tuple(y.shape)})")
    if "x_val" in arrays:
        xv, yv = arrays["x_val"], _labels(arrays["y_val"], "y_val", path)
        if xv.shape[1:] != x.shape[1:] or len(xv) != len(yv) or len(xv) == 0:
            raise DataError(f"{path}: x_val {tuple(xv.shape)} / y_val {tuple(yv.shape)} do not match x {tuple(x.shape)}")
        return x.astype(np.float32), y, xv.astype(np.float32), yv
    return _split(x.astype(np.float32), y)


def _hold_out(arrays: tuple[np.ndarray, ...], known: int, spec: str) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Training and validation examples of classes ``0 .. known-1``, and the validation examples of the rest."""
    x_train, y_train, x_val, y_val = arrays
    top = int(max(y_train.max(), y_val.max())) + 1
    if isinstance(known, bool) or not isinstance(known, int) or not 2 <= known < top:
        raise DataError(f"known_classes must be an integer from 2 to {top - 1} ({spec} has {top} classes), got {known!r}")
    train, val = y_train < known, y_val < known
    return (x_train[train], y_train[train], x_val[val], y_val[val]), x_val[~val]


def load_data(spec: str, *, train_size: int | None = None, label_noise: float = 0.0,
              known_classes: int | None = None) -> Dataset:
    """The data set ``spec`` names: ``digits``, ``breast-cancer``, ``wine`` or ``npz:FILE``.

    Args:
        spec: a bundled set's name, or ``npz:FILE`` with arrays ``x``, ``y`` (and optionally
            ``x_val``, ``y_val``; otherwise 20 % of ``x`` is held out with a fixed seed).
        train_size: keep only the first ``train_size`` training examples (a small set overfits).
        label_noise: fraction of training labels replaced by a different, random class (fixed seed).
        known_classes: train and validate on classes ``0 .. K-1`` only; the validation examples of
            the other classes become ``x_unseen`` (unseen-class detection).

    Returns:
        A :class:`Dataset`.

    Raises:
        DataError: an unknown name, a missing or malformed file, or bad ``train_size``/``label_noise``.
        MissingExtraError: scikit-learn is not installed (bundled sets).

    Example:
        >>> data = load_data("digits", train_size=300, label_noise=0.2)
        >>> data.x_train.shape, data.n_classes
        (torch.Size([300, 64]), 10)
    """
    if not isinstance(spec, str) or not spec:
        raise DataError("give --data: one of " + ", ".join(DATASETS) + ", or npz:FILE")
    image_shape = None
    if spec.startswith("npz:"):
        x_train, y_train, x_val, y_val = _npz(Path(spec[4:]))
    elif spec in DATASETS:
        x_train, y_train, x_val, y_val = _bundled(spec)
        image_shape = DATASETS[spec][1]
    else:
        raise DataError(f"unknown data set {spec!r}; choose one of {', '.join(DATASETS)}, or npz:FILE")
    notes = []
    unseen = None
    if known_classes is not None:
        (x_train, y_train, x_val, y_val), unseen = _hold_out((x_train, y_train, x_val, y_val), known_classes, spec)
        notes.append(f"trained on classes 0–{known_classes - 1}; {len(unseen)} validation examples of the others held out")
    if train_size is not None:
        if isinstance(train_size, bool) or not isinstance(train_size, int) or not 2 <= train_size:
            raise DataError(f"train_size must be an integer ≥ 2, got {train_size!r}")
        x_train, y_train = x_train[:train_size], y_train[:train_size]
        notes.append(f"{len(x_train)} training examples")
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    if not 0.0 <= label_noise < 1.0:
        raise DataError(f"label_noise must be in [0, 1), got {label_noise!r}")
    if label_noise > 0:
        rng = np.random.default_rng(SPLIT_SEED + 1)
        flip = rng.random(len(y_train)) < label_noise
        shift = rng.integers(1, n_classes, size=len(y_train))
        y_train = np.where(flip, (y_train + shift) % n_classes, y_train)
        notes.append(f"{flip.mean():.0%} of training labels replaced by a wrong class")
    if n_classes < 2:
        raise DataError(f"{spec}: the labels hold a single class; a classifier needs at least two")
    return Dataset(spec, torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train),
                   torch.from_numpy(np.ascontiguousarray(x_val)), torch.from_numpy(y_val), n_classes,
                   image_shape, tuple(notes), None if unseen is None else torch.from_numpy(np.ascontiguousarray(unseen)))
