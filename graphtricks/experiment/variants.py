"""Variants: a name, graph passes to rewrite the model with, and training-loop techniques.

A variant comes from a recipe file, whose ``[[passes]]`` tables may name graph passes
(``dropout``, ``residual``, …) and loop techniques (``warmup``, ``label_smoothing``, …)
side by side::

    [[passes]]
    pass = "residual"
    blocks = ["blocks.*"]
    shortcut = "identity"

    [[passes]]
    pass = "warmup"
    steps = 200
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphtricks.experiment.errors import ExperimentError
from graphtricks.experiment.techniques import TECHNIQUES, TrainConfig, apply_technique

__all__ = ["Variant", "read_variant"]


def _graph_passes() -> dict:
    from graphtricks.passes import PASSES

    return PASSES


@dataclass
class Variant:
    """What one arm of an experiment changes.

    Attributes:
        name: shown in the report (a recipe's file name without ``.toml``).
        passes: graph pass configs (``{"pass": "dropout", "p": 0.5}``), applied with ``gt.rewrite``.
        techniques: loop technique entries (``{"pass": "warmup", "steps": 200}``).
    """

    name: str
    passes: list[dict[str, Any]] = field(default_factory=list)
    techniques: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_entries(cls, name: str, entries: list[dict[str, Any]]) -> Variant:
        """Split a recipe's entries into graph passes and loop techniques (checked)."""
        passes, techniques = [], []
        graph = _graph_passes()
        for i, entry in enumerate(entries, 1):
            kind = entry.get("pass") if isinstance(entry, dict) else None
            if kind in graph:
                passes.append(dict(entry))
            elif kind in TECHNIQUES:
                apply_technique(TrainConfig(), entry)  # reject bad keys now, before any training
                techniques.append(dict(entry))
            else:
                raise ExperimentError(f"variant {name}: entry #{i} names {kind!r}, which is neither a pass "
                                      f"({', '.join(graph)}) nor a training technique ({', '.join(TECHNIQUES)})")
        if not entries:
            raise ExperimentError(f"variant {name} has no [[passes]] entry: nothing to compare")
        variant = cls(name, passes, techniques)
        variant.build_passes(0)  # reject bad pass options now
        return variant

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Pass and technique entries, graph passes first (each a copy)."""
        return [dict(e) for e in (*self.passes, *self.techniques)]

    @property
    def technique_names(self) -> list[str]:
        """Pass and technique names, in recipe order."""
        return [e["pass"] for e in (*self.passes, *self.techniques)]

    def config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with this variant's loop techniques folded in."""
        for entry in self.techniques:
            base = apply_technique(base, entry)
        return base

    def build_passes(self, seed: int) -> list:
        """Fresh pass objects; ``init`` without its own ``seed`` draws with the run's seed (so seeds differ)."""
        from graphtricks.passes import pass_from_config

        built = []
        for config in self.passes:
            if config["pass"] == "init" and "seed" not in config:
                config = {**config, "seed": seed}
            try:
                built.append(pass_from_config(config))
            except Exception as e:  # noqa: BLE001 - RecipeError/PassError/TypeError alike: name the variant
                raise ExperimentError(f"variant {self.name}: {e}") from e
        return built

    def to_dict(self) -> dict[str, Any]:
        """As JSON."""
        return {"name": self.name, "passes": self.passes, "techniques": self.techniques}


def read_variant(path: str | Path) -> Variant:
    """A variant from a recipe file (its name is the file name without extension).

    Raises:
        ExperimentError: the file is missing, not TOML, or names an unknown pass, technique or option.
    """
    from graphtricks.errors import RecipeError
    from graphtricks.io.recipe import read_recipe

    path = Path(path)
    try:  # one reader for every recipe file: this one's entries may also name training techniques
        entries = read_recipe(path).passes
    except RecipeError as e:
        raise ExperimentError(str(e)) from e
    return Variant.from_entries(path.stem, entries)
