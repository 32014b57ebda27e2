"""Measurements on a model: does it fit the data, signal propagation at init, calibration, uncertainty."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from graphtricks.experiment.data import Dataset
from graphtricks.experiment.errors import ExperimentError
from graphtricks.experiment.loop import first_head

__all__ = ["ROC_GRID", "auroc", "calibration", "fit_data", "roc_curve", "signal", "uncertainty"]

# False-positive rates at which a run's ROC curve is kept (the figure averages seeds on them).
ROC_GRID = tuple(i / 20 for i in range(21))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


@torch.no_grad()
def fit_data(model: nn.Module, data: Dataset) -> Dataset:
    """``data`` in the first layout ``model`` takes (digits: flat 64, else 1×8×8), checked against the labels.

    Raises:
        ExperimentError: the model takes no layout of the data, or its output is not
            ``(N, n_classes)`` logits (for each head of a multi-head model).
    """
    was_training = model.training
    model.eval()
    failures = []
    try:
        for shape in data.layouts():
            try:
                outputs = model(data.x_train[:4].reshape(-1, *shape))
            except Exception as e:  # noqa: BLE001 - any failure means "not this layout"
                failures.append(f"({', '.join(['N', *map(str, shape)])}): {_first_line(e)}")
                continue
            heads = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            for i, head in enumerate(heads):
                shape_out = tuple(head.shape) if isinstance(head, torch.Tensor) else type(head).__name__
                if not isinstance(head, torch.Tensor) or head.ndim != 2 or head.shape[1] != data.n_classes:
                    which = f"output {i}" if len(heads) > 1 else "the model's output"
                    raise ExperimentError(
                        f"{which} has shape {shape_out} but {data.name} has {data.n_classes} classes: "
                        f"the model must give (N, {data.n_classes}) logits")
            return data.reshaped(shape)
    finally:
        model.train(was_training)
    raise ExperimentError(f"the model rejects {data.name} inputs of shape " + "; and of shape ".join(failures))


def _std(t: torch.Tensor) -> float:
    """Standard deviation in float64 (deep un-normalised nets overflow float32 squares)."""
    value = t.detach().double().std().item() if t.numel() > 1 else 0.0
    return value if value == value else float("inf")


def signal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Per-layer output std (forward) and output-gradient std (backward) at initialisation.

    Layers are the modules with a weight matrix or kernel (Linear, Conv, …), in the order the
    forward runs them; one forward and backward of cross-entropy on ``x``, train mode.

    Returns:
        ``{"layers": [names], "act_std": [...], "grad_std": [...]}``.
    """
    records: list[dict[str, Any]] = []
    handles = []

    def hook(name):
        def forward_hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                return
            record = {"layer": name, "act": _std(output), "grad": 0.0}
            records.append(record)
            if output.requires_grad:
                output.register_hook(lambda g: record.__setitem__("grad", _std(g)))
        return forward_hook

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.ndim >= 2 and not list(module.children()):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.train()
    torch.manual_seed(seed)
    try:
        loss = F.cross_entropy(first_head(model(x)).float(), y)
        if loss.requires_grad:
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"layers": [r["layer"] for r in records], "act_std": [r["act"] for r in records],
            "grad_std": [r["grad"] for r in records]}


def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of the top-class confidence, and the reliability diagram's bins.

    ECE = Σ_b (n_b / N)·|accuracy_b − confidence_b| over ``bins`` equal-width confidence bins.
    """
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.clamp(torch.bucketize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece, rows = 0.0, {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        c = float(conf[mask].double().mean()) if n else None
        a = float(correct[mask].mean()) if n else None
        if n:
            ece += n / len(y) * abs(a - c)
        rows["confidence"].append(c)
        rows["accuracy"].append(a)
        rows["count"].append(n)
    return {"ece": ece, **rows}


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of a score that should be higher on ``positives``: the chance that a
    random positive outscores a random negative, ties counting one half (Mann–Whitney U / (n·m))."""
    neg, pos = negatives.double().flatten(), positives.double().flatten()
    if not len(neg) or not len(pos):
        raise ExperimentError("AUROC needs examples on both sides (known and unseen classes)")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def roc_curve(negatives: torch.Tensor, positives: torch.Tensor) -> list[float]:
    """The true-positive rate at each false-positive rate of :data:`ROC_GRID` (thresholds on the score)."""
    neg = negatives.double().flatten().sort(descending=True).values
    pos = positives.double().flatten()
    rates = []
    for fpr in ROC_GRID:
        k = int(round(fpr * len(neg)))  # flag the k highest-scoring negatives: everything ≥ the k-th score
        threshold = neg[k - 1] if k > 0 else float("inf")
        rates.append(float((pos >= threshold).double().mean()) if k > 0 else 0.0)
    return rates


def _probabilities(model: nn.Module, x: torch.Tensor, samples: int, seed: int):
    """Softmax probabilities of the first head: deterministic (eval), or the mean of MC samples."""
    if samples:
        from graphtricks.onnx.sampling import mc_sample

        mc = mc_sample(model, x, samples, seed=seed, max_rows=8192)
        return mc.probs, mc.entropy, mc.mutual_information
    from graphtricks.onnx.sampling import predictive_entropy

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = torch.softmax(first_head(model(x)).double(), 1)
    finally:
        model.train(was_training)
    return probs, predictive_entropy(probs), None


def uncertainty(model: nn.Module, data: Dataset, samples: int = 0, seed: int = 0) -> dict[str, Any]:
    """Unseen-class detection and calibration of a trained model, deterministic and (``samples`` ≥ 2) MC dropout.

    The score is the predictive entropy: of the softmax (deterministic) or of the mean of
    ``samples`` stochastic softmaxes (MC, :func:`graphtricks.mc_sample`); positives are the
    validation examples of classes held out of training (``data.x_unseen``), negatives the
    validation examples of the known classes. MC also scores the mutual information.

    Returns:
        ``{"deterministic": {...}, "mc": {...}}`` (``mc`` only when sampled), each with ``auroc``,
        ``roc`` (true-positive rates on :data:`ROC_GRID`), the mean entropy on known and unseen
        examples, the validation accuracy and :func:`calibration` of its probabilities.

    Raises:
        ExperimentError: the data holds no unseen classes (load it with ``known_classes``).
    """
    if data.x_unseen is None or not len(data.x_unseen):
        raise ExperimentError("the uncertainty panels need classes held out of training: load the data with "
                              "known_classes (--known-classes K)")
    out: dict[str, Any] = {}
    for name, t in (("deterministic", 0), ("mc", samples)):
        if name == "mc" and not t:
            continue
        probs, known, info = _probabilities(model, data.x_val, t, seed)
        _, unseen, unseen_info = _probabilities(model, data.x_unseen, t, seed + 1)
        record = {"auroc": auroc(known, unseen), "roc": roc_curve(known, unseen),
                  "entropy_known": float(known.mean()), "entropy_unseen": float(unseen.mean()),
                  "accuracy": float((probs.argmax(1) == data.y_val).double().mean()),
                  "calibration": calibration(probs, data.y_val)}
        if info is not None:
            record["mutual_information_auroc"] = auroc(info, unseen_info)
        out[name] = record
    return out
