"""What a grid's numbers cannot be trusted for, said before any of them (issue 20).

- **Incomplete**: fewer cells than ``grid.json``'s tasks x lambdas imply (a run still
  going, a missing checkpoint, a torn ``cells.jsonl``, one shard of several): every mean
  is over the cells present only.
- **Test-set tasks**: a task of the grid is a view of the demo's TEST set (matched by
  view key, ``data.task_sets.in_test_sets``, whatever its name or ``grid.json``'s label):
  its numbers are test-set figures, never a ground to choose on.
- **Test-half tasks**: a task of the grid is a view of the study pool's TEST half
  (``data.task_sets.half_of``, by view key; issue 21): the same, for every study.

``qvec report`` writes both loudly, on the console and at the top of ``summary.md``;
``qvec tune`` refuses such a grid (:func:`refusal`).
"""

from __future__ import annotations

from qvec_jax.data import task_sets

__all__ = ["grid_checks", "refusal", "warning_lines"]


def grid_checks(meta: dict, metrics: dict) -> dict:
    """``{"cells", "expected_cells", "incomplete", "test_views", "test_half"}`` of a grid:
    its cells in the requested grid, how many its tasks x lambdas imply, its test-set
    tasks and its other tasks of the study pool's test half."""
    tasks = list(meta.get("tasks") or metrics["tasks"])
    lambdas = list(meta.get("lambdas") or metrics["lambdas"])
    expected = meta.get("expected_cells") or len(tasks) * (3 + len(tasks) * len(lambdas))
    present = metrics["n_cells_in_grid"]
    return {
        "cells": present,
        "expected_cells": expected,
        "incomplete": present < expected,
        "test_views": (test := task_sets.in_test_sets(tasks)),
        "test_half": [t for t in tasks if t not in test and task_sets.half_of(t) == "test"],
    }


def _incomplete(c: dict) -> str:
    return (
        f"INCOMPLETE grid: {c['cells']} of the {c['expected_cells']} cells its tasks x lambdas "
        "imply; every number is over the cells present only. Finish it (rerun `qvec grid`, "
        "every --shard) before reading them"
    )


#: The two kinds of held-out views: grid_checks' key -> (the warning's tag, whose views).
HELD_OUT = {
    "test_views": ("TEST-SET", "the demo's test set"),
    "test_half": ("TEST-HALF", "the study pool's test half"),
}


def _held_out(c: dict, key: str) -> str:
    tag, whose = HELD_OUT[key]
    return (
        f"{tag} tasks: {', '.join(c[key])} (views of {whose}, matched by view key): these "
        "numbers are test figures; never choose a strategy or a constant on them "
        "(`qvec tune` refuses this grid)"
    )


def warning_lines(c: dict) -> list[str]:
    """The warnings of :func:`grid_checks` (``[]`` for a complete grid of no test task)."""
    lines = [_held_out(c, key) for key in HELD_OUT if c.get(key)]
    return lines + ([_incomplete(c)] if c["incomplete"] else [])


def refusal(c: dict) -> str | None:
    """Why ``qvec tune`` refuses the grid (None: it does not)."""
    if c["test_views"]:
        return (
            f"its tasks include views of the TEST task set ({', '.join(c['test_views'])}, "
            "matched by view key): constants are never chosen on them; tune on a dev grid "
            "(`qvec demo --tasks dev`)"
        )
    if c.get("test_half"):
        return (
            f"its tasks include views of the study pool's TEST half ({', '.join(c['test_half'])}"
            ", matched by view key): constants are never chosen on them; tune on a dev-half "
            "study (`qvec study --half dev`)"
        )
    if c["incomplete"]:
        return (
            f"the grid is incomplete: {c['cells']} of the {c['expected_cells']} cells its "
            "tasks x lambdas imply; finish it (rerun `qvec grid`, every --shard) and tune then"
        )
    return None
