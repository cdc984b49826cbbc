"""The transfer grid on tiny random ViT checkpoints (no training): cells, resume,
missing checkpoints, backbone checks and compile count."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import qvec_jax as q
from qvec_jax import checkpoints, evaluate, grid
from qvec_jax import data as qdata
from qvec_jax import report as rp
from qvec_jax.grid import cells
from qvec_jax.grid.inputs import checkpoint_path
from qvec_jax.models import vit

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("digits", "digits_rot90", "digits_a")
NUM_CLASSES = {"digits": 10, "digits_rot90": 10, "digits_a": 5, "digits_b": 5}
LAMBDAS = (0.5, 1.0)


def make_runs(runs, tasks=TASKS, *, variant="test/4", seed=0, noise_seed=None, modes=("fp", "qat")):
    """FP and QAT checkpoints laid out as ``qvec finetune`` writes them: a random backbone
    (from ``seed``), a fresh head per task, FP = backbone + small noise, QAT = FP + noise."""
    rng = np.random.default_rng(seed if noise_seed is None else noise_seed)
    backbone = _backbone(variant, seed)
    for t in tasks:
        width = backbone["head"]["kernel"].shape[0]
        head_rng = np.random.default_rng(len(t))
        head = {
            "kernel": 0.02 * head_rng.standard_normal((width, NUM_CLASSES[t]), np.float32),
            "bias": np.zeros(NUM_CLASSES[t], np.float32),
        }
        params = {**backbone, "head": head}
        bid = checkpoints.backbone_id(params)
        fp = jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), params)
        qat = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), fp)
        for mode, tree in (("fp", fp), ("qat", qat)):
            if mode not in modes:
                continue
            meta = {
                "variant": variant,
                "num_classes": NUM_CLASSES[t],
                "image_size": 28,
                "task": t,
                "mode": mode,
                "bits": 2,
                "granularity": "channel",
                "backbone_id": bid,
                "config": {"task": t, "mode": mode, "seed": 1},
            }
            checkpoints.save_params(checkpoint_path(runs, t, mode), tree, meta)
    return runs


@functools.cache
def _init(variant):
    model = vit.create_model(variant, num_classes=10, image_size=28)
    return jax.tree.map(np.asarray, vit.init_params(model, 0))


def _backbone(variant, seed):
    """One init per variant (compiling an init is slow); other seeds add noise to it."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + (0.05 * rng.standard_normal(x.shape).astype(x.dtype) if seed else 0),
        _init(variant),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("runs"))


def make_grid(runs, workdir, tasks=TASKS, lambdas=LAMBDAS, **kw):
    kw = {"bits": 2, "lambdas": lambdas, "batch_size": 64, "progress": False, **kw}
    return grid.run_grid(list(tasks), runs, workdir, **kw)


def n_expected(n_tasks, n_lams):
    return n_tasks * 3 + n_tasks * n_tasks * n_lams


def test_grid_cells_match_direct_evaluation(runs, tmp_path):
    from qvec_jax import data
    from qvec_jax.evaluate import accuracy

    cells = make_grid(runs, tmp_path, tasks=TASKS[:2])
    assert len(cells) == n_expected(2, 2)
    by = {rp.cell_key(c): c for c in cells}
    # an independent computation of two cells, with the eager public API
    r, d = "digits_rot90", "digits"
    fp, meta = checkpoints.restore_params(checkpoint_path(runs, r, "fp"))
    fp_d, _ = checkpoints.restore_params(checkpoint_path(runs, d, "fp"))
    qat_d, _ = checkpoints.restore_params(checkpoint_path(runs, d, "qat"))
    model = checkpoints.model_from_meta(meta)
    test = data.load_split(r, "test", image_size=28)
    qv = q.quantization_vector(qat_d, fp_d)
    assert "head" not in qv
    patched = q.ptq(q.patch(fp, qv, 0.5), 2)
    cell = by[("patch", d, r, rp.lam_key(0.5))]
    assert cell["acc"]["test"] == pytest.approx(accuracy(model, patched, test), abs=1e-9)
    assert cell["n"]["test"] == len(test)
    base = by[("ptq_fp", "", r, "")]
    assert base["acc"]["test"] == pytest.approx(accuracy(model, q.ptq(fp, 2), test), abs=1e-9)
    assert by[("fp", "", r, "")]["acc"]["test"] == pytest.approx(accuracy(model, fp, test))
    meta = rp.load_grid_meta(tmp_path)
    assert meta["bits"] == 2 and meta["lambdas"] == [0.5, 1.0] and meta["missing"] == []


