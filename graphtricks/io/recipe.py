"""Recipes: a pass list (and the model it was applied to) written down as TOML.

A recipe is what ``rewrite`` ran, so a saved model can be rebuilt and a rewrite replayed::

    format = 2

    [source]
    spec = "models/plain_cnn.py:PlainCNN"
    input_shapes = [[8, 3, 32, 32]]

    [[passes]]
    pass = "dropout"
    p = 0.1

``format`` is the version of what a recipe means. A pass option added after a release may change
what a recipe without it means (dropout's ``gates``: the first release inserted dropout after
gates, later ones skip them unless told), so an option missing from an older recipe takes the
value of the release that wrote it (:data:`RELEASE_DEFAULTS`). Recipes of the first two releases
carry no ``format``: a saved folder tells which release wrote it (:func:`graphtricks.io.folder.load`),
and a recipe file given alone is read as the current format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from graphtricks.errors import RecipeError
from graphtricks.passes.base import GraphtricksPass, pass_from_config

__all__ = ["FORMAT", "RELEASE_DEFAULTS", "Recipe", "read_recipe", "write_recipe", "dumps_toml"]

# The recipe format this release writes. 0: the first release (no gates option: dropout went after
# gates); 1: gates skipped unless ``gates = true``, unmatched patterns ignored; 2: ``format`` written,
# a selection pattern that matches nothing is an error unless ``strict = false``, and dropout skips
# activations that do not depend on the model's inputs unless ``constants = true``.
FORMAT = 2
# (pass name or "*" for every pass, option) -> (the format that introduced the option, the value
# recipes of earlier formats meant by leaving it out)
RELEASE_DEFAULTS: dict[tuple[str, str], tuple[int, Any]] = {
    ("dropout", "gates"): (1, True),
    ("*", "strict"): (2, False),
    ("dropout", "constants"): (2, True),
}


@dataclass
class Recipe:
    """A pass list, and optionally the source model it applies to.

    Attributes:
        passes: pass configs, ``[{"pass": "dropout", "p": 0.1}, ...]``, in order.
        source: how to rebuild the original model: ``spec``, ``model_args``, ``input_shapes``,
            ``input_dtype``, ``trust_pickle``, ``sha256`` (of a model file).
    """

    passes: list[dict[str, Any]] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    def upgraded(self) -> Recipe:
        """This recipe in the current format: each option an older release left out is written
        with the value that release meant (``gates = true`` for a format-0 dropout)."""
        passes = []
        for config in self.passes:
            config = dict(config)
            for (name, option), (since, value) in RELEASE_DEFAULTS.items():
                if self.format < since and name in ("*", config.get("pass")) and option not in config:
                    config[option] = value
            passes.append(config)
        return Recipe(passes=passes, source=dict(self.source), format=FORMAT)

    def build_passes(self) -> list[GraphtricksPass]:
        """Instantiate the passes (errors name the entry), as the release that wrote them meant."""
        out = []
        for i, config in enumerate(self.upgraded().passes, 1):
            try:
                _check_keys(config)
                out.append(pass_from_config(config))
            except RecipeError as e:
                raise RecipeError(f"recipe pass #{i}: {e}") from e
        return out


def _check_keys(config: dict[str, Any]) -> None:
    """Unknown pass names and option keys are one line with the closest valid ones."""
    import inspect

    from graphtricks.passes.base import PASSES
    from graphtricks.suggest import did_you_mean

    name = config.get("pass")
    if name not in PASSES:
        hint = did_you_mean(str(name), PASSES) if isinstance(name, str) else ""
        raise RecipeError(f"unknown pass {name!r}{hint} (known passes: {', '.join(sorted(PASSES))})")
    params = inspect.signature(PASSES[name].__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k in params if k != "self"]
    for key in config:
        if key != "pass" and key not in valid:
            raise RecipeError(f"pass {name!r} has no option {key!r}{did_you_mean(key, valid)} (options: {', '.join(valid)})")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise RecipeError(f"cannot write non-finite number {v} to a recipe")
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise RecipeError(f"cannot write a {type(v).__name__} to a recipe")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _value(k)


def dumps_toml(recipe: Recipe) -> str:
    """The recipe as TOML text (tables ``[source]`` and ``[[passes]]``)."""
    lines = ["# graphtricks recipe: replay with `graphtricks rewrite SPEC --recipe THIS_FILE`", "",
             f"format = {recipe.format}", ""]
    if recipe.source:
        lines.append("[source]")
        lines += [f"{_key(k)} = {_value(v)}" for k, v in recipe.source.items() if v is not None]
        lines.append("")
    for config in recipe.passes:
        lines.append("[[passes]]")
        lines += [f"{_key(k)} = {_value(v)}" for k, v in config.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def write_recipe(recipe: Recipe, path: Path) -> None:
    """Write ``recipe`` as TOML to ``path``."""
    Path(path).write_text(dumps_toml(recipe))


def read_recipe(path: str | Path, *, unversioned: int = FORMAT) -> Recipe:
    """Read a recipe file.

    Args:
        unversioned: the format of a recipe that names none (the first two releases wrote none;
            a saved folder knows which one wrote it).

    Raises:
        RecipeError: missing file, invalid TOML (with the line), a malformed pass list, or a
            format newer than this release reads; unknown passes and options are reported by
            :meth:`Recipe.build_passes`.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {path} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe {path} is not a text file") from e
    unknown = set(data) - {"source", "passes", "format"}
    if unknown:
        raise RecipeError(f"recipe {path}: unknown table(s) {', '.join(sorted(unknown))}; expected [source] and [[passes]]")
    version = data.get("format", unversioned)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise RecipeError(f"recipe {path}: format must be a whole number (this release writes {FORMAT}), got {version!r}")
    if version > FORMAT:
        raise RecipeError(f"recipe {path} has format {version}, written by a newer graphtricks (this one reads formats"
                          f" up to {FORMAT}): upgrade graphtricks to use it")
    passes = data.get("passes", [])
    if not isinstance(passes, list) or not all(isinstance(p, dict) and "pass" in p for p in passes):
        raise RecipeError(f"recipe {path}: write each pass as a [[passes]] table with a 'pass' key")
    source = data.get("source", {})
    if not isinstance(source, dict):
        raise RecipeError(f"recipe {path}: [source] must be a table")
    return Recipe(passes=passes, source=source, format=version)
