"""``experiment``: train the original model and each variant with the same seeds, data order and optimiser.

For every seed the original model is built under that seed, each variant is produced from
it by ``gt.rewrite`` (so both start from the same weights wherever the rewrite keeps them),
and all are trained on the same batches in the same order. Panels then judge each claim.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from graphtricks.experiment.data import Dataset, load_data
from graphtricks.experiment.errors import ExperimentError
from graphtricks.experiment.loop import train
from graphtricks.experiment.panels import PANELS, judge, panels_for
from graphtricks.experiment.probes import calibration, fit_data, signal, uncertainty
from graphtricks.experiment.techniques import TrainConfig
from graphtricks.experiment.variants import Variant, read_variant

__all__ = ["ExperimentResult", "experiment"]

ORIGINAL = "original"
SIGNAL_BATCH = 256


@dataclass
class ExperimentResult:
    """Everything an experiment measured.

    Attributes:
        model: what was trained (a spec or class name). data: the data set and its notes.
        config: the shared training settings. seeds: the seeds, in order.
        variants: each variant's passes, techniques, effective settings and rewrite changes.
        runs: variant name (and ``"original"``) → one record per seed (history, extra measurements).
        panels: one record per claim: metric per seed on both sides and the verdict.
        seconds: CPU seconds the experiment took.
    """

    model: str
    data: dict[str, Any]
    config: dict[str, Any]
    seeds: list[int]
    variants: list[dict[str, Any]]
    runs: dict[str, list[dict[str, Any]]]
    panels: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every number, as JSON values."""
        return {k: getattr(self, k) for k in ("model", "data", "config", "seeds", "variants", "runs", "panels", "seconds")}

    def verdicts(self) -> dict[str, str]:
        """``"variant: claim"`` → verdict, in panel order."""
        return {f"{p['variant']}: {p['claim']}": p["verdict"] for p in self.panels}


def _as_variant(v) -> Variant:
    if isinstance(v, Variant):
        return v
    if isinstance(v, (str, Path)):
        return read_variant(v)
    if isinstance(v, tuple) and len(v) == 2:
        return Variant.from_entries(v[0], list(v[1]))
    raise ExperimentError(f"a variant is a recipe path, a Variant, or (name, [entries]); got {type(v).__name__}")


