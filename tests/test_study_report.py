"""``qvec study``'s report (issue 21) on a hand-made analysis: files, json, markdown text."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from qvec_jax.report.study import study_markdown, write_study_report

TASKS = [f"view_{i}" for i in range(16)]


def iv(point, lo, hi, n=240, tasks=16, b=2000):
    return {"point": point, "lo": lo, "hi": hi, "n": n, "tasks": tasks, "b": b}


def approach(key, name, data, zero_shot, delta, unit="pair"):
    n = 240 if unit == "pair" else 16
    return {
        "key": key,
        "name": name,
        "data": data,
        "unit": unit,
        "overlap": "0 images",
        "zero_shot": zero_shot,
        "n": n,
        "win_rate": iv(0.5 + delta, 0.4 + delta, 0.6 + delta, n),
        "mean_delta": iv(delta, delta - 0.02, delta + 0.02, n),
        "mean_acc": iv(0.6 + delta, 0.55 + delta, 0.65 + delta, n),
    }


def approaches() -> list[dict]:
    out = [
        approach("lam1", "PTQ(FP_R + QV_D), lambda=1", "donor", True, 0.1),
        approach("choice", "the choice (norm-ratio)", "donor QAT + pretext", True, 0.05),
        approach("merge", "merge of the other donors | TIES", "donor", True, -0.01, "receiver"),
        approach("best", "lambda_best (receiver val)", "labelled receiver", False, 0.12),
        approach("gptq", "GPTQ(FP_R)", "unlabelled receiver", False, 0.2, "receiver"),
        approach("zero", "PTQ(FP_R + 0.5 QV_D)", "none", True, 0.0),
    ]
    out[1]["overlap"] = "fmnist_a: 124 train / 14 val / 0 test"
    # a known interval: +1.2 [-0.3, +2.8] points, 62% [51, 72]
    out[0]["mean_delta"] = iv(0.0123, -0.003, 0.028)
    out[0]["win_rate"] = iv(0.62, 0.51, 0.72)
    out[5]["mean_delta"] = iv(None, None, None, n=0, tasks=0)  # nothing measured
    return out


def paired(name, a, b, n, diff, wins) -> dict:
    return {"name": name, "a": a, "b": b, "n": n, "mean_diff": diff, "a_wins": wins}


def condition(predictor, group, n, win_rate, mean_delta) -> dict:
    return {"predictor": predictor, "group": group, "n": n, "win_rate": win_rate,
            "mean_delta": mean_delta}  # fmt: skip


def draws() -> dict:
    rates = np.random.default_rng(0).uniform(0.3, 1.0, 100).round(2).tolist()
    return {
        "k": 5,
        "approach": "lam1",
        "n_draws": 100,
        "rates": rates,
        "frac_ge_75": float(np.mean(np.array(rates) >= 0.75)),
        "median": float(np.median(rates)),
        "p05": float(np.percentile(rates, 5)),
        "p95": float(np.percentile(rates, 95)),
    }


SEED_SPREAD = {
    "approach": "lam1",
    "per_seed": [
        {"seed": 0, "win_rate": 0.6, "mean_delta": 0.011, "n": 240},
        {"seed": 1, "win_rate": 0.64, "mean_delta": 0.0136, "n": 240},
    ],
    "sd_win_rate": 0.028,
    "sd_mean_delta": 0.0018,
}


def analysis(seed_spread=False) -> dict:
    """Six approaches, two paired rows, 100 draws, four by-condition rows (two predictors,
    interleaved); ``seed_spread``: with the per-seed spread of two seeds."""
    return {
        "half": "test",
        "tasks": TASKS,
        "seeds": [0, 1],
        "n_pairs": 240,
        "eval_n": 500,
        "eval_note": "500 images per split add about +-2.2 pts of binomial error per pair.",
        "lambdas": [0.0, 0.25, 0.5, 1.0, 1.5],
        "strategy": "norm-ratio(multiple=0.75)",
        "strategy_source": "qvec tune on the dev-half study (tune.json)",
        "baseline": {"name": "RTN(FP_R)", "data": "none", "mean_acc": iv(0.5, 0.45, 0.55, 16)},
        "approaches": approaches(),
        "paired": [
            paired(
                "choice vs lam=1", "choice", "lam1", 240, iv(-0.05, -0.07, -0.03), iv(0.3, 0.2, 0.4)
            ),
            paired(
                "lam=1 vs GPTQ",
                "lam1",
                "gptq",
                16,
                iv(-0.1, None, None, 16),
                iv(0.25, 0.1, 0.4, 16),
            ),
        ],  # fmt: skip
        "draws": draws(),
        "seed_spread": copy.deepcopy(SEED_SPREAD) if seed_spread else None,
        "by_condition": [
            condition("QV cosine", "high", 120, iv(0.7, 0.6, 0.8), iv(0.02, 0.01, 0.03)),
            condition("same dataset", "yes", 30, iv(0.8, 0.6, 0.9), iv(0.04, 0.0, 0.07)),
            condition("QV cosine", "low", 120, iv(0.5, 0.4, 0.6), iv(0.0, -0.01, 0.01)),
            condition("same dataset", "no", 210, iv(0.6, None, None), iv(None, None, None)),
        ],
        "conditions_approach": "lam1",
        "per_seed": True,
        "warnings": ["TEST HALF: never choose anything on these numbers"],
        "seconds": {"finetune": 3600.0, "grid": 1200.5},
    }


def test_files_and_json_round_trip(tmp_path):
    a = analysis(seed_spread=True)
    paths = write_study_report(a, tmp_path / "out")
    assert set(paths) == {
        "study_md",
        "study_json",
        "study_forest",
        "study_draws",
        "study_predictors",
    }
    for name, path in paths.items():
        assert path.is_file() and path.parent == tmp_path / "out", name
        if path.suffix == ".png":
            assert path.read_bytes()[:4] == b"\x89PNG"
    text = paths["study_json"].read_text()
    assert text.endswith("}\n")
    assert json.loads(text) == json.loads(json.dumps(a, default=str))
    assert paths["study_md"].read_text() == study_markdown(a)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temps


def test_markdown_content():
    a = analysis()
    md = study_markdown(a)
    assert md.startswith("# qvec study: TEST half (16 views)")
    for p in a["approaches"]:
        assert p["name"].replace("|", "\\|") in md
        assert f"| {p['data']} |" in md
    assert "fmnist_a: 124 train / 14 val / 0 test" in md
    # the known interval, computed from its fractions
    d = a["approaches"][0]["mean_delta"]
    expected = f"{100 * d['point']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
    assert expected == "+1.2 [-0.3, +2.8]" and expected in md
    assert "62% [51, 72]" in md
    first_table = md.index("\n|")
    assert md.index("TEST HALF: never choose anything") < first_table
    assert "Every interval: 95%, bootstrap over tasks" in md and "B=2000" in md
    assert "norm-ratio(multiple=0.75)" in md and "tune.json" in md
    assert "| RTN(FP_R) (baseline) |" in md and "50.0 [45.0, 55.0]" in md
    # None: a whole interval, and bounds of a known point
    zero_row = next(ln for ln in md.splitlines() if ln.startswith("| PTQ(FP_R + 0.5 QV_D)"))
    assert "| n/a |" in zero_row
    assert "-10.0 [n/a, n/a]" in md and "60% [n/a, n/a]" in md
    # draws, predictors grouped, no seed table with seed_spread None, figure links
    assert f">= 75% in **{100 * a['draws']['frac_ge_75']:.0f}%**" in md
    assert "76.6%" in md
    rows = [ln for ln in md.split("## When does it help?")[1].splitlines() if ln.startswith("| ")]
    assert [r.split(" | ")[1] for r in rows[1:]] == ["high", "low", "yes", "no"]
    assert "Spread over fine-tune seeds" not in md
    assert "](study_draws.png)" in md and "](study_predictors.png)" in md


def test_seed_spread_rendered():
    md = study_markdown(analysis(seed_spread=True))
    section = md.split("## Spread over fine-tune seeds")[1]
    assert "| 1 | 240 | 64% | +1.4 |" in section
    assert "win rate 2.8 pts" in section


def test_missing_draws_and_conditions_skip_figures(tmp_path):
    a = analysis()
    a["draws"], a["by_condition"], a["seconds"] = None, [], None
    paths = write_study_report(a, tmp_path)
    assert set(paths) == {"study_md", "study_json", "study_forest"}
    assert not (tmp_path / "study_draws.png").exists()
    assert not (tmp_path / "study_predictors.png").exists()
    md = paths["study_md"].read_text()
    assert "study_draws.png" not in md and "When does it help?" not in md


def test_bad_input_names_what_is_missing(tmp_path):
    a = analysis()
    del a["approaches"]
    with pytest.raises(ValueError, match="approaches"):
        study_markdown(a)
    with pytest.raises(ValueError, match="approaches"):
        write_study_report(a, tmp_path / "never")
    assert not (tmp_path / "never").exists()