def test_resume_computes_only_missing_cells(runs, tmp_path):
    full = make_grid(runs, tmp_path / "full", tasks=TASKS[:2])
    # a partially computed grid: keep the first 5 records, plus a torn last line
    part = tmp_path / "part"
    part.mkdir()
    lines = (tmp_path / "full" / rp.CELLS_FILE).read_text().splitlines()
    (part / rp.CELLS_FILE).write_text("\n".join(lines[:5]) + '\n{"kind": "pat')
    before = {rp.cell_key(c): c for c in rp.load_cells(part)}
    cells = make_grid(runs, part, tasks=TASKS[:2])
    assert len(cells) == len(full)
    records = [json.loads(x) for x in (part / rp.CELLS_FILE).read_text().splitlines()[:5]]
    assert [rp.cell_key(c) for c in records] == list(before)
    appended = (part / rp.CELLS_FILE).read_text().splitlines()[5:]  # torn line dropped
    assert len(appended) == len(full) - 5  # only the missing cells were computed
    assert not {rp.cell_key(json.loads(x)) for x in appended} & set(before)
    ref = {rp.cell_key(c): c["acc"] for c in full}
    assert all(ref[rp.cell_key(c)] == c["acc"] for c in cells)

    # adding a task and a lambda computes only the new cells
    cells = make_grid(runs, part, tasks=TASKS, lambdas=(0.5, 1.0, 1.5))
    n_new = len((part / rp.CELLS_FILE).read_text().splitlines()) - len(lines)
    assert len(cells) == n_expected(3, 3)
    assert n_new == n_expected(3, 3) - n_expected(2, 2)

    # a rerun with nothing new computes nothing
    size = (part / rp.CELLS_FILE).stat().st_size
    make_grid(runs, part, tasks=TASKS, lambdas=(0.5, 1.0, 1.5))
    assert (part / rp.CELLS_FILE).stat().st_size == size


def test_changed_checkpoint_recomputes_its_cells(tmp_path):
    runs = make_runs(tmp_path / "runs", TASKS[:2])
    make_grid(runs, tmp_path / "g", tasks=TASKS[:2], lambdas=(1.0,))
    n0 = len((tmp_path / "g" / rp.CELLS_FILE).read_text().splitlines())
    make_runs(runs, ("digits",), noise_seed=3, modes=("qat",))  # digits' QAT is fine-tuned again
    make_grid(runs, tmp_path / "g", tasks=TASKS[:2], lambdas=(1.0,))
    new = [json.loads(x) for x in (tmp_path / "g" / rp.CELLS_FILE).read_text().splitlines()[n0:]]
    # cells that use QAT_digits: PTQ(QAT) of digits and the two patch cells with donor digits
    assert sorted(rp.cell_key(c) for c in new) == sorted(
        [
            ("ptq_qat", "", "digits", ""),
            ("patch", "digits", "digits", "1"),
            ("patch", "digits", "digits_rot90", "1"),
        ]
    )


