"""What every ``qvec`` subcommand shares: the user-facing error, parser and checkpoint I/O.

Inputs and outputs of the checkpoint commands are directories written by
``checkpoints.save_params`` (params + meta). Outputs are written atomically, and an
output that equals, contains or lies inside an input is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from qvec_jax import checkpoints

_FMT = argparse.RawDescriptionHelpFormatter


class QvecError(Exception):
    """An error whose message tells the user what to do next (printed without a traceback)."""


def add_parser(sub, name: str, help: str, example: str, description: str = ""):
    """A subcommand parser whose help ends with a runnable example."""
    return sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog="example:\n  " + example,
        formatter_class=_FMT,
    )


def check_output(out: str, inputs: list[str], overwrite: bool) -> Path:
    """Refuse an OUT that equals/contains/lies inside an input, or exists (unless overwrite)."""
    o = Path(out).resolve()
    for i in inputs:
        p = Path(i).resolve()
        if o == p or p in o.parents or o in p.parents:
            raise QvecError(
                f"output {out} would overwrite input {i} (equal, inside it, or containing it); "
                "choose another output path"
            )
    if o.exists() and not overwrite:
        raise QvecError(f"output {out} already exists; choose another path or pass --overwrite")
    return o


def restore(path: str):
    """``(params, meta)`` of the checkpoint directory ``path``, or a QvecError saying why not."""
    if not Path(path).exists():
        raise QvecError(f"{path}: no such checkpoint directory")
    try:
        return checkpoints.restore_params(path)
    except checkpoints.CheckpointError as e:
        raise QvecError(str(e)) from None


def same_backbone(meta_a: dict, meta_b: dict, a: str, b: str) -> None:
    """Refuse to combine checkpoints fine-tuned from different pretrained backbones."""
    ia, ib = meta_a.get("backbone_id"), meta_b.get("backbone_id")
    if ia and ib and ia != ib:
        raise QvecError(
            f"{a} (backbone_id {ia}) and {b} (backbone_id {ib}) were fine-tuned from different "
            "pretrained backbones; a quantization vector only transfers within one backbone"
        )


def save(out: Path, params, meta: dict) -> None:
    """Write ``params`` (brought to the host) and ``meta`` to ``out`` and say so."""
    checkpoints.save_params(out, jax.tree.map(np.asarray, params), meta)
    print(f"wrote {out}")
