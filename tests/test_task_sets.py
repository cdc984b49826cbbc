"""The demo's task-set protocol (issue 12): the config's sets are the draw, disjoint, parse,
and the test sets' names appear nowhere they could have steered a choice."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from pathlib import Path

import pytest

from qvec_jax import cli, demo
from qvec_jax import report as rp
from qvec_jax.config import load_config
from qvec_jax.data import TASKS, View, derive, get_task, split_task_names
from qvec_jax.data import task_sets as ts

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config(demo.CONFIG).demo
TEST_SETS = {"test_tasks": CFG.test_tasks, "fallback_test_tasks": CFG.fallback_test_tasks}
TEST_NAMES = [n for text in TEST_SETS.values() for n in split_task_names(text)]
TEST_KEYS = {ts.view_key(n): n for n in TEST_NAMES}


def keys(names) -> set:
    return {ts.view_key(n) for n in names}


def test_config_sets_are_the_protocols_draws():
    assert split_task_names(CFG.test_tasks) == ts.draw_test()
    assert split_task_names(CFG.fallback_test_tasks) == ts.draw_fallback_test()
    assert split_task_names(CFG.dev_tasks) == list(ts.DEV)
    assert split_task_names(CFG.fallback_dev_tasks) == list(ts.FALLBACK_DEV)
    # the draw is a function of (pool, seed): recomputed, it gives the same set
    assert ts.draw(ts.pool(), ts.TEST_SEED) == ts.draw_test()


def test_pool_is_the_documented_product_minus_dev_and_skeptic():
    pool = ts.pool()
    # 160 views minus the 2 plain sources, DEV's 4 other views (the 5th is plain digits)
    # and the 5 skeptic views
    assert len(pool) == 2 * 5 * 4 * 2 * 2 - 2 - 4 - len(ts.SKEPTIC) == 149
    assert len(set(pool)) == len(pool)
    assert not any(v.is_identity for _, v in pool)
    pool_keys = keys(ts.view_name(*e) for e in pool)
    assert not pool_keys & keys([*ts.DEV, *ts.SKEPTIC])
    # every non-identity product view not excluded is in the pool, in product order
    product = [
        (s, View(classes=c, rot90=r, hflip=f, invert=i))
        for s, c, r, f, i in itertools.product(
            ts.SOURCES, ts.CLASS_SETS, range(4), (False, True), (False, True)
        )
    ]
    assert pool == [e for e in product if e in set(pool)]


def test_no_test_task_is_in_a_set_used_for_choices():
    used = {  # choices are made on these, or their numbers were seen (skeptic)
        "dev": ts.DEV,
        "dev_extra": ts.draw_dev_extra(),
        "fallback_dev": ts.FALLBACK_DEV,
        "skeptic": ts.SKEPTIC,
    }
    tests = {"test": ts.draw_test(), "fallback_test": ts.draw_fallback_test()}
    for (a, na), (b, nb) in itertools.product(tests.items(), used.items()):
        assert not keys(na) & keys(nb), (a, b)
    assert not keys(ts.DEV) & keys(ts.draw_dev_extra())
    for name, names in {**used, **tests}.items():
        assert len(keys(names)) == len(names), name  # no task twice under two names


def test_each_test_task_parses_to_its_view_with_one_spelling():
    for name in TEST_NAMES:
        task = get_task(name)
        src = name.partition("@")[0]
        assert task.name == name and task.sources == get_task(src).sources
        assert ts.view_name(src, task.view) == name  # the canonical spelling
        assert task.num_classes == len(task.view.classes or range(10))
    test = ts.draw_test()
    assert sum(n.startswith("fashion_mnist@") for n in test) >= 2
    assert sum(n.startswith("digits@") for n in test) >= 2
    assert all(n.startswith("digits@") for n in ts.draw_fallback_test())


def test_draw_keeps_its_constraints_and_refuses_impossible_ones():
    pool = ts.pool()
    for seed in range(20):
        names = ts.draw(pool, seed)
        assert len(set(names)) == ts.SET_SIZE
        assert sum(n.startswith("fashion_mnist@") for n in names) >= 2
        assert sum(n.startswith("digits@") for n in names) >= 2
        assert ts.draw(pool, seed) == names
    digits = [e for e in pool if e[0] == "digits"]
    with pytest.raises(ValueError, match="fashion_mnist"):
        ts.draw(digits, 0)


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no tracked files to search")
    return [p for p in out.split("\0") if p]


def _readme_outside_results(text: str) -> str:
    """README.md without its "## Demo results" section (the numbers may name the tasks)."""
    return re.sub(r"\n## Demo results\n.*?(?=\n## |\Z)", "\n", text, flags=re.S)


VIEW_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*@[A-Za-z0-9_=,]+")
ALLOWED = {
    "configs/demo_tiny.py",
    "qvec_jax/data/task_sets.py",
    "tests/test_task_sets.py",
    "docs/results.md",  # the measured results name the tasks they were measured on
}


def _test_views_named_in(text: str) -> set[str]:
    """The test tasks that ``text`` names, by their name or by any view spelling of the
    same task (``digits_a@hflip`` is ``digits@classes=0,1,2,3,4,hflip``)."""
    found = set()
    for token in VIEW_TOKEN.findall(text):
        for name in split_task_names(token.strip(",")):
            try:
                key = ts.view_key(name)
            except (KeyError, ValueError):
                continue  # not a task view (an e-mail address, a decorator, ...)
            if key in TEST_KEYS:
                found.add(TEST_KEYS[key])
    return found


def test_test_set_names_appear_only_in_the_config():
    """No tracked file outside the allow-list names a test task (the main or the
    digits-only fallback set), literally or by another spelling of its view; no registered
    task is one of them under another name; and inside the config, only
    ``demo.test_tasks``/``demo.fallback_test_tasks`` name them.

    Allow-list: configs/demo_tiny.py (the sets), qvec_jax/data/task_sets.py (the draw),
    this file, docs/results.md and README.md's "Demo results" section (the reported
    numbers).

    What this guarantees: no code, config constant, test, notebook, benchmark or doc
    (other than the results) refers to a test task, so no committed constant was set by
    running or evaluating one of them through this repository's files. What it cannot
    guarantee: that nobody looked at test-set numbers (a run in an untracked folder, a
    notebook cleared before commit, a person's memory) and chose a constant from them;
    nor does it catch a test view written another way (``derive("digits", classes=...)``,
    prose like "digits 0-4 mirrored"). The protocol (test drawn once, results reported
    from one run after the choices were frozen) covers those; this test catches the
    mechanical leaks.
    """
    leaks = {}
    for path in _tracked_files():
        if path in ALLOWED or not (ROOT / path).is_file():
            continue
        text = (ROOT / path).read_text(errors="ignore")
        if path == "README.md":
            text = _readme_outside_results(text)
        if found := _test_views_named_in(text):
            leaks[path] = sorted(found)
    assert not leaks, f"test tasks named outside the allow-list: {leaks}"
    aliases = [n for n in TASKS if ts.view_key(n) in TEST_KEYS]
    assert not aliases, f"registered tasks that are test tasks under another name: {aliases}"
    config = load_config(demo.CONFIG).to_dict()
    config["demo"] = {k: v for k, v in config["demo"].items() if k not in TEST_SETS}
    assert not _test_views_named_in(json.dumps(config, default=str))


def test_leak_check_sees_other_spellings(monkeypatch):
    """The check above is not vacuous: it sees a test task by its name and through an
    alias that composes to the same view."""
    assert _test_views_named_in("fmnist_a@rot90=2 user@example.com digits@classes=1") == set()
    for name in TEST_NAMES:
        assert _test_views_named_in(f"run `qvec finetune --task {name}`") == {name}
        src, v = name.partition("@")[0], get_task(name).view
        rest = View(rot90=v.rot90, hflip=v.hflip, invert=v.invert)
        if v.classes is None or rest.is_identity:
            continue
        monkeypatch.setitem(TASKS, "leak_probe", derive(src, "leak_probe", classes=v.classes))
        assert _test_views_named_in(f"tasks = '{ts.view_name('leak_probe', rest)},x'") == {name}
        assert ts.view_key("leak_probe") not in TEST_KEYS


# ----------------------------------------------------------------------------- demo and report


def test_demo_runs_on_test_by_default_and_names_each_set():
    cfg = demo._load((), quick=False)
    chosen = demo.choose_tasks(cfg)
    assert chosen.task_set == {
        "name": "test",
        "about": "fixed in configs/demo_tiny.py, never used for choices",
    }
    assert chosen.tasks in (TEST_NAMES[: len(ts.draw_test())], ts.draw_fallback_test())
    dev = demo.choose_tasks(cfg, "dev")
    assert dev.task_set["name"] == "dev" and not keys(dev.tasks) & set(TEST_KEYS)
    custom = demo.choose_tasks(cfg, "digits,digits_inv")
    assert (custom.tasks, custom.task_set["name"]) == (["digits", "digits_inv"], "custom")
    quick = demo.choose_tasks(demo._load((), quick=True), "quick")
    assert quick.task_set["name"] == "quick" and not keys(quick.tasks) & set(TEST_KEYS)
    # a set overridden on the command line is no longer the fixed set, and says so
    moved = demo.choose_tasks(demo._load(["demo.dev_tasks=digits"], quick=False), "dev")
    assert moved.task_set["name"] == "custom" and "demo.dev_tasks" in moved.task_set["about"]


def test_without_the_pretext_the_set_falls_back_to_its_digits_only_twin():
    cfg = load_config(demo.CONFIG, ["demo.pretext_task=cifar10"])  # not prepared here
    for which in ("test", "dev"):
        chosen = demo.choose_tasks(cfg, which)
        assert chosen.tasks == split_task_names(cfg.demo[f"fallback_{which}_tasks"])
        assert chosen.pretext == cfg.demo.fallback_pretext_task
        assert chosen.task_set["name"] == which and "digits-only" in chosen.task_set["about"]
        assert "cifar10" in chosen.note


def test_demo_rejects_an_unknown_task_before_training(tmp_path, capsys):
    assert cli.main(["demo", "--tasks", "nosuch_task", "--workdir", str(tmp_path / "d")]) != 0
    assert "nosuch_task" in capsys.readouterr().err
    assert not (tmp_path / "d" / "pretext").exists()


def _hand_grid(path: Path) -> None:
    cells = [
        {"kind": k, "receiver": r, "donor": None, "lam": None, "acc": {"val": v, "test": v}}
        for r in ("a", "b")
        for k, v in (("fp", 0.9), ("ptq_fp", 0.5), ("ptq_qat", 0.8))
    ]
    cells += [
        {"kind": "patch", "donor": d, "receiver": r, "lam": 1.0, "acc": {"val": 0.6, "test": 0.6}}
        for d in ("a", "b")
        for r in ("a", "b")
    ]
    path.mkdir(parents=True)
    (path / rp.CELLS_FILE).write_text("".join(json.dumps(c) + "\n" for c in cells))
    meta = {"tasks": ["a", "b"], "lambdas": [1.0], "bits": 2, "granularity": "channel"}
    (path / rp.GRID_META_FILE).write_text(json.dumps(meta))


def test_report_names_the_set_and_is_unchanged_without_one(tmp_path):
    _hand_grid(tmp_path / "g")
    plain = rp.write_report(tmp_path / "g", extras=False)["summary"]
    label = {"name": "test", "about": "fixed in configs/demo_tiny.py, never used for choices"}
    demo.label_grid(tmp_path / "g", label)
    named = rp.write_report(tmp_path / "g", extras=False)["summary"]
    line = "Task set: **test** (fixed in configs/demo_tiny.py, never used for choices)."
    assert line in named.splitlines()
    assert named.replace(line + "\n", "", 1) == plain  # only that line differs
    assert rp.load_grid_meta(tmp_path / "g")["task_set"] == label