def test_missing_checkpoints_are_listed_and_fail_unless_allowed(tmp_path):
    runs = make_runs(tmp_path / "runs", TASKS[:2])
    make_runs(runs, ("digits_a",), modes=("fp",))  # digits_a has no QAT: receiver only
    tasks = [*TASKS, "digits_b"]  # digits_b: nothing at all
    with pytest.raises(grid.MissingCheckpoints) as e:
        make_grid(runs, tmp_path / "g", tasks=tasks, lambdas=(1.0,))
    msg = str(e.value)
    assert "digits_a/qat" in msg and "digits_b/fp" in msg and "digits_b/qat" in msg
    assert "--allow-missing" in msg
    missing = {(m["task"], m["mode"]) for m in e.value.missing}
    assert missing == {("digits_a", "qat"), ("digits_b", "fp"), ("digits_b", "qat")}
    # the available cells were computed: 3 receivers x 2 donors, baselines, no PTQ(QAT_a)
    keys = {rp.cell_key(c) for c in e.value.cells}
    assert len(keys) == 3 * 2 + 2 + 3 * 2
    assert ("ptq_fp", "", "digits_a", "") in keys and ("ptq_qat", "", "digits_a", "") not in keys
    assert not any("digits_b" in k or k[1] == "digits_a" for k in keys)

    cells = make_grid(runs, tmp_path / "g", tasks=tasks, lambdas=(1.0,), allow_missing=True)
    assert {rp.cell_key(c) for c in cells} == keys
    out = rp.write_report(tmp_path / "g")
    assert "`digits_b` fp" in out["summary"] and "`digits_a` qat" in out["summary"]
    assert "incomplete" in out["summary"]


def test_mismatched_backbones_are_refused(tmp_path):
    runs = make_runs(tmp_path / "runs", TASKS[:2])
    make_runs(runs, ("digits_a",), seed=5)  # another random backbone
    with pytest.raises(grid.GridError, match="backbone_id=.*digits_a/fp"):
        make_grid(runs, tmp_path / "g", tasks=TASKS)
    assert not (tmp_path / "g" / rp.CELLS_FILE).exists()


def test_same_id_different_tree_names_tasks_and_path(tmp_path):
    runs = make_runs(tmp_path / "runs", ("digits", "digits_rot90"))
    # digits_rot90: same meta (backbone_id included), but one backbone leaf has another shape
    bad = "Transformer/encoderblock_1/MlpBlock_3/Dense_0"
    for mode in ("fp", "qat"):
        path = checkpoint_path(runs, "digits_rot90", mode)
        params, meta = checkpoints.restore_params(path)
        flat = q.flatten(params)
        flat[bad + "/kernel"] = flat[bad + "/kernel"][:, :48]
        flat[bad + "/bias"] = flat[bad + "/bias"][:48]
        checkpoints.save_params(path, q.unflatten(flat), meta)
    with pytest.raises(grid.GridError, match=rf"digits_rot90/\w+ and digits/fp .* at {bad}/"):
        make_grid(runs, tmp_path / "g", tasks=["digits", "digits_rot90"], lambdas=(1.0,))


def test_fp_and_qat_recipes_must_match(tmp_path):
    runs = make_runs(tmp_path / "runs", ("digits",))
    p = checkpoints.meta_file(checkpoint_path(runs, "digits", "qat"))
    meta = json.loads(p.read_text())
    meta["config"]["seed"] = 2
    p.write_text(json.dumps(meta))
    with pytest.raises(grid.GridError, match="digits: FP .* differs in seed"):
        make_grid(runs, tmp_path / "g", tasks=["digits"], lambdas=(1.0,))
    fp_seed = json.loads(checkpoints.meta_file(checkpoint_path(runs, "digits", "fp")).read_text())
    meta["config"]["seed"] = fp_seed["config"]["seed"]
    meta["config"]["demo"] = {"select_strategy": "lam=1"}  # the demo's section: not a recipe
    p.write_text(json.dumps(meta))
    make_grid(runs, tmp_path / "g2", tasks=["digits"], lambdas=(1.0,))


