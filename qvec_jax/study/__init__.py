"""``qvec study`` (layer 5): every approach measured on hundreds of donor -> receiver pairs
of one half of the task-view pool, with intervals from a bootstrap over tasks.

- :mod:`~qvec_jax.study.run`: the runs: pretext, fine-tunes keyed by the recipe's
  fingerprint, one transfer grid per seed (``grid.run_grid`` with its extras and GPTQ rows).
"""

from qvec_jax.study import run
from qvec_jax.study.run import StudyError, StudySpec, recipe_fingerprint, run_study

__all__ = ["StudyError", "StudySpec", "recipe_fingerprint", "run", "run_study"]