def _builder(model) -> Callable[[int], nn.Module]:
    """seed → a fresh original model: a factory called under the seed, or a module re-initialised under it."""
    if isinstance(model, nn.Module):
        def rebuild(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            fresh = copy.deepcopy(model)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters") and m is not fresh:
                    m.reset_parameters()
            return fresh
        return rebuild
    if callable(model):
        def build(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            built = model()
            if not isinstance(built, nn.Module):
                raise ExperimentError(f"the model factory returned a {type(built).__name__}, not an nn.Module")
            return built
        return build
    raise ExperimentError(f"model must be an nn.Module or a zero-argument factory, got {type(model).__name__}")


def _rewrite(base: nn.Module, variant: Variant, seed: int, example: torch.Tensor) -> nn.Module:
    """``variant``'s rewrite of ``base`` (a copy); every pass must have changed something."""
    from graphtricks.rewriting import rewrite

    passes = variant.build_passes(seed)
    if not passes:
        return copy.deepcopy(base)
    from graphtricks.errors import SelectionError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = rewrite(base, passes, example_inputs=(example,))
        except SelectionError as e:  # a pattern that names nothing in this model
            raise ExperimentError(f"recipe {variant.name} does not apply to this model: {e}") from e
    done = result.report.changes_by_pass()
    idle = [p.name for p in passes if not done.get(p.name)]
    if idle:
        raise ExperimentError(f"recipe {variant.name} does not apply to this model: {', '.join(idle)} changed nothing "
                              f"(see `graphtricks inspect` for the layers and blocks a pass can match)")
    return result.model


def _plan(arms: list[Variant], baseline: str | None, dataset: Dataset) -> tuple[str, list[Variant], dict, dict]:
    """Who is judged against whom: the baseline's name, the judged variants, each one's panel kinds,
    and what each run must measure (the baseline measures what any panel needs)."""
    names = [a.name for a in arms]
    if not arms:
        raise ExperimentError("give at least one variant (a recipe) to compare with the original model")
    if len(set(names)) != len(names) or ORIGINAL in names:
        raise ExperimentError(f"variant names must be unique and not {ORIGINAL!r}: {names}")
    if baseline is not None and (baseline not in names or len(names) < 2):
        raise ExperimentError(f"baseline {baseline!r} must name one of the variants ({', '.join(names)}) "
                              "and at least one other variant to judge against it")
    base_name = baseline or ORIGINAL
    judged = [a for a in arms if a.name != base_name]
    kinds = {a.name: panels_for(a.entries) for a in judged}
    needs = {a.name: {PANELS[k].needs for k, _ in kinds[a.name]} - {""} for a in judged}
    needs[base_name] = set().union(*needs.values())
    if "uncertainty" in needs[base_name] and dataset.x_unseen is None:
        raise ExperimentError("MC dropout's panels score classes held out of training: pass known_classes "
                              "(--known-classes K) to train on classes 0 … K−1")
    return base_name, judged, kinds, needs


def _rewrites(base: nn.Module, arms: list[Variant], seed: int, dataset: Dataset, configs: dict,
              details: dict[str, dict[str, Any]]) -> dict[str, nn.Module]:
    """Every variant's rewrite of ``base``, before any training (a recipe that does not apply fails at
    once); ``details`` gets each variant's description the first time."""
    example = dataset.x_train[:min(len(dataset.x_train), 8)]
    models = {}
    for arm in arms:
        models[arm.name] = _rewrite(base, arm, seed, example)
        fit_data(models[arm.name], dataset)
        if arm.name not in details:
            n_params = sum(p.numel() for p in models[arm.name].parameters())
            details[arm.name] = {**arm.to_dict(), "config": configs[arm.name].to_dict(), "parameters": n_params}
    return models


def _measure(model, data, config, seed, needs, batch_sizes, label, progress) -> dict[str, Any]:
    """Signal at init (if needed), one training run, then calibration and the batch-size runs (if needed)."""
    record: dict[str, Any] = {"seed": seed}
    if "signal" in needs:
        record["signal"] = signal(model, data.x_train[:SIGNAL_BATCH], data.y_train[:SIGNAL_BATCH], seed)
    initial = copy.deepcopy(model) if "batch" in needs else None
    history = train(model, data, config, seed, label=label, steps="steps" in needs)
    probs = history.pop("val_probs")
    record.update(history=history, diverged=history.pop("diverged"), seconds=history.pop("seconds"))
    if "calibration" in needs:
        record["calibration"] = calibration(probs, data.y_val)
    if "uncertainty" in needs:
        record["uncertainty"] = uncertainty(model, data, config.mc_samples, seed)
    if "batch" in needs:
        record["batch"] = {}
        for size in batch_sizes:
            run = train(copy.deepcopy(initial), data, replace(config, batch_size=size), seed)
            record["batch"][str(size)] = run["val_acc"][-1]
    if progress:
        end = f", diverged at step {record['diverged']}" if record["diverged"] is not None else ""
        progress(f"seed {seed} {label}: val acc {history['val_acc'][-1]:.3f}, train acc "
                 f"{history['train_acc'][-1]:.3f} ({record['seconds']:.1f} s{end})")
    return record


def experiment(
    model: nn.Module | Callable[[], nn.Module],
    data: str | Dataset,
    variants: Sequence[Variant | str | Path | tuple],
    *,
    seeds: int | Sequence[int] = 3,
    config: TrainConfig | None = None,
    batch_sizes: Sequence[int] = (),
    train_size: int | None = None,
    label_noise: float = 0.0,
    known_classes: int | None = None,
    baseline: str | None = None,
    model_name: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Train the original model and each variant on the same data, seeds and batches; judge each claim.

    Args:
        model: a zero-argument factory (called under each seed), or a module (deep-copied and
            re-initialised with ``reset_parameters`` under each seed).
        data: ``digits``, ``breast-cancer``, ``wine``, ``npz:FILE``, or a :class:`Dataset`.
        variants: recipe paths, :class:`Variant` objects, or ``(name, [entries])``.
        seeds: how many seeds (0 … N−1), or the seeds themselves.
        config: the training settings every variant shares (a variant's techniques add to them).
        batch_sizes: batch sizes of the accuracy-against-batch-size panel (BN→LN); default
            ``(2, config.batch_size)``.
        train_size, label_noise, known_classes: see :func:`~graphtricks.experiment.data.load_data`
            (``known_classes``: train on classes 0 … K−1; the uncertainty panels of MC dropout
            score the held-out ones).
        baseline: the name of a variant to judge the others against instead of the original
            (identity shortcuts against a gated form); the original model is then only the
            starting point of the rewrites and is not trained.
        model_name: how the report names the model.
        out: also write ``report.html``, one PNG per figure and ``results.json`` to this folder
            (atomically; it must not exist or be empty unless ``force``).
        force: replace a non-empty ``out``.
        progress: called with one line per training run.

    Returns:
        An :class:`ExperimentResult`.

    Raises:
        DataError: the data cannot be used. ExperimentError: a variant does not apply to the
            model, the model's output does not fit the labels, or a setting is invalid.
        MissingExtraError: matplotlib / scikit-learn are missing (with the install line).

    Example:
        >>> result = experiment(MyMLP, "digits", ["dropout.toml"], seeds=3, config=TrainConfig(epochs=10))
        >>> result.verdicts()
    """
    started = time.process_time()
    if out is not None:
        from graphtricks.experiment.report import check_out, require_plots

        require_plots()
        check_out(Path(out), force)
    config = config or TrainConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ExperimentError("give at least one seed")
    dataset = data if isinstance(data, Dataset) else load_data(data, train_size=train_size, label_noise=label_noise,
                                                               known_classes=known_classes)
    arms = [_as_variant(v) for v in variants]
    names = [a.name for a in arms]
    base_name, judged, kinds, needs = _plan(arms, baseline, dataset)
    configs = {a.name: a.config(config) for a in arms}
    sizes = sorted({int(s) for s in (batch_sizes or (2, config.batch_size))})
    build = _builder(model)
    runs: dict[str, list[dict[str, Any]]] = {**({} if baseline else {ORIGINAL: []}), **{n: [] for n in names}}
    details: dict[str, dict[str, Any]] = {}
    for seed in seed_list:
        base = build(seed)
        dataset = fit_data(base, dataset)
        models = {ORIGINAL: base, **_rewrites(base, arms, seed, dataset, configs, details)}
        for name, m in models.items():
            if name not in runs:  # the original, when a variant is the baseline
                continue
            cfg = config if name == ORIGINAL else configs[name]
            runs[name].append(_measure(m, dataset, cfg, seed, needs[name], sizes, name, progress))
    panels = [judge(kind, claim, a.name, runs[base_name], runs[a.name], base_name)
              for a in judged for kind, claim in kinds[a.name]]
    if model_name is None:
        model_name = getattr(model, "__name__", None) or type(model).__name__
    result = ExperimentResult(
        model=model_name,
        data={"name": dataset.name, "train": len(dataset.x_train), "val": len(dataset.x_val),
              "classes": dataset.n_classes, "layout": list(dataset.x_train.shape[1:]), "notes": list(dataset.notes)},
        config={**config.to_dict(), **({"batch_sizes": sizes} if "batch" in needs[base_name] else {})}, seeds=seed_list,
        variants=[{"name": ORIGINAL, "parameters": sum(p.numel() for p in build(seed_list[0]).parameters())},
                  *[details[n] for n in names]],
        runs=runs, panels=panels)
    result.seconds = time.process_time() - started
    if out is not None:
        from graphtricks.experiment.report import write_report

        write_report(result, Path(out), force=force)
    return result