def test_recipes_differing_between_tasks_are_a_listed_warning(tmp_path):
    runs = make_runs(tmp_path / "runs", TASKS[:2])
    for mode in ("fp", "qat"):
        p = checkpoints.meta_file(checkpoint_path(runs, "digits_rot90", mode))
        meta = json.loads(p.read_text())
        meta["config"]["seed"] = 7  # both runs of the task agree, but not with digits
        p.write_text(json.dumps(meta))
    make_grid(runs, tmp_path / "g", tasks=TASKS[:2], lambdas=(1.0,))
    (warning,) = rp.load_grid_meta(tmp_path / "g")["warnings"]
    assert "task digits_rot90" in warning and "seed" in warning
    assert warning in rp.write_report(tmp_path / "g")["summary"]


def test_other_bits_in_same_workdir_is_refused(runs, tmp_path):
    make_grid(runs, tmp_path, tasks=TASKS[:1], lambdas=(1.0,))
    with pytest.raises(grid.GridError, match="2-bit channel"):
        make_grid(runs, tmp_path, tasks=TASKS[:1], lambdas=(1.0,), bits=3)


# ----------------------------------------------------------------------------- CLI


def qvec(*argv):
    from qvec_jax import cli

    return cli.main([str(a) for a in argv])


def test_cli_extract_patch_ptq_eval_round_trip(runs, tmp_path, capsys):
    fp, qat = (checkpoint_path(runs, "digits", m) for m in ("fp", "qat"))
    rfp = checkpoint_path(runs, "digits_rot90", "fp")
    assert qvec("extract", qat, fp, tmp_path / "qv") == 0
    qv, meta = checkpoints.restore_params(tmp_path / "qv")
    assert meta["kind"] == "qv" and meta["task"] == "digits" and "head" not in qv
    ref = q.quantization_vector(
        checkpoints.restore_params(qat)[0], checkpoints.restore_params(fp)[0]
    )
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(qv), jax.tree.leaves(ref)))

    assert qvec("patch", rfp, tmp_path / "qv", "--lam", "0.5", tmp_path / "patched") == 0
    patched, pmeta = checkpoints.restore_params(tmp_path / "patched")
    assert pmeta["patch"]["lam"] == 0.5 and pmeta["patch"]["donor"] == "digits"
    assert pmeta["task"] == "digits_rot90"
    expect = q.patch(checkpoints.restore_params(rfp)[0], qv, 0.5)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(patched), jax.tree.leaves(expect))
    )

    assert qvec("ptq", tmp_path / "patched", "--bits", "2", tmp_path / "w2") == 0
    w2, wmeta = checkpoints.restore_params(tmp_path / "w2")
    assert wmeta["ptq"] == {"bits": 2, "granularity": "channel"}
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(w2), jax.tree.leaves(q.ptq(patched, 2)))
    )

    capsys.readouterr()
    assert qvec("eval", tmp_path / "w2", "--splits", "test", "--batch-size", "64") == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same number as the grid's cell for (D=digits, R=digits_rot90, lam=0.5)
    cells = make_grid(runs, tmp_path / "g", tasks=TASKS[:2], lambdas=(0.5,))
    cell = next(c for c in cells if rp.cell_key(c) == ("patch", "digits", "digits_rot90", "0.5"))
    assert res["task"] == "digits_rot90" and res["test"] == pytest.approx(cell["acc"]["test"])


