"""Where the unlabelled images of ``--proxy`` (lambda selection) and ``--calib`` (GPTQ)
come from, and what the printed output says about them.

A source is ``noise`` (synthetic, no data), ``pretext`` (the task the backbone was
pretrained on, read from the fine-tune's config: ``init.path`` naming a qvec checkpoint
with a task), ``donor`` (the donor QV's task), ``receiver`` (the checkpoint's own task)
or a task name (view syntax works: ``digits@rot90=1``). Images come from the task's train
split; labels are never used. The checkpoint's own task (same sources and view) is
receiver data, and so is any sample that holds some of the receiver's images (the
package's one overlap rule, :mod:`qvec_jax.data.overlap`: a pretext sample of
``fashion_mnist`` holds train AND val images of ``fmnist_a``): the label says so, with
the count per split, and it is not zero-shot.
"""

from __future__ import annotations

import dataclasses
import difflib

import numpy as np

from qvec_jax import checkpoints, data, select
from qvec_jax.cli.common import QvecError
from qvec_jax.data import overlap

#: Keywords a source may be given as, besides a task name.
KEYWORDS = ("noise", "pretext", "donor", "receiver")


@dataclasses.dataclass(frozen=True)
class Images:
    """Unlabelled inputs: ``images`` NHWC, the ``kind`` a strategy declares for them (one of
    ``select.PROXY_KINDS``), the ``task`` they come from (None for noise), a ``label``,
    ``overlap``: how many of the receiver's train/val/test images they are (None when it
    could not be counted) and whether they are ``receiver_data`` (then not zero-shot)."""

    images: np.ndarray
    kind: str
    task: str | None
    label: str
    overlap: dict | None = dataclasses.field(default_factory=overlap.zero_counts)
    receiver_data: bool = False

    def to_dict(self) -> dict:
        return {"kind": self.kind, "task": self.task, "n": len(self.images), "label": self.label,
                "overlap": self.overlap, "receiver_data": self.receiver_data}  # fmt: skip


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


def _did_you_mean(text: str) -> str:
    """`` Did you mean X?``: a close keyword first, else close task names (or nothing)."""
    close = difflib.get_close_matches(text, KEYWORDS, n=1, cutoff=0.6)
    close = close or difflib.get_close_matches(text, list(data.TASKS), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _task_of(text: str, option: str, own_task, donor_task, pretext) -> tuple[str, str]:
    """``(task, kind)`` that a keyword or task name stands for; one-line refusals."""
    if text == "donor":
        if not donor_task:
            raise QvecError(f"{option} donor: the QV names no donor task; pass {option} TASK")
        if "+" in donor_task:  # a merged QV's donors, joined by '+' (no task name has one)
            try:
                data.get_task(donor_task)
            except (KeyError, ValueError):
                raise QvecError(
                    f"{option} donor: the QV is merged (donors {donor_task.replace('+', ', ')}): "
                    f"it has no single donor task; pass another {option} (TASK, pretext, noise)"
                ) from None
        return donor_task, "donor"
    if text == "pretext":
        if not pretext:
            raise QvecError(
                f"{option} pretext: the pretext task is not known (the checkpoint's config "
                f"names no qvec checkpoint as init.path); pass {option} TASK or noise"
            )
        return pretext, "pretext"
    if text == "receiver":
        if not own_task:
            raise QvecError(f"{option} receiver: the checkpoint names no task; pass {option} TASK")
        return own_task, "unlabelled receiver"
    try:
        data.get_task(text)
    except (KeyError, ValueError) as e:
        if data.registry.VIEW_SEP in text:  # a view of a task: the parser says what is wrong
            raise QvecError(f"{option} {text}: {e}") from None
        raise QvecError(
            f"{option} {text!r}: not a task nor one of {', '.join(KEYWORDS)}.{_did_you_mean(text)}"
            " Run `qvec tasks` to list the tasks."
        ) from None
    return text, "donor"


def _counts(task: str, n: int, seed: int, own_task, data_dir) -> dict | None:
    """How many of the receiver's train/val/test images the sample holds (None: unknown)."""
    if not own_task:
        return overlap.zero_counts()
    try:
        return overlap.overlap_counts(task, n, own_task, seed=seed, data_dir=data_dir)
    except (KeyError, ValueError, OSError):
        return None


def _why(task: str, kind: str, own: str, names: dict, counts) -> tuple[str, str, bool]:
    """``(kind, why, receiver_data)``: what the label says about a sample of ``task``."""
    own_task, pretext, donor_task = names["own"], names["pretext"], names["donor"]
    if overlap.same_task(task, own_task):
        return "unlabelled receiver", f"the {own}'s own task: {own} data, NOT zero-shot", True
    kind = "pretext" if overlap.same_task(task, pretext) else kind
    role = {"pretext": "the pretext task"}.get(kind, "another task")
    role = "the donor's task" if overlap.same_task(task, donor_task) else role
    if overlap.has_overlap(counts):
        shared = f"it holds {own} images: {overlap.describe(counts)}"
        return kind, f"{role}; {shared}: {own} data, NOT zero-shot", True
    if counts is None and overlap.may_overlap(task, own_task):
        return kind, f"{role}; it may hold {own} images (not counted): NOT zero-shot", True
    return kind, f"{role}; no {own} data", False


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
    task, kind = _task_of(text, option, own_task, donor_task, pretext)
    try:
        split = data.load_split(task, "train", image_size=image_size, data_dir=data_dir)
    except (KeyError, ValueError, OSError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise QvecError(f"{option} {text}: {msg}") from None
    pos = overlap.draw_positions(len(split), n, seed)  # the sample that overlap counts
    counts = _counts(task, n, seed, own_task, data_dir)
    names = {"own": own_task, "pretext": pretext, "donor": donor_task}
    kind, why, receiver_data = _why(task, kind, own, names, counts)
    images = split.inputs(pos)  # model inputs; labels are not read: no strategy sees them
    label = f"{len(pos)} train images of task {task} ({why})"
    return Images(np.asarray(images), kind, task, label, counts, receiver_data)
