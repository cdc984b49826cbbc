"""``MergeSpec``: a recipe for merging quantization vectors (``merge.merge_qvs``).

The method and the parameters it reads, validated once, frozen and JSON-serializable
(``to_dict`` / ``from_dict``), so a merged checkpoint or a grid cell can record how its
QV was made and the recipe can be rebuilt from that record.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["COMBINES", "METHODS", "SCOPES", "MergeSpec"]

METHODS = ("mean", "sum", "ties", "dare", "model_stock")
COMBINES = ("mean", "sum", "ties")  # how DARE combines the sparsified vectors
SCOPES = ("global", "leaf")  # TIES trim threshold / Model Stock cosine: whole vector or per leaf
#: The parameters each method reads, with the default of each (the papers' defaults where
#: they give one: TIES trims globally, Model Stock measures its angle per layer).
_PARAMS = {
    "mean": {},
    "sum": {},
    "ties": {"density": 0.2, "scope": "global"},
    "dare": {"p": 0.5, "seed": 0, "combine": "mean"},
    "model_stock": {"scope": "leaf"},
}


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """A merge recipe: ``method`` and the parameters it reads, validated once.

    ``weights``: one finite float per QV, or ``None`` (uniform); ``density`` (ties): the
    fraction of entries each vector keeps, in (0, 1]; ``p`` (dare): the drop rate, in
    [0, 1); ``seed`` (dare): int; ``combine`` (dare): ``"mean"``, ``"sum"`` or ``"ties"``
    (sign election and disjoint mean, no trim: DARE-TIES); ``scope`` (ties, model_stock):
    ``"global"`` or ``"leaf"``. A parameter the method does not read must stay ``None``
    (a typo'd recipe fails here, not silently); unset ones get the method's default.
    ``to_dict()`` / ``from_dict()`` round-trip through JSON.
    """

    method: str = "mean"
    weights: tuple[float, ...] | None = None
    density: float | None = None
    p: float | None = None
    seed: int | None = None
    combine: str | None = None
    scope: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        used = _PARAMS[self.method]
        for name in ("density", "p", "seed", "combine", "scope"):
            value = getattr(self, name)
            if name not in used and value is not None:
                raise ValueError(
                    f"{name}: not a parameter of method {self.method!r} (leave it unset)"
                )
            if name in used and value is None:
                object.__setattr__(self, name, used[name])
        if self.weights is not None:
            object.__setattr__(self, "weights", _check_weights(self.weights))
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density: must be in (0, 1], got {self.density}")
        if self.p is not None and not 0 <= self.p < 1:
            raise ValueError(f"p: the drop rate must be in [0, 1), got {self.p}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, numbers.Integral)
            or self.seed < 0
        ):
            raise ValueError(f"seed: must be an int >= 0, got {self.seed!r}")
        for name, cast in (("density", float), ("p", float), ("seed", int)):  # JSON-ready
            if getattr(self, name) is not None:
                object.__setattr__(self, name, cast(getattr(self, name)))
        for name, allowed in (("combine", COMBINES), ("scope", SCOPES)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )

    def to_dict(self) -> dict:
        """The method and the parameters it reads (JSON-ready; weights as a list or None)."""
        d = {"method": self.method, "weights": None if self.weights is None else list(self.weights)}
        return d | {k: getattr(self, k) for k in _PARAMS[self.method]}

    @classmethod
    def from_dict(cls, d: dict) -> MergeSpec:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: not a MergeSpec field")
        return cls(**d)


def _check_weights(weights) -> tuple[float, ...]:
    out = tuple(float(w) for w in weights)
    for i, w in enumerate(out):
        if not math.isfinite(w):
            raise ValueError(f"weights[{i}]: {w} is not finite")
    if not out:
        raise ValueError("weights: empty; give one weight per QV or None")
    return out