def test_cli_refuses_to_overwrite_inputs(runs, tmp_path, capsys):
    fp, qat = (checkpoint_path(runs, "digits", m) for m in ("fp", "qat"))
    before = sorted(p.name for p in fp.iterdir())
    assert qvec("ptq", fp, "--bits", "2", fp) == 1
    assert qvec("ptq", fp, "--bits", "2", fp / "inside") == 1
    assert qvec("extract", qat, fp, fp.parent) == 1  # OUT contains an input
    err = capsys.readouterr().err
    assert "would overwrite input" in err and str(fp) in err
    assert sorted(p.name for p in fp.iterdir()) == before
    (tmp_path / "exists").mkdir()
    assert qvec("ptq", fp, "--bits", "2", tmp_path / "exists") == 1
    assert "already exists" in capsys.readouterr().err
    # wrong argument order and wrong kinds get a message, not a traceback
    assert qvec("extract", fp, qat, tmp_path / "x") == 1
    assert "order is QAT FP" in capsys.readouterr().err
    assert qvec("patch", fp, qat, tmp_path / "y") == 1
    assert "not a quantization vector" in capsys.readouterr().err
    assert qvec("ptq", tmp_path / "nope", "--bits", "2", tmp_path / "z") == 1
    assert "no such checkpoint" in capsys.readouterr().err


def test_cli_grid_and_report(tmp_path, capsys):
    runs = make_runs(tmp_path / "runs", ("digits", "digits_rot90"))
    work = tmp_path / "grid"
    argv = [
        "grid",
        "--tasks",
        "digits,digits_rot90,digits_a",
        "--runs",
        runs,
        "--workdir",
        work,
        "--bits",
        "2",
        "--lambdas",
        "0.5",
        "--batch-size",
        "64",
        "--no-progress",
    ]
    assert qvec(*argv) == 1  # digits_a has no checkpoints
    captured = capsys.readouterr()
    assert "digits_a/fp" in captured.err and "--allow-missing" in captured.err
    summary = (work / "summary.md").read_text()
    assert "`digits_a` fp" in summary and "`digits_a` qat" in summary
    assert rp.load_grid_meta(work)["lambdas"] == [0.5, 1.0]  # lambda=1 always added
    # the bit width and eval batch can come from a config file instead
    argv = [a for a in argv if a not in ("--bits", "2")]
    assert qvec(*argv, "--config", ROOT / "configs" / "demo_tiny.py", "--allow-missing") == 0
    out = capsys.readouterr().out
    assert rp.ZERO_SHOT in out and "summary_md" in out

    for f in work.glob("*.png"):
        f.unlink()
    (work / "grid.csv").unlink()
    assert qvec("report", work) == 0
    for name in (
        "grid.csv",
        "summary.md",
        "summary.json",
        "heatmap_delta_lambda1.png",
        "heatmap_delta_lambda_best.png",
        "heatmap_recovery.png",
        "lambda_curves.png",
    ):
        assert (work / name).stat().st_size > 0, name
    assert qvec("report", tmp_path / "runs") == 1
    assert "qvec grid" in capsys.readouterr().err


def test_every_subcommand_help_has_an_example(capsys):
    for cmd in ("extract", "patch", "ptq", "eval", "grid", "report"):
        with pytest.raises(SystemExit) as e:
            qvec(cmd, "--help")
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "example:" in text and f"qvec {cmd} " in text, cmd


@pytest.mark.slow  # clears the jit caches, so it recompiles everything it runs
def test_grid_compiles_once_per_model_shape_not_per_cell(runs, tmp_path):
    jitted = (grid.patch_and_quantize, cells.ptq_selected, evaluate.count_correct)
    two = ["digits", "digits_rot90"]  # same model shape (10 classes)
    jax.clear_caches()
    # the per-cell path (tests/test_grid_batched.py counts the batched path's compiles)
    one = {"cell_group": 1}
    small = _count_compiles(
        lambda: make_grid(runs, tmp_path / "a", tasks=two, lambdas=(1.0,), **one)
    )
    assert small > 0 and all(fn._cache_size() == 1 for fn in jitted)
    lambdas = (0.3, 0.6, 1.0, 1.2, 1.5)
    large = _count_compiles(
        lambda: make_grid(runs, tmp_path / "b", tasks=two, lambdas=lambdas, **one)
    )
    assert len(rp.load_cells(tmp_path / "b")) == n_expected(2, 5) > 2 * n_expected(2, 1)
    assert large == 0  # 2.5x the cells, new lambdas and donors: not one compilation more
    assert all(fn._cache_size() == 1 for fn in jitted)
    # a receiver with another head shape is another model shape: one more of each
    make_grid(runs, tmp_path / "c", tasks=[*two, "digits_a"], lambdas=(1.0,), **one)
    assert [fn._cache_size() for fn in jitted] == [2, 2, 2]


