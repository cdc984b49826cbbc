"""The strategy interface of lambda selection: candidates, data kinds, ``Context``,
``Choice``, ``Strategy``, the tie rule (``pick``) and ``Fixed``.

A strategy declares the one kind of data it uses (``DATA_KINDS``) and is handed a
:class:`Context` that gives it that kind only; asking for another kind raises
:class:`UndeclaredDataError`. Scores are "higher is better"; ties go to the smaller
``|lam - 1|``, then the smaller ``lam``; ``None`` (NaN/Inf) never wins.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from qvec_jax import quant

PAPER_LAMBDAS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.05, 1.2, 1.35, 1.5)
CANDIDATES = (0.0, *PAPER_LAMBDAS)
DATA_KINDS = ("none", "donor", "pretext", "noise", "unlabelled receiver", "labelled receiver")
PROXY_KINDS = ("donor", "pretext", "noise", "unlabelled receiver")
MEASURES = ("kl", "agree", "cos")


class SelectError(ValueError):
    """Bad input to a lambda-selection strategy (one line: what and what to do)."""


class UndeclaredDataError(SelectError):
    """A strategy asked its context for a kind of data it did not declare."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """A strategy's pick: ``lam``, the per-candidate ``scores`` (higher is better,
    ``None`` = not comparable), a one-line ``why``, and who chose on which data."""

    lam: float
    candidates: tuple[float, ...]
    scores: tuple[float | None, ...]
    why: str
    strategy: str
    data: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "candidates": list(self.candidates),
            "scores": list(self.scores),
        }


def pick(candidates, scores) -> float:
    """The candidate with the highest score; ties go to the smaller ``|lam - 1|``, then
    the smaller ``lam``. ``None``/NaN never win; if every score is, ``0.0`` (no patch)."""
    ok = [(c, s) for c, s in zip(candidates, scores) if s is not None and not math.isnan(s)]
    if not ok:
        return 0.0
    return min(ok, key=lambda cs: (-cs[1], abs(cs[0] - 1.0), cs[0]))[0]


def split_name(name: str) -> tuple[str, dict[str, float]]:
    """``"family:k=v:k2=v2"`` -> ``("family", {"k": v, "k2": v2})`` (one-line errors)."""
    family, *parts = str(name).split(":")
    constants = {}
    for part in parts:
        k, eq, v = part.partition("=")
        if eq and k.strip() in constants:
            raise SelectError(
                f"strategy {name!r}: constant {k.strip()!r} is given twice; give it once"
            )
        try:
            constants[k.strip()] = float(v)
        except ValueError:
            eq = ""
        if not eq or not k.strip() or not math.isfinite(constants.get(k.strip(), 0.0)):
            raise SelectError(
                f"strategy {name!r}: write constants as ':name=finite number', got {part!r}"
            )
    return family, constants


def number(v: float) -> str:
    """The shortest text that reads back as ``v`` (``2.0`` -> ``"2"``), for names."""
    text = repr(float(v))
    return text[:-2] if text.endswith(".0") else text


def floats(x) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(x, np.float64).ravel()]


@dataclasses.dataclass(frozen=True)
class Context:
    """What a strategy may see: the receiver, the donor QV, the quantizer, the model,
    the candidates, and through :meth:`data` only the kind of data it declared.

    It holds that kind's data only (``given``; None when absent): :meth:`of` builds it
    from every kind's inputs and drops the others, so no attribute reaches them."""

    fp_r: Any
    qv: Any
    spec: quant.QuantSpec
    model: Any
    candidates: tuple[float, ...]
    strategy: str
    declared: str
    given: Any = dataclasses.field(default=None, repr=False)

    @classmethod
    def of(cls, inputs: Mapping | None, *, declared: str, **fields) -> Context:
        """The context of a strategy that ``declared`` one kind, from ``inputs`` (``{kind:
        data}`` of any kinds): it keeps ``inputs[declared]`` and nothing else."""
        return cls(declared=declared, given=(inputs or {}).get(declared), **fields)

    def data(self, kind: str):
        """The inputs of ``kind``; refused unless the strategy declared that kind.
        "noise" may be absent (``None``): the strategy then makes its own."""
        if kind not in DATA_KINDS:
            raise SelectError(f"unknown data kind {kind!r}; use one of {DATA_KINDS}")
        if kind != self.declared:
            raise UndeclaredDataError(
                f"strategy {self.strategy!r} declared data {self.declared!r} but asked for "
                f"{kind!r}; declare it (data=...) or do not use it"
            )
        x = self.given
        if x is None and kind != "noise":
            raise SelectError(
                f"strategy {self.strategy!r} needs {kind!r} data: pass inputs={{{kind!r}: ...}}"
            )
        return x


class Strategy:
    """Base: ``family``, ``data`` (one of ``DATA_KINDS``), ``key`` (where ``collect``'s
    measurement is stored; ``None``: needs none), ``collect(ctx)``, ``decide(record)``.

    ``tunable`` names the dataclass fields that ``decide`` alone uses (constants that a
    DEV task set may re-choose from stored records); ``name`` is the ``family`` plus
    ``:field=value`` for each one not at its default, e.g. ``proxy-pretext-kl:margin=0.2``.
    """

    data: str = "none"
    key: str | None = None
    tunable: ClassVar[tuple[str, ...]] = ()

    @property
    def family(self) -> str:
        raise NotImplementedError

    @property
    def name(self) -> str:
        fields = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [(k, getattr(self, k)) for k in self.tunable if getattr(self, k) != fields[k]]
        return self.family + "".join(f":{k}={number(v)}" for k, v in changed)

    def with_constants(self, constants: Mapping[str, float]) -> Strategy:
        """This strategy with the ``tunable`` constants replaced (others refused)."""
        bad = [k for k in constants if k not in self.tunable]
        if bad:
            can = ", ".join(self.tunable) or "none"
            raise SelectError(
                f"strategy {self.family!r} has no constant {bad[0]!r} (tunable: {can})"
            )
        return dataclasses.replace(self, **{k: float(v) for k, v in constants.items()})

    def collect(self, ctx: Context) -> dict:
        return {}

    def decide(self, record: Mapping) -> Choice:
        raise NotImplementedError

    def select(self, ctx: Context) -> Choice:
        rec = {"candidates": list(ctx.candidates)}
        if self.key is not None:
            rec[self.key] = self.collect(ctx)
        return self.decide(rec)

    def _choice(self, cands, scores, why: str, lam: float | None = None) -> Choice:
        """The :class:`Choice` of ``pick(cands, scores)``, or of ``lam`` when given."""
        lam = pick(cands, scores) if lam is None else lam
        return Choice(
            lam, tuple(cands), tuple(scores), why.replace("{lam}", f"{lam:g}"), self.name, self.data
        )


@dataclasses.dataclass(frozen=True)
class Fixed(Strategy):
    """Always ``lam`` (the paper's zero-shot ``lam = 1``); needs nothing."""

    lam: float = 1.0

    @property
    def family(self) -> str:
        return f"lam={self.lam:g}"

    def decide(self, record):
        cands = record["candidates"]
        if self.lam not in cands:
            raise SelectError(f"{self.name}: {self.lam} is not a candidate {cands}")
        return self._choice(cands, [float(c == self.lam) for c in cands], "fixed lambda {lam}")
