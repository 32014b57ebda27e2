"""Recipes: a pass list (and the model it was applied to) written down as TOML.

A recipe is what ``rewrite`` ran, so a saved model can be rebuilt and a rewrite replayed::

    [source]
    spec = "models/plain_cnn.py:PlainCNN"
    input_shapes = [[8, 3, 32, 32]]

    [[passes]]
    pass = "dropout"
    p = 0.1
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from graphtricks.errors import RecipeError
from graphtricks.passes.base import GraphtricksPass, pass_from_config

__all__ = ["Recipe", "read_recipe", "write_recipe", "dumps_toml"]


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

    def build_passes(self) -> list[GraphtricksPass]:
        """Instantiate the passes (errors name the entry)."""
        out = []
        for i, config in enumerate(self.passes, 1):
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
    lines = ["# graphtricks recipe: replay with `graphtricks rewrite SPEC --recipe THIS_FILE`", ""]
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


def read_recipe(path: str | Path) -> Recipe:
    """Read a recipe file.

    Raises:
        RecipeError: missing file, invalid TOML (with the line), or a malformed pass list;
            unknown passes and options are reported by :meth:`Recipe.build_passes`.
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
    unknown = set(data) - {"source", "passes"}
    if unknown:
        raise RecipeError(f"recipe {path}: unknown table(s) {', '.join(sorted(unknown))}; expected [source] and [[passes]]")
    passes = data.get("passes", [])
    if not isinstance(passes, list) or not all(isinstance(p, dict) and "pass" in p for p in passes):
        raise RecipeError(f"recipe {path}: write each pass as a [[passes]] table with a 'pass' key")
    source = data.get("source", {})
    if not isinstance(source, dict):
        raise RecipeError(f"recipe {path}: [source] must be a table")
    return Recipe(passes=passes, source=source)