def _count_compiles(fn):
    """The number of XLA compilations ``fn()`` triggers."""
    from jax import monitoring

    events = []

    def listener(name, *_args, **_kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    return len(events)


@pytest.mark.slow
def test_grid_on_8_host_devices_matches_one_device(runs, tmp_path):
    from conftest import run_multidevice

    one = {rp.cell_key(c): c["acc"] for c in make_grid(runs, tmp_path / "one", tasks=TASKS[:2])}
    out = run_multidevice(
        f"""
        import jax, json
        from qvec_jax import grid
        assert jax.device_count() == 8
        cells = grid.run_grid({list(TASKS[:2])!r}, {str(runs)!r}, {str(tmp_path / "eight")!r},
                                  bits=2, lambdas={list(LAMBDAS)!r}, batch_size=60,
                                  progress=False)
        print(json.dumps(len(cells)))
        """
    )
    assert json.loads(out.strip().splitlines()[-1]) == len(one)
    eight = {rp.cell_key(c): c for c in rp.load_cells(tmp_path / "eight")}
    assert set(eight) == set(one)
    for k, acc in one.items():  # batch 60 is rounded up to 64 = 8 x 8; every example once
        assert eight[k]["acc"] == pytest.approx(acc, abs=1.5 / 359), k
        assert eight[k]["n"] == {"val": 143, "test": 359}


def test_a_quant_spec_names_the_same_grid_as_bits(runs, tmp_path):
    make_grid(runs, tmp_path, tasks=TASKS[:1], lambdas=(1.0,))
    size = (tmp_path / rp.CELLS_FILE).stat().st_size
    kw = {"lambdas": (1.0,), "batch_size": 64, "progress": False}
    grid.run_grid(TASKS[:1], runs, tmp_path, spec=q.QuantSpec(2), **kw)
    assert (tmp_path / rp.CELLS_FILE).stat().st_size == size  # nothing recomputed
    one_leaf = q.Rule({r"encoderblock_0/MlpBlock_3/Dense_0/kernel$": (1,)})
    with pytest.raises(grid.GridError, match=r"at 2-bit channel, not 2-bit channel \(rule"):
        grid.run_grid(TASKS[:1], runs, tmp_path, spec=q.QuantSpec(2, rule=one_leaf), **kw)
    with pytest.raises(TypeError, match="not both"):
        grid.run_grid(TASKS[:1], runs, tmp_path, spec=q.QuantSpec(2), bits=3, **kw)
    with pytest.raises(grid.GridError, match="no quantizer"):
        grid.run_grid(TASKS[:1], runs, tmp_path, **kw)
    # the rule travels with the spec into every PTQ of the grid, and grid.json names it
    spec = q.QuantSpec(2, rule=one_leaf)
    cells = grid.run_grid(TASKS[:1], runs, tmp_path / "rule", spec=spec, **kw)
    assert rp.load_grid_meta(tmp_path / "rule")["rule"] == repr(one_leaf)
    fp, meta = checkpoints.restore_params(checkpoint_path(runs, TASKS[0], "fp"))
    test = qdata.load_split(TASKS[0], "test", image_size=28)
    want = evaluate.accuracy(checkpoints.model_from_meta(meta), fp, test, spec)
    (ptq_fp,) = [c for c in cells if c["kind"] == "ptq_fp"]
    assert ptq_fp["acc"]["test"] == pytest.approx(want, abs=1e-12)
    assert want != pytest.approx(evaluate.accuracy(checkpoints.model_from_meta(meta), fp, test, 2))
