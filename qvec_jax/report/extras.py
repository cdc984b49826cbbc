"""The report's extras: lambda strategies and leave-one-out merges, from the ``scores``
and ``merge`` cells of :mod:`qvec_jax.grid.extras` (absent cells: no extras at all, so
``summary.md`` is then exactly the report without them).

The strategy of the heatmap and of the merge rows is fixed in advance: ``strategy=``,
else the one the grid ran with (``extras.json``), else ``grid.extras.DEFAULT_STRATEGY``;
never chosen on the tasks being reported.
"""

from __future__ import annotations

from pathlib import Path

from qvec_jax.grid.extras import (
    DEFAULT_STRATEGY,
    EXTRA_KINDS,
    MIN_MERGE_DONORS,
    fixed_strategy,
    measured_strategies,
    read_extras_settings,
    sized,
)
from qvec_jax.report.merges import merge_metrics, merge_section
from qvec_jax.report.strategies import plot_strategy_heatmap, strategy_metrics, strategy_section
from qvec_jax.select import SelectError, get_strategy

#: The extras' figure, by the name ``write_report`` returns it under.
STRATEGY_FIGURE = "heatmap_delta_strategy"


def _setup(cells: list[dict]) -> dict:
    return next((c.get("setup") or {} for c in cells if c["kind"] == "scores"), {})


def measured_of(cells: list[dict]) -> list:
    """The strategies the ``scores`` cells measured (their proxy sizes from the setup)."""
    setup = _setup(cells)
    return measured_strategies(setup.get("proxy_n", 256), setup.get("rx_shots", (32, 128)))


def one_donor_merges(cells: list[dict]) -> list[dict]:
    """The ``merge``/``scores`` cells of a "merge" of fewer than ``MIN_MERGE_DONORS``
    donors (a 2-task grid's, stored before such cells were refused): not reported."""
    return [
        c for c in cells
        if c["kind"] in EXTRA_KINDS and str(c.get("donor", "")).startswith("loo:")
        and len((c.get("setup") or {}).get("donors") or ()) < MIN_MERGE_DONORS
    ]  # fmt: skip


def _chosen(cells: list[dict], strategies: list, workdir, strategy):
    """The fixed strategy: ``strategy`` (the user's: checked as ``qvec grid`` checks it,
    ``grid.extras.fixed_strategy``), else the grid's own (``extras.json``)."""
    setup = _setup(cells)
    try:
        if strategy:
            return fixed_strategy(strategy, setup.get("pretext"), "report", strategies,
                                  None, setup.get("proxy_n"))  # fmt: skip
        fixed = read_extras_settings(workdir).get("strategy") or DEFAULT_STRATEGY
        return get_strategy(sized(fixed, setup.get("proxy_n")), strategies)
    except SelectError as e:
        raise SelectError(f"{e.args[0]} (the strategies this grid measured)") from None


def extras_metrics(cells: list[dict], metrics: dict, workdir, strategy=None):
    """``{"strategies", "merges"}`` (fractions) from the grid's cells (``metrics``: of its
    main cells), or None if it has no extras cells."""
    if not any(c["kind"] in EXTRA_KINDS for c in cells):
        return None
    strategies = measured_of(cells)
    chosen = _chosen(cells, strategies, workdir, strategy)  # maybe tuned constants
    if chosen.name not in {s.name for s in strategies}:  # tuned: its row below its family's
        at = 1 + next(i for i, s in enumerate(strategies) if s.family == chosen.family)
        strategies = [*strategies[:at], chosen, *strategies[at:]]
    sm = strategy_metrics(cells, metrics, strategies, chosen.name)
    dropped = {id(c) for c in one_donor_merges(cells)}
    kept = [c for c in cells if id(c) not in dropped]
    mm = merge_metrics(kept, metrics, sm, chosen)
    donors = len({c["donor"] for c in cells if c["kind"] == "scores" and ":" not in c["donor"]})
    if not any(str(r["donor"]).startswith("loo:") for r in mm["rows"]):
        mm["note"] = (
            f"No merge rows: a leave-one-out merge needs at least {MIN_MERGE_DONORS} donors "
            f"per receiver, and this grid's receivers have {max(donors - 1, 0)} other donor"
            f"{'s' if donors != 2 else ''} each"
            + (
                f" ({len(dropped)} stored one-donor merge cells are not reported)"
                if dropped
                else ""
            )  # fmt: skip
        )
    return {"strategies": sm, "merges": mm}


def extras_markdown(em: dict | None) -> list[str]:
    """The ``summary.md`` lines of the extras (none without extras)."""
    return [] if em is None else strategy_section(em["strategies"]) + merge_section(em["merges"])


def write_extras_figures(em: dict | None, metrics: dict, meta: dict, out: Path) -> dict:
    """The strategy heatmap (``{name: path}``; nothing without extras)."""
    if em is None:
        return {}
    bits = f"{meta.get('bits', '?')}-bit {meta.get('granularity', '')}".strip()
    path = out / f"{STRATEGY_FIGURE}.png"
    plot_strategy_heatmap(em["strategies"], metrics["tasks"], path, bits)
    return {STRATEGY_FIGURE: path}


def extras_json(em: dict | None) -> dict:
    """The extras for ``summary.json``: rows with per-pair picks as lists."""
    if em is None:
        return {}
    rows = [
        {**{k: v for k, v in r.items() if k != "pairs"},
         "pairs": [{"donor": d, "receiver": rr, **p} for (d, rr), p in r["pairs"].items()]}
        for r in em["strategies"]["rows"]
    ]  # fmt: skip
    sm = {k: v for k, v in em["strategies"].items() if k != "rows"} | {"rows": rows}
    return {"extras": {"strategies": sm, "merges": em["merges"]}}
