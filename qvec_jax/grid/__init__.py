"""The donor x receiver x lambda transfer grid (layer 5).

One package, one module per part:

- :mod:`~qvec_jax.grid.run`: the entry point, :func:`run_grid`: plans the cells, splits
  them over shards (:func:`shard_of`) and resumes what a workdir already holds;
- :mod:`~qvec_jax.grid.store`: :class:`GridStore`, the one owner of a grid workdir
  (``cells.jsonl``, shard files, ``grid.json``, locks);
- :mod:`~qvec_jax.grid.inputs`: the FP/QAT checkpoints a grid reads and whether they
  belong together (one backbone, one recipe);
- :mod:`~qvec_jax.grid.cells`: the cell evaluator (checkpoints on demand, the jitted
  :func:`patch_and_quantize` and :func:`ptq_jit`, cached eval splits);
- :mod:`~qvec_jax.grid.extras`: lambda-strategy measurements and leave-one-out merges;
- :mod:`~qvec_jax.grid.gptq`: the GPTQ rows (calibration sources, GPTQ + QV);
- :mod:`~qvec_jax.grid.gptq_bank`: GPTQ of the bank-patched receiver (``qvec quantize``'s
  candidates).

The report of a grid is :mod:`qvec_jax.report` (layer 6), which reads the store.
"""

from qvec_jax.grid import cells, extras, gptq, gptq_bank, inputs, run, store
from qvec_jax.grid.cells import patch_and_quantize, ptq_jit
from qvec_jax.grid.extras import Extras
from qvec_jax.grid.gptq import GptqCells
from qvec_jax.grid.gptq_bank import BankCells
from qvec_jax.grid.inputs import GridError, MissingCheckpoints, checkpoint_path
from qvec_jax.grid.run import DEFAULT_LAMBDAS, plan_cells, run_grid, shard_of
from qvec_jax.grid.store import GridStore

__all__ = [
    "DEFAULT_LAMBDAS",
    "BankCells",
    "Extras",
    "GptqCells",
    "GridError",
    "GridStore",
    "MissingCheckpoints",
    "cells",
    "checkpoint_path",
    "extras",
    "gptq",
    "gptq_bank",
    "inputs",
    "patch_and_quantize",
    "plan_cells",
    "ptq_jit",
    "run",
    "run_grid",
    "shard_of",
    "store",
]
