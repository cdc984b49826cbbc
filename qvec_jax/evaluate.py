"""Top-1 accuracy of a param tree on a data split, optionally after PTQ: the one evaluator.

Training's final eval, ``qvec eval`` and the transfer grid all count through
:func:`count_correct`, one jitted function that takes ``params`` as an argument (never
closes over them): evaluating many trees of the same shape (the donor x receiver x
lambda grid) compiles once per (model, quantizer). PTQ, when asked for (a ``quant.QuantSpec``),
happens inside it with ``fake_quant_tree``: the same rule, axes and numbers as
``qvec_jax.ptq``.

:class:`EvalSet` holds one split as sharded device batches of uint8 images at their
stored size (placed once and reused when they fit in ``cache_bytes``, streamed
otherwise); the split's ``DevicePreprocess`` (resize, view, grey->RGB, [-1, 1]) runs
inside :func:`count_correct`, so a cached split costs no host work per evaluation.
:func:`accuracy` is the one-shot form. The last batch is zero-padded and masked, so
every example counts exactly once. The model's ``dtype`` (float32 or bfloat16) is its
compute dtype; params and PTQ stay float32 (PTQ is applied before the model casts).

:func:`count_correct_stack` (:meth:`EvalSet.accuracies`) evaluates a stack of param
trees of one shape on each batch in one call (the grid's batched cells), with exactly
the counts :func:`count_correct` gives each tree.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from qvec_jax import data as qdata
from qvec_jax import quant
from qvec_jax.sharding import make_mesh, put, replicated, round_batch, shard_batch

__all__ = [
    "EvalError", "EvalSet", "HeadWarning", "accuracy", "check_head", "count_correct",
    "count_correct_stack",
]  # fmt: skip


class EvalError(ValueError):
    """A split that cannot be evaluated; the message names it."""


class HeadWarning(UserWarning):
    """The model's head has more classes than the evaluated task.

    Shown as one line, ``HeadWarning: <message>`` (not Python's ``file:line:`` form with
    the source line under it); caught, filtered and recorded like any warning."""


def _format_warning(message, category, filename, lineno, line=None):
    if isinstance(category, type) and issubclass(category, HeadWarning):
        return f"{category.__name__}: {message}\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning
warnings.formatwarning = _format_warning  # HeadWarning's only; other warnings as before


def check_head(model, split) -> None:
    """Refuse a head with fewer classes than ``split``'s task (labels it cannot predict);
    warn (:class:`HeadWarning`, both numbers named) when it has more: the accuracy then
    counts predictions of classes the task does not have."""
    k, task = getattr(model, "num_classes", None), getattr(split, "task", None)
    n = getattr(task, "num_classes", None)
    if not k or not n or k == n:
        return
    name = f"{getattr(task, 'name', '?')}/{getattr(split, 'split', '?')}"
    if k < n:
        raise EvalError(
            f"{name}: the task has {n} classes but the model's head only {k}; evaluate a "
            "checkpoint fine-tuned on this task"
        )
    warnings.warn(
        f"{name}: the model's head has {k} classes but the task only {n}; is this the "
        "checkpoint of another task? (predictions of the extra classes count as wrong)",
        HeadWarning,
        stacklevel=3,
    )


@functools.partial(jax.jit, static_argnames=("model", "spec", "prep"))
def count_correct(params, images, labels, mask, *, model, spec: quant.QuantSpec | None,
                  prep=None, view=None):  # fmt: skip
    """Correct predictions among the real (``mask``) rows; ``PTQ(params)`` under ``spec``
    (a ``quant.QuantSpec``, or None for the params as they are). ``prep``: a
    ``data.DevicePreprocess`` applied to ``images`` (uint8) first, or None for images
    that are model inputs already; ``view``: its view as data (``prep.view_code``, with
    ``prep.without_view()``), so the views of one stored shape share one compile."""
    if spec is not None:
        params = quant.fake_quant_tree(params, spec)
    return _hits(params, _inputs(images, prep, view), labels, mask, model)


@functools.partial(jax.jit, static_argnames=("model", "prep"))
def count_correct_stack(stacked, images, labels, mask, *, model, prep=None, view=None):
    """:func:`count_correct` (``spec=None``) of each of the ``L`` param trees stacked on
    the leading axis of ``stacked``'s leaves: int32 ``[L]``. The batch is preprocessed once
    and shared; the models run one after the other (``jax.lax.map``: each the computation
    of :func:`count_correct`, so each count equals its count exactly, as
    tests/test_grid_batched.py checks; ``jax.vmap`` rounds the batched matmuls otherwise)."""
    x = _inputs(images, prep, view)
    return jax.lax.map(lambda params: _hits(params, x, labels, mask, model), stacked)


def _inputs(images, prep, view):
    """The model inputs of a batch: ``images`` through ``prep`` (and ``view``), if any."""
    if prep is None:
        return images
    if view is None:
        return prep(images)
    return qdata.device_preprocess(
        images, image_size=prep.image_size, max_value=prep.max_value, view=view
    )


def _hits(params, x, labels, mask, model):
    """The number of real (``mask``) rows of ``x`` that ``model`` classifies right."""
    logits = model.apply({"params": params}, x)
    hit = (jnp.argmax(logits, axis=-1) == labels) & mask
    return jnp.sum(hit.astype(jnp.int32))


def _item_bytes(split) -> int:
    """Bytes of one example of ``split`` as it travels (uint8 at its stored size)."""
    if hasattr(split, "item_bytes"):
        return int(split.item_bytes)
    x = np.asarray(split.get(np.arange(1))[0])
    return x.dtype.itemsize * int(np.prod(x.shape[1:]))


class EvalSet:
    """One split as sharded device batches, evaluated as often as needed.

    ``batch_size`` is rounded up to a multiple of ``mesh``'s device count (default mesh:
    every device). The uint8 batches stay on device when the split fits in
    ``cache_bytes`` (0: always streamed from the split): 1 GiB holds 1.3 million 28-px
    grey images, or 87,000 32-px RGB ones; the split's ``preprocessor`` runs in the eval.
    """

    def __init__(self, split, batch_size: int = 256, mesh: Mesh | None = None, cache_bytes=0):
        self.split = split
        self.mesh = make_mesh() if mesh is None else mesh
        self.batch_size = round_batch(batch_size, self.mesh)
        self.n = len(split)
        if self.n == 0:
            name = f"{getattr(split, 'task', '?')}/{getattr(split, 'split', split)}"
            raise EvalError(f"{name}: the split has no examples; evaluate another split")
        self.prep = getattr(split, "preprocessor", None)
        self.view = None
        self.cached = None
        if _item_bytes(split) * self.n <= cache_bytes:
            self.cached = list(self._stream())
        shape = np.shape(split.get(np.arange(1))[0]) if self.prep is not None else ()
        if len(shape) >= 3 and shape[1] == shape[2]:  # square: the view travels as data
            self.prep, self.view = self.prep.without_view(), self.prep.view_code

    def _stream(self) -> Iterator:
        for images, labels, mask in qdata.eval_batches(self.split, self.batch_size):
            yield shard_batch((images, labels, np.asarray(mask, bool)), self.mesh)

    def batches(self) -> Iterator:
        """Sharded ``(images, labels, mask)`` device batches, in split order."""
        return iter(self.cached) if self.cached is not None else self._stream()

    def accuracy(self, model, params, spec: quant.QuantSpec | None = None) -> float:
        """Top-1 accuracy of ``model`` with ``params``, or with ``PTQ(params)`` under ``spec``.

        ``params`` are replicated over the mesh (a no-op when they already are).
        """
        if spec is not None and not isinstance(spec, quant.QuantSpec):
            raise TypeError(f"spec must be a quant.QuantSpec or None, got {spec!r}")
        params = put(params, replicated(self.mesh))
        total = jnp.zeros((), jnp.int32)
        for x, y, m in self.batches():
            total = total + count_correct(params, x, y, m, model=model, spec=spec,
                                          prep=self.prep, view=self.view)  # fmt: skip
        return int(total) / self.n

    def accuracies(self, model, stacked) -> list[float]:
        """Top-1 accuracy of ``model`` with each of the param trees stacked on the leading
        axis of ``stacked``'s leaves (:func:`count_correct_stack`): the same numbers as
        :meth:`accuracy` of each tree, from one pass over the batches."""
        stacked = put(stacked, replicated(self.mesh))
        total = None
        for x, y, m in self.batches():
            count = count_correct_stack(stacked, x, y, m, model=model, prep=self.prep,
                                        view=self.view)  # fmt: skip
            total = count if total is None else total + count
        return [int(t) / self.n for t in np.asarray(total)]


def accuracy(
    model,
    params,
    split,
    spec: quant.QuantSpec | None = None,
    *,
    batch_size: int = 256,
    bits: int | None = None,
    granularity: str | None = None,
    mesh: Mesh | None = None,
) -> float:
    """Top-1 accuracy of ``model`` with ``params`` on ``split`` (a ``data.Split``).

    ``spec`` (a ``quant.QuantSpec``), or ``bits`` with ``granularity`` ("channel" by
    default, or "tensor"): evaluate ``PTQ(params)`` (round-to-nearest, the spec's rule,
    ``quant.VIT_RULE`` by default); neither: the params as they are. The batch is
    sharded over ``mesh``'s ``"data"`` axis and params replicated; ``batch_size`` is
    rounded up to a multiple of the device count. Streams the split (use
    :class:`EvalSet` to evaluate one split often). A head with more classes than the
    task warns, one with fewer is refused (:func:`check_head`).
    """
    if spec is not None or bits is not None:
        spec = quant.as_spec(spec, bits=bits, granularity=granularity)
    check_head(model, split)
    return EvalSet(split, batch_size, mesh).accuracy(model, params, spec)
