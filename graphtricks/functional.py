"""Functional twins of the passes: one call rewrites a model with one technique.

Each is ``rewrite(model, [ThePass(...)], example_inputs, example_kwargs=...)`` under the
technique's name, as
Composer pairs ``apply_blurpool`` with its algorithm class. They live above both the passes
and the driver, so neither imports the other.
"""

from __future__ import annotations

from graphtricks.passes.bn_to_ln import BatchNormToLayerNorm
from graphtricks.passes.dropout import InsertDropout
from graphtricks.passes.init import Initialize
from graphtricks.passes.residual import AddResidual
from graphtricks.rewriting import rewrite

__all__ = ["add_residual", "bn_to_ln", "initialize", "insert_dropout"]


def insert_dropout(model, example_inputs=(), p: float = 0.1, *, kind: str = "element", inplace: bool = False,
                   example_kwargs=None, **kwargs):
    """Functional twin of :class:`InsertDropout`: rewrite ``model`` and return the result.

    Args:
        model: the ``nn.Module`` to rewrite.
        example_inputs: positional inputs, used for capture and shapes (``()`` when every input
            is given by keyword).
        p: dropout probability in [0, 1).
        kind: ``"element"`` or ``"channel"``.
        inplace: edit ``model`` itself instead of a copy (a transaction: on failure it is put back).
        example_kwargs: the model's keyword inputs by name (``{"attention_mask": mask}``).
        **kwargs: ``activations``, ``gates``, ``include``, ``exclude``, ``strict``.

    Returns:
        A :class:`~graphtricks.rewriting.RewriteResult` (``.model``, ``.report``).

    Example:
        >>> result = insert_dropout(model, (torch.randn(8, 3, 32, 32),), p=0.1)
    """
    return rewrite(model, [InsertDropout(p, kind=kind, **kwargs)], example_inputs, example_kwargs=example_kwargs, inplace=inplace)


def add_residual(model, example_inputs=(), blocks=(), *, inplace: bool = False, example_kwargs=None, **kwargs):
    """Functional twin of :class:`AddResidual`: rewrite ``model`` and return the result.

    Args:
        model: the ``nn.Module`` to rewrite.
        example_inputs: positional inputs, used for capture and shapes (``()`` when every input
            is given by keyword).
        blocks: qualified-name globs of the blocks to wrap.
        inplace: edit ``model`` itself instead of a copy (a transaction: on failure it is put back).
        example_kwargs: the model's keyword inputs by name (``{"attention_mask": mask}``).
        **kwargs: ``spans``, ``shortcut``, ``shortcut_norm``, ``post_act``, ``gate``, ``include``, ``exclude``, ``strict``.

    Returns:
        A :class:`~graphtricks.rewriting.RewriteResult` (``.model``, ``.report``).

    Raises:
        PassError: a block cannot be wrapped (the message names it and its shapes); nothing is changed.

    Example:
        >>> result = add_residual(model, (torch.randn(8, 3, 32, 32),), ["stages.*"], shortcut="pad")
    """
    return rewrite(model, [AddResidual(blocks, **kwargs)], example_inputs, example_kwargs=example_kwargs, inplace=inplace)


def bn_to_ln(model, example_inputs=(), *, over: str = "c", inplace: bool = False, example_kwargs=None, **kwargs):
    """Functional twin of :class:`BatchNormToLayerNorm`: rewrite ``model`` and return the result.

    Args:
        model: the ``nn.Module`` to rewrite.
        example_inputs: positional inputs, used for capture, shapes and the drift figures.
        over: ``"c"`` (LayerNorm over channels) or ``"chw"`` (over channels and positions).
        inplace: edit ``model`` itself instead of a copy (a transaction: on failure it is put back).
        example_kwargs: the model's keyword inputs by name (``{"attention_mask": mask}``).
        **kwargs: ``include``, ``exclude``, ``strict``.

    Returns:
        A :class:`~graphtricks.rewriting.RewriteResult` (``.model``, ``.report``).

    Raises:
        PassError: ``over`` is not ``c`` or ``chw``.

    Example:
        >>> result = bn_to_ln(model, (torch.randn(8, 3, 32, 32),), over="c")
        >>> [c.details["drift"] for c in result.report.changes]
    """
    return rewrite(model, [BatchNormToLayerNorm(over=over, **kwargs)], example_inputs, example_kwargs=example_kwargs, inplace=inplace)


def initialize(model, example_inputs=(), scheme: str = "auto", *, inplace: bool = False, example_kwargs=None,
               **kwargs):
    """Functional twin of :class:`Initialize`: re-initialise ``model`` and return the result.

    Args:
        model: the ``nn.Module`` to re-initialise.
        example_inputs: positional inputs, used for capture and shapes (``()`` when every input
            is given by keyword).
        scheme: auto, xavier-uniform, xavier-normal, he-uniform, he-normal or orthogonal.
        inplace: edit ``model`` itself instead of a copy (a transaction: on failure it is put back).
        example_kwargs: the model's keyword inputs by name (``{"attention_mask": mask}``).
        **kwargs: ``seed``, ``keep_bias``, ``fan``, ``zero_init_residual``, ``include_frozen``,
            ``types``, ``include``, ``exclude``, ``strict``.

    Returns:
        A :class:`~graphtricks.rewriting.RewriteResult` (``.model``, ``.report``).

    Raises:
        PassError: an unknown scheme, fan or type name.

    Example:
        >>> result = initialize(model, (torch.randn(8, 3, 32, 32),), "auto", zero_init_residual=True)
    """
    return rewrite(model, [Initialize(scheme, **kwargs)], example_inputs, example_kwargs=example_kwargs, inplace=inplace)
