"""``qvec study`` end to end on a tiny recipe: it runs, resumes after a kill to the same
``study.json``, refuses bad requests in one line; ``qvec tune`` refuses a test-half study
and any grid holding a test-half view, by view key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_safety import refused, snapshot
from test_report import square_grid

from qvec_jax import data as qdata
from qvec_jax.cli import main
from qvec_jax.data import task_sets
from qvec_jax.study import run

pytestmark = pytest.mark.skipif(
    not qdata.availability("fashion_mnist")[0], reason="a study needs Fashion-MNIST"
)

#: A recipe that trains in seconds: the numbers mean nothing, every stage runs.
TINY = [
    "total_steps=4", "checkpoint_every=2", "optim.warmup_steps=1", "demo.pretext_epochs=0.01",
    "demo.pretext_warmup_steps=1", "demo.proxy_size=8", "demo.gptq_calib_size=8",
]  # fmt: skip
ARGS = ["--half", "dev", "--views", "3", "--eval-n", "64", "--lambdas", "0,1",
        "--gptq-qv-donors", "1", "--bank-lambdas", "1", "--no-progress"]  # fmt: skip


#: The study's processes share JAX's compilation cache: the second and third runs of the
#: same tiny recipe compile nothing (the same programs, so the same numbers).
CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONUNBUFFERED": "1"}


def _qvec(*args, cache: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qvec_jax.cli", "study", *map(str, args), *TINY]
    env = os.environ | CACHE | {"JAX_COMPILATION_CACHE_DIR": str(cache)}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    return out


def _without_times(path: Path) -> dict:
    a = json.loads(path.read_text())
    a.pop("seconds")
    return a


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One whole tiny dev-half study: ``(its workdir, the shared runs dir)``."""
    root = tmp_path_factory.mktemp("study")
    runs = root / "runs"
    out = _finish(_qvec(*ARGS, "--workdir", root / "a", "--runs-dir", runs, cache=root / "jit"))
    assert "study, dev half: 3 views, 6 pairs" in out
    return root / "a", runs


def test_a_study_writes_its_report_and_labels_every_approach(reference):
    workdir, runs = reference
    a = json.loads((workdir / "study.json").read_text())
    assert a["half"] == "dev" and a["tasks"] == task_sets.study_views("dev", 3)
    assert a["n_pairs"] == 6 and a["eval_n"] == 64 and a["warnings"] == []
    keys = {x["key"] for x in a["approaches"]}
    assert {"rtn_qv_1", "rtn_qv_best", "ptq_qat", "loo_mean", "loo_ties", "gptq_noise",
            "gptq_pretext", "gptq_receiver", "gptq_qv", "gptq_bank_mean_noise@1",
            "gptq_bank_ties_pretext@1"} <= keys  # fmt: skip
    q = a["quantize"]  # qvec quantize's candidates against GPTQ(pretext), per receiver
    assert q["reference"] == "gptq_pretext" and q["best"] in q["names"]
    assert {r["key"] for r in q["rows"]} >= {"rtn", "gptq_noise", "gptq_bank_ties_noise@1"}
    assert "## `qvec quantize`: data-free recipes" in (workdir / "study.md").read_text()
    for x in a["approaches"]:
        assert x["data"] and x["unit"] in ("pair", "receiver")
        assert x["win_rate"]["tasks"] <= 3 and 0 <= x["win_rate"]["point"] <= 1
    receiver = next(x for x in a["approaches"] if x["key"] == "gptq_receiver")
    assert not receiver["zero_shot"] and "NOT receiver-free" in receiver["overlap"]
    assert {p["name"] for p in a["paired"]} >= {"lambda_best (receiver val) vs lambda = 1"}
    assert {c["predictor"] for c in a["by_condition"]} >= {"same source", "QV cosine"}
    for name in ("study.md", "study_forest.png", "study_predictors.png"):
        assert (workdir / name).stat().st_size > 0
    # the fine-tunes live under the recipe's fingerprint, shared with other studies
    (fingerprint,) = [p.name for p in runs.iterdir()]
    assert (runs / fingerprint / "pretext" / "params").is_dir()
    # a rerun of the finished study computes nothing and writes the same study.json
    cells = (workdir / "seed-2038" / "grid" / "cells.jsonl").read_bytes()
    _finish(_qvec(*ARGS, "--workdir", workdir, "--runs-dir", runs, cache=workdir.parent / "jit"))
    assert (workdir / "seed-2038" / "grid" / "cells.jsonl").read_bytes() == cells
    assert _without_times(workdir / "study.json") == {k: v for k, v in a.items() if k != "seconds"}


