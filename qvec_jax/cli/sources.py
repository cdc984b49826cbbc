"""Where the unlabelled images of ``--proxy`` (lambda selection) and ``--calib`` (GPTQ)
come from, and what the printed output says about them.

A source is ``noise`` (synthetic, no data), ``pretext`` (the task the backbone was
pretrained on, read from the fine-tune's config: ``init.path`` naming a qvec checkpoint
with a task), ``donor`` (the donor QV's task) or a task name (view syntax works:
``digits@rot90=1``). Images come from the task's train split; labels are never used.
A task with the same images as the checkpoint's own task (same source and view) is
receiver data, and is labelled so: not zero-shot.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qvec_jax import checkpoints, data, select
from qvec_jax.cli.common import QvecError

#: Keywords a source may be given as, besides a task name.
KEYWORDS = ("noise", "pretext", "donor")


@dataclasses.dataclass(frozen=True)
class Images:
    """Unlabelled inputs: ``images`` NHWC, the ``kind`` a strategy declares for them (one of
    ``select.PROXY_KINDS``), the ``task`` they come from (None for noise) and a ``label``."""

    images: np.ndarray
    kind: str
    task: str | None
    label: str

    @property
    def receiver_data(self) -> bool:
        return self.kind == "unlabelled receiver"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "task": self.task, "n": len(self.images), "label": self.label}


def pretext_task(*metas: dict) -> str | None:
    """The pretext task of a fine-tune: the task of the qvec checkpoint its config's
    ``init.path`` names (None if no meta says, e.g. an ImageNet ``.npz`` init)."""
    for meta in metas:
        init = (meta.get("config") or {}).get("init") or {}
        if init.get("kind") != "pretrained" or not init.get("path"):
            continue
        try:
            task = checkpoints.read_meta(init["path"]).get("task")
        except (OSError, ValueError):
            continue
        if task:
            return task
    return None


def _same_images(a: str, b: str | None) -> bool:
    """Whether tasks ``a`` and ``b`` show the same images (same source and view)."""
    if not b:
        return False
    try:
        ta, tb = data.get_task(a), data.get_task(b)
    except (KeyError, ValueError):  # a task of a meta that this registry does not know
        return a == b
    return ta.source == tb.source and ta.view == tb.view


def resolve(
    text: str,
    *,
    option: str,
    n: int,
    image_size: int,
    own_task: str | None,
    own: str,
    donor_task: str | None = None,
    metas: tuple = (),
    data_dir: str | None = None,
    seed: int = 0,
) -> Images:
    """The images ``text`` names (see the module docstring), at most ``n`` of them.
    ``own_task``/``own``: the checkpoint's task and what to call it ("receiver")."""
    if text == "noise":
        x = np.asarray(select.noise_images(n, image_size, seed=seed))
        return Images(x, "noise", None, f"{n} synthetic noise images (no data)")
    pretext = pretext_task(*metas)
    task, kind = text, "donor"
    if text == "donor":
        if not donor_task:
            raise QvecError(f"{option} donor: the QV names no donor task; pass {option} TASK")
        task = donor_task
    elif text == "pretext":
        if not pretext:
            raise QvecError(
                f"{option} pretext: the pretext task is not known (the checkpoint's config "
                f"names no qvec checkpoint as init.path); pass {option} TASK or noise"
            )
        task, kind = pretext, "pretext"
    try:
        if _same_images(task, own_task):
            kind, why = "unlabelled receiver", f"the {own}'s own task: {own} data, NOT zero-shot"
        else:
            kind = "pretext" if _same_images(task, pretext) else kind
            role = {"pretext": "the pretext task"}.get(kind, "another task")
            role = "the donor's task" if _same_images(task, donor_task) else role
            why = f"{role}; no {own} data"
        split = data.load_split(task, "train", image_size=image_size, data_dir=data_dir)
    except (KeyError, ValueError, OSError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise QvecError(f"{option} {text}: {msg}") from None
    take = min(n, len(split))
    pos = np.sort(np.random.default_rng(seed).choice(len(split), take, replace=False))
    images = split.inputs(pos)  # model inputs; labels are not read: no strategy sees them
    return Images(np.asarray(images), kind, task, f"{take} train images of task {task} ({why})")