def test_a_study_killed_mid_grid_resumes_to_the_same_study_json(reference, tmp_path):
    workdir, runs = reference
    b = tmp_path / "b"
    cache = workdir.parent / "jit"
    p = _qvec(*ARGS, "--workdir", b, "--runs-dir", runs, cache=cache)
    cells = b / "seed-2038" / "grid" / "cells.jsonl"
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if cells.exists() and len(cells.read_text().splitlines()) >= 5:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the study finished before it could be killed"
    assert not (b / "study.md").exists()
    _finish(_qvec(*ARGS, "--workdir", b, "--runs-dir", runs, cache=cache))
    assert _without_times(b / "study.json") == _without_times(workdir / "study.json")


def test_tune_refuses_a_test_half_study_and_grid_by_view_key(tmp_path, capsys):
    """A test-half view the demo's test sets do not hold, spelled by its registered alias
    where one exists, in a grid labelled custom and in a study workdir."""
    demo_test = {
        task_sets.view_key(n) for n in (*task_sets.draw_test(), *task_sets.draw_fallback_test())
    }
    view = next(n for n in task_sets.halves()["test"] if task_sets.view_key(n) not in demo_test)
    for where in (tmp_path / "grid", tmp_path / "study" / "seed-1" / "grid"):
        square_grid(where, [view, "digits"], meta={"task_set": {"name": "custom", "about": "x"}})
    (tmp_path / "study" / "request.json").write_text(json.dumps({"seeds": [1]}))
    for run_dir in (tmp_path / "grid", tmp_path / "study"):
        before = snapshot(run_dir)
        refused(capsys, run_dir, ["tune", run_dir, "--out", tmp_path / "t"],
                ["TEST half", view, "view key"])  # fmt: skip
        assert snapshot(run_dir) == before and not (tmp_path / "t").exists()
    assert task_sets.half_of(view) == "test" and task_sets.half_of("fmnist_a") == "dev"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--views", "0"], ["--views"]),
        (["--views", "99"], ["--views", "80 views"]),
        (["--lambdas", "0.5,1"], ["--lambdas", "0 and 1"]),
        (["--tuned", "x.json", "--strategy", "rtn-error"], ["--tuned and --strategy"]),
        (["--tuned", "missing.json"], ["--tuned", "missing.json"]),
    ],
)
def test_bad_study_requests_are_refused_in_one_line(tmp_path, capsys, args, words):
    base = ["study", "--half", "test", "--workdir", tmp_path / "w", *args]
    with pytest.raises(SystemExit) if args[:2] == ["--views", "0"] else _no_exit():
        rc = main([str(a) for a in base])
        assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then one line
    assert "error" in err and all(w in err for w in words), err
    assert not (tmp_path / "w").exists()


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_request_from_before_a_spec_key_existed_still_matches(tmp_path):
    """request.json written before ``bank_lambdas`` existed: the key takes its default."""
    spec = run.StudySpec("dev", views=3)
    run._check_workdir(tmp_path, spec, "abc", [1])
    req = json.loads((tmp_path / "request.json").read_text())
    del req["spec"]["bank_lambdas"]
    (tmp_path / "request.json").write_text(json.dumps(req))
    run._check_workdir(tmp_path, spec, "abc", [1])  # the default: the same study
    with pytest.raises(run.StudyError, match="differs in: spec"):
        run._check_workdir(tmp_path, run.StudySpec("dev", views=3, bank_lambdas=(1.0,)), "abc", [1])


def test_a_workdir_holding_another_study_is_refused(reference, capsys):
    workdir, runs = reference
    before = snapshot(workdir)
    rc = main(["study", "--half", "dev", "--views", "4", "--workdir", str(workdir),
               "--runs-dir", str(runs), *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "holds another study" in err and "spec" in err
    assert snapshot(workdir) == before


def test_shards_over_one_workdir_give_the_same_study(reference, tmp_path):
    """Two shards (each its own lock and record file), then the report without --shard:
    the same study.json as one process."""
    workdir, runs = reference
    c, cache = tmp_path / "c", workdir.parent / "jit"
    for shard in ("0/2", "1/2"):
        out = _finish(
            _qvec(*ARGS, "--workdir", c, "--runs-dir", runs, "--shard", shard, cache=cache)
        )
        assert f"shard {shard} done" in out and not (c / "study.md").exists()
    grid = c / "seed-2038" / "grid"
    assert {p.name for p in grid.glob("cells.shard-*.jsonl")} == {
        "cells.shard-0-of-2.jsonl",
        "cells.shard-1-of-2.jsonl",
    }
    _finish(_qvec(*ARGS, "--workdir", c, "--runs-dir", runs, cache=cache))
    assert _without_times(c / "study.json") == _without_times(workdir / "study.json")
