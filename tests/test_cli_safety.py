"""The ``qvec`` command under bad input: inputs are never harmed, refusals leave nothing
behind, and every refusal is one sentence naming the file or option (issue 11, CLI part).

Each refusal is checked three ways: the exit code, the offending name in the message, and
a byte-for-byte snapshot of the folder holding the inputs (and the refused output) taken
before and after the command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vit_layouts import random_params

import qvec_jax as q
from qvec_jax import checkpoints, cli
from qvec_jax.grid.inputs import checkpoint_path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo_tiny.py"
QUERY_1 = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"
POS = "Transformer/posembed_input/pos_embedding"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def qvec(capsys, *argv) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``qvec ARGV`` run in-process (argparse's exits included)."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def refused(capsys, root: Path, argv: list, names=(), code=cli.EXIT_ERROR) -> str:
    """Run ``qvec ARGV``; assert it exits ``code`` with one error sentence holding every
    name in ``names`` and leaves ``root`` (inputs and refused outputs) byte-identical."""
    before = snapshot(root)
    rc, err = qvec(capsys, *argv)
    assert rc == code, err
    assert "Traceback" not in err
    error_lines = [ln for ln in err.splitlines() if ln.startswith(f"qvec {argv[0]}: error:")]
    assert len(error_lines) == 1, err
    for name in names:
        assert str(name) in err, (name, err)
    assert snapshot(root) == before
    return err


def grid_argv(base: Path, work: Path, *extra) -> list:
    return ["grid", "--tasks", "digits", "--runs", base / "runs", "--workdir", work, *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder of inputs: a Google ``.npz``, a converted checkpoint ``ck`` and FP/QAT
    fine-tunes of ``digits`` laid out as ``qvec finetune`` writes them (``runs/``)."""
    root = tmp_path_factory.mktemp("cli_safety")
    _, params = random_params(0, num_classes=10)
    np.savez(root / "vit.npz", **q.flatten(params))
    meta = {"variant": "test/4", "num_classes": 10, "image_size": 28, "task": "digits"}
    checkpoints.save_params(root / "ck", params, {**meta, "mode": "fp"})
    for mode, scale in (("fp", 0.0), ("qat", 0.01)):
        tree = {k: v + scale for k, v in q.flatten(params).items()}
        info = {**meta, "mode": mode, "bits": 2, "granularity": "channel", "config": {}}
        checkpoints.save_params(
            checkpoint_path(root / "runs", "digits", mode), q.unflatten(tree), info
        )
    (root / "afile").write_text("a regular file\n")
    return root


@pytest.fixture(scope="module")
def grid_dir(base, tmp_path_factory) -> Path:
    """A real one-task grid over ``base/runs`` (its grid.json lists the input checkpoints)."""
    work = tmp_path_factory.mktemp("grid")
    argv = grid_argv(base, work, "--bits", "2", "--lambdas", "1", "--no-progress")
    assert cli.main([str(a) for a in argv]) == 0
    return work


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A directory this process cannot create files in. A normal user gets a chmod 555
    folder; root ignores permissions, so as root it is /sys, where no one may create a file
    (sysfs refuses: EPERM, or EROFS where it is mounted read-only)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    try:
        (Path("/sys") / "qvec-write-probe").mkdir()
    except OSError:
        yield Path("/sys")
        return
    (Path("/sys") / "qvec-write-probe").rmdir()
    pytest.skip("running as root and /sys is writable: no unwritable directory to test with")


# ----------------------------------------------------------------------------- inputs never harmed


def test_convert_refuses_an_output_equal_to_or_inside_its_input(capsys, base):
    ck = base / "ck"
    refused(capsys, base, ["convert", ck, ck], names=[ck, "would overwrite input"])
    inner = ck / "params" / "inner"
    refused(capsys, base, ["convert", ck, inner], names=[inner, "would overwrite input"])
    npz = base / "vit.npz"
    refused(capsys, base, ["convert", npz, npz], names=[npz])
    # an existing output is replaced only when asked for
    refused(
        capsys,
        base,
        ["convert", npz, base / "runs" / "digits" / "fp" / "params"],
        names=["already exists", "--overwrite"],
    )


@pytest.mark.parametrize("meta", ["meta/qvec_meta.json", "qvec_meta.json", "params/x.json"])
def test_eval_json_inside_the_checkpoint_is_refused_before_evaluating(capsys, base, meta):
    target = base / "ck" / meta
    refused(
        capsys,
        base,
        ["eval", base / "ck", "--task", "digits", "--json", target],
        names=["--json", target, "would overwrite input"],
    )
    assert checkpoints.restore_params(base / "ck")[1]["task"] == "digits"


def test_eval_json_naming_a_directory_is_refused(capsys, base):
    refused(
        capsys,
        base,
        ["eval", base / "ck", "--json", base / "runs"],
        names=["--json", base / "runs", "is a directory"],
    )


def test_report_out_inside_an_input_checkpoint_is_refused(capsys, base, grid_dir, tmp_path):
    fp = checkpoint_path(base / "runs", "digits", "fp")
    refused(
        capsys,
        base,
        ["report", grid_dir, "--out", fp / "rep"],
        names=["--out", fp / "rep", "inside input", fp],
    )
    refused(capsys, base, ["report", grid_dir, "--out", fp], names=["--out", fp])
    # elsewhere, --out gets every report file and the grid's own files stay as they were
    before = snapshot(grid_dir)
    assert qvec(capsys, "report", grid_dir, "--out", tmp_path / "rep")[0] == 0
    assert (tmp_path / "rep" / "summary.md").stat().st_size > 0
    assert (tmp_path / "rep" / "grid.csv").read_text() == (grid_dir / "grid.csv").read_text()
    assert snapshot(grid_dir) == before


def test_grid_workdir_inside_an_input_checkpoint_is_refused(capsys, base):
    fp = checkpoint_path(base / "runs", "digits", "fp")
    for work in (fp, fp / "grid"):
        refused(capsys, base, grid_argv(base, work, "--bits", "2"), names=["--workdir", work, fp])


def test_finetune_workdir_inside_or_over_its_pretrained_init_is_refused(capsys, base):
    ck = base / "ck"
    init = ["init.kind=pretrained", f"init.path={ck}"]
    for work in (ck, ck / "params" / "w"):
        refused(
            capsys,
            base,
            ["finetune", "--config", DEMO_CONFIG, "--workdir", work, *init],
            names=["--workdir", work, "inside input", ck],
        )
    # a workdir whose params/ (written, or removed by --force) is the init checkpoint
    init = ["init.kind=pretrained", f"init.path={base / 'runs' / 'digits' / 'fp' / 'params'}"]
    work = base / "runs" / "digits" / "fp"
    refused(
        capsys,
        base,
        ["finetune", "--config", DEMO_CONFIG, "--workdir", work, "--force", *init],
        names=["--workdir", "would overwrite input", work / "params"],
    )


# ----------------------------------------------------------------------------- unwritable outputs


def _writing_commands(base: Path, out: Path) -> list[tuple[str, list]]:
    """``(option naming the output, argv)`` of every command that writes, aimed at ``out``."""
    runs, ck = base / "runs", base / "ck"
    fp, qat = (checkpoint_path(runs, "digits", m) for m in ("fp", "qat"))
    return [
        ("output", ["convert", base / "vit.npz", out / "conv"]),
        ("output", ["extract", qat, fp, out / "qv"]),
        ("output", ["ptq", ck, out / "w2", "--bits", "2"]),
        ("--json", ["eval", ck, "--task", "digits", "--json", out / "acc.json"]),
        ("--workdir", ["finetune", "--config", DEMO_CONFIG, "--workdir", out / "ft"]),
        ("--workdir", ["finetune", "--config", DEMO_CONFIG, "--workdir", out]),
        ("--workdir", grid_argv(base, out / "g", "--bits", "2")),
        ("--workdir", grid_argv(base, out, "--bits", "2")),
        ("--out", ["report", runs, "--out", out / "rep"]),
        ("--workdir", ["demo", "--workdir", out / "demo"]),
    ]


def test_outputs_under_a_regular_file_are_refused(capsys, base):
    afile = base / "afile"
    for what, argv in _writing_commands(base, afile):
        refused(capsys, base, argv, names=[what, f"{afile} is a file, not a directory"])


def test_unwritable_outputs_are_refused_before_any_work(capsys, base, unwritable):
    """A read-only workdir (finetune, grid, demo), --json (eval), --out (report) and
    checkpoint outputs: one sentence naming the path and the option to change."""
    for what, argv in _writing_commands(base, unwritable):
        err = refused(capsys, base, argv, names=[what, "cannot write", unwritable])
        assert f"choose a writable {what}" in err


def test_a_write_error_mid_run_names_the_file_and_the_option(tmp_path):
    from qvec_jax.cli.common import QvecError, writing

    (tmp_path / "afile").write_text("")
    with pytest.raises(QvecError, match=r"cannot write .*afile/x: .*choose a writable --workdir"):
        with writing(tmp_path, "--workdir"):
            open(tmp_path / "afile" / "x", "w")  # NotADirectoryError
    with pytest.raises(NotADirectoryError), writing(tmp_path / "w", "--workdir"):
        open(tmp_path / "afile" / "x", "w")  # not under the output: passed through
    with pytest.raises(FileNotFoundError), writing(tmp_path, "--workdir"):
        open(tmp_path / "missing" / "x")  # a missing file is no write error


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "argv, option",
    [
        ("convert {npz} {out} --image-size 0", "--image-size"),
        ("convert {npz} {out} --num-classes -3", "--num-classes"),
        ("convert {npz} {out} --num-heads 0", "--num-heads"),
        ("finetune --config {cfg} --workdir {out} --stop-after -5", "--stop-after"),
        ("grid --tasks digits --workdir {out} --bits 0", "--bits"),
        ("grid --tasks digits --workdir {out} --bits 2 --batch-size 0", "--batch-size"),
        ("grid --tasks digits --workdir {out} --bits 2 --lambdas 0.5,abc", "--lambdas"),
        ("grid --tasks digits --workdir {out} --bits 2 --lambdas 0.5,nan", "--lambdas"),
        ("grid --tasks digits --workdir {out} --bits 2 --lambdas ,", "--lambdas"),
        ("patch {ck} {ck} {out} --lam inf", "--lam"),
        ("ptq {ck} {out} --bits 9", "--bits"),
        ("eval {ck} --batch-size 0", "--batch-size"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(capsys, base, argv, option):
    fill = dict(npz=base / "vit.npz", out=base / "out", cfg=DEMO_CONFIG, ck=base / "ck")
    argv = argv.format(**fill).split()
    refused(capsys, base, argv, names=[f"argument {option}"], code=cli.EXIT_USAGE)


def test_grid_zeros_from_the_config_are_refused_not_replaced(capsys, base):
    grid = grid_argv(base, base / "g", "--config", DEMO_CONFIG)
    refused(capsys, base, [*grid, "eval_batch_size=0"], names=["eval_batch_size=0", DEMO_CONFIG])
    refused(capsys, base, [*grid, "quant.bits=0"], names=["quant.bits=0"])


def test_eval_splits_are_checked(capsys, base):
    refused(
        capsys,
        base,
        ["eval", base / "ck", "--task", "digits", "--splits", "val,tset"],
        names=["--splits", "tset", "train, val, test"],
    )


def test_a_grid_task_typo_is_caught_by_the_registry_before_the_checkpoints(capsys, base):
    argv = grid_argv(base, base / "g", "--bits", "2")
    argv[2] = "digits,digts"
    err = refused(capsys, base, argv, names=["--tasks", "'digts'"])
    assert "Did you mean: digits" in err and "missing" not in err
    argv = ["finetune", "--config", DEMO_CONFIG, "--workdir", base / "w", "--task", "digts"]
    assert "Did you mean: digits" in refused(capsys, base, argv, names=["--task", "'digts'"])


def test_config_file_errors_name_the_file_or_the_key(capsys, base, tmp_path):
    cases = {
        "c.json": '{"seed": 1',
        "syntax.py": "def get_config(:\n",
        "raises.py": "def get_config():\n    return {}['nope']\n",
        "none.py": "x = 1\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        refused(
            capsys,
            base,
            ["finetune", "--config", tmp_path / name, "--workdir", base / "w"],
            names=[tmp_path / name],
        )
    refused(
        capsys,
        base,
        ["finetune", "--config", DEMO_CONFIG, "--workdir", base / "w", "optim.lr=[1,"],
        names=["optim.lr"],
    )
    argv = ["finetune", "--config", DEMO_CONFIG, "--workdir", base / "w", 'optim={"lr": 1e-3']
    refused(capsys, base, argv, names=["override optim="])  # a dict cut short
    refused(
        capsys,
        base,
        ["finetune", "--config", DEMO_CONFIG, "--workdir", base / "w", "optim.lrr=1"],
        names=["optim.lrr", "did you mean optim.lr"],
    )


# ----------------------------------------------------------------------------- damaged imports


def test_convert_of_an_npz_without_a_query_kernel_names_the_key_and_file(capsys, base):
    _, params = random_params(3, num_classes=10)
    flat = {k: np.asarray(v) for k, v in q.flatten(params).items() if k != QUERY_1}
    np.savez(base / "noquery.npz", **flat)
    refused(
        capsys,
        base,
        ["convert", base / "noquery.npz", base / "out"],
        names=[base / "noquery.npz", QUERY_1, "missing keys"],
    )
    (base / "noquery.npz").unlink()


def test_convert_of_a_1d_pos_embedding_names_the_leaf_and_its_shape(capsys, base):
    _, params = random_params(3, num_classes=10)
    flat = {k: np.asarray(v) for k, v in q.flatten(params).items()}
    flat[POS] = flat[POS].reshape(-1)
    np.savez(base / "pos1d.npz", **flat)
    refused(
        capsys,
        base,
        ["convert", base / "pos1d.npz", base / "out"],
        names=[base / "pos1d.npz", POS, f"{flat[POS].shape}", "[1, tokens, width]"],
    )
    (base / "pos1d.npz").unlink()


# ----------------------------------------------------------------------------- errors vs bugs


def _args(func):
    args = cli.build_parser().parse_args(["tasks"])
    args.func = func
    return args


def _bug(args):
    return {}["a key no one stored"]


def _ctrl_c(args):
    raise KeyboardInterrupt


def test_an_unexpected_exception_is_one_line_asking_for_a_report(capsys, monkeypatch):
    monkeypatch.delenv("QVEC_DEBUG", raising=False)
    assert cli.run(_args(_bug)) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("qvec tasks: internal error: KeyError:") and "--debug" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert cli.run(_args(_ctrl_c)) == cli.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_debug_flag_and_environment_show_the_traceback(monkeypatch):
    monkeypatch.delenv("QVEC_DEBUG", raising=False)
    args = _args(_bug)
    args.debug = True
    with pytest.raises(KeyError, match="a key no one stored"):
        cli.run(args)
    monkeypatch.setenv("QVEC_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.run(_args(_bug))
    # --debug is accepted before and after the subcommand
    assert cli.build_parser().parse_args(["--debug", "tasks"]).debug
    assert cli.build_parser().parse_args(["tasks", "--debug"]).debug


def test_the_command_line_exits_with_the_documented_codes(base, tmp_path):
    def qvec_sub(*argv, **env):
        return subprocess.run(
            [sys.executable, "-m", "qvec_jax.cli", *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        )

    r = qvec_sub("--help")
    assert r.returncode == 0 and "exit codes:" in r.stdout and "QVEC_DEBUG=1" in r.stdout
    r = qvec_sub("convert", tmp_path / "missing.npz", tmp_path / "o")
    assert r.returncode == 1 and "missing.npz" in r.stderr and "Traceback" not in r.stderr
    r = qvec_sub("convert", tmp_path / "missing.npz", tmp_path / "o", QVEC_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- inputs that are
# what they claim (issue 20): extract's pair, quantizing twice, merge's inputs, one writer


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """FP and QAT fine-tunes of ``digits`` on backbone b0 (two QAT runs), a QAT run of
    another task and one of another backbone, and what the commands make of them: QVs
    (``extract``), `ptq` outputs (RTN, GPTQ), a packed export and a patched model."""
    root = tmp_path_factory.mktemp("made")
    _, params = random_params(0, num_classes=10)
    meta = {"variant": "test/4", "num_classes": 10, "image_size": 28, "task": "digits",
            "bits": 2, "granularity": "channel", "backbone_id": "b0", "config": {}}  # fmt: skip
    rng = np.random.default_rng(0)

    def nudged(scale):
        return q.unflatten({k: v + scale * rng.standard_normal(v.shape).astype(np.float32)
                            for k, v in q.flatten(params).items()})  # fmt: skip

    runs = {
        "fp": ("fp", {}),
        "qat": ("qat", {}),
        "qat_b": ("qat", {}),
        "qat_task": ("qat", {"task": "digits_rot90"}),
        "qat_bb": ("qat", {"backbone_id": "b1"}),
    }
    fp = nudged(0.01)
    for name, (mode, over) in runs.items():
        tree = fp if name == "fp" else nudged(0.05)
        checkpoints.save_params(root / name, tree, {**meta, "mode": mode, **over})
    for argv in (
        ["extract", root / "qat", root / "fp", root / "qv_a"],
        ["extract", root / "qat_b", root / "fp", root / "qv_b"],
        ["ptq", root / "qat", root / "ptq_rtn", "--bits", "2"],
        [
            "ptq",
            root / "fp",
            root / "ptq_gptq",
            "--bits",
            "3",
            "--method",
            "gptq",
            "--calib",
            "noise",
            "--calib-size",
            "8",
        ],  # fmt: skip
        ["export", root / "qat", root / "packed.safetensors", "--bits", "2"],
        ["patch", root / "fp", root / "qv_a", root / "patched", "--lam", "1"],
    ):
        assert cli.main([str(a) for a in argv]) == 0, argv
    return root


@pytest.mark.parametrize(
    "qat, what",
    [
        ("packed.safetensors", "is a packed export (2-bit, rtn, channel) of task 'digits', not"),
        ("ptq_rtn", "is a `qvec ptq` output (2-bit, rtn, channel) of task 'digits', not a QAT"),
        ("ptq_gptq", "is a `qvec ptq` output (3-bit, gptq, channel) of task 'digits', not a QAT"),
        ("patched", "is a patched checkpoint of task 'digits' (`qvec patch`), not a QAT"),
        ("qv_a", "is a quantization vector of task 'digits', not a QAT"),
        ("qat_task", "is task 'digits_rot90' but"),
        ("qat_bb", "(backbone_id b1) and"),
    ],
)  # fmt: skip
def test_extract_refuses_a_qat_argument_that_is_not_a_qat_run_of_the_task(capsys, made, qat, what):
    out = made / "never"
    refused(capsys, made, ["extract", made / qat, made / "fp", out], [made / qat, what])
    assert not out.exists()


def test_extract_refuses_an_fp_run_as_qat_and_a_non_fp_run_as_fp(capsys, made, tmp_path):
    fp2 = tmp_path / "fp2"  # another FP run of the task, as QAT: not the swapped pair
    shutil.copytree(made / "fp", fp2)
    what = f"{fp2} is an FP fine-tune of task 'digits', not a QAT fine-tune"
    refused(capsys, tmp_path, ["extract", fp2, made / "fp", tmp_path / "x"], [what])
    kinds = {"ptq_rtn": "`qvec ptq` output", "patched": "patched checkpoint",
             "packed.safetensors": "packed export", "qat_b": "QAT fine-tune"}  # fmt: skip
    for fp, kind in kinds.items():
        refused(capsys, made, ["extract", made / "qat", made / fp, made / "x"],
                [f"{made / fp} is a {kind}", "not an FP fine-tune"])  # fmt: skip


@pytest.mark.parametrize("cmd", ["ptq", "export"])
@pytest.mark.parametrize(
    "src, what",
    [
        ("ptq_rtn", "a `qvec ptq` output (2-bit, rtn, channel)"),
        ("ptq_gptq", "a `qvec ptq` output (3-bit, gptq, channel)"),
        ("packed.safetensors", "a packed export (2-bit, rtn, channel)"),
    ],
)
def test_ptq_and_export_refuse_an_input_that_is_already_quantized(capsys, made, cmd, src, what):
    out = made / ("again.safetensors" if cmd == "export" else "again")
    argv = [cmd, made / src, out, "--bits", "3"]
    refused(capsys, made, argv, [made / src, what, "already quantized"])
    assert not out.exists()


@pytest.mark.parametrize("src", ["ptq_rtn", "ptq_gptq", "packed.safetensors"])
def test_patch_refuses_a_receiver_that_is_already_quantized(capsys, made, src):
    refused(capsys, made, ["patch", made / src, made / "qv_a", made / "never_patched"],
            [str(made / src), "already quantized", "qvec patch"])  # fmt: skip
    assert not (made / "never_patched").exists()


def test_eval_bits_refuses_an_input_that_is_already_quantized(capsys, made):
    src = made / "ptq_gptq"
    refused(capsys, made, ["eval", src, "--bits", "3", "--splits", "val"],
            ["--bits", src, "already quantized"])  # fmt: skip


def test_merge_refuses_one_qv_given_twice(capsys, made, tmp_path):
    a = made / "qv_a"
    refused(capsys, made, ["merge", a, made / "qv_b", a, "--method", "sum", made / "m"],
            [f"QV {a} is given twice"])  # fmt: skip
    refused(capsys, made, ["merge", a, f"{made}/./qv_a", made / "m"], ["is given twice"])
    copy = tmp_path / "copy_of_a"
    shutil.copytree(a, copy)
    refused(capsys, tmp_path, ["merge", a, copy, tmp_path / "m"],
            [f"QV {copy} equals QV {a} (same fingerprint"])  # fmt: skip


def test_merge_takes_negative_weights(capsys, made, tmp_path):
    from qvec_jax import merge

    a, b = made / "qv_a", made / "qv_b"
    for opt in (["--weights", "-1,1"], ["--weights=-1,1"], ["--weights", "-.5,-2"]):
        out = tmp_path / opt[-1].replace(",", "_")
        rc, err = qvec(capsys, "merge", a, b, "--method", "sum", *opt, out)
        assert rc == 0, err
        w = [float(x) for x in opt[-1].split("=")[-1].split(",")]
        got, meta = checkpoints.restore_params(out)
        want = merge.merge_qvs([checkpoints.restore_params(p)[0] for p in (a, b)],
                               merge.MergeSpec("sum", tuple(w)))  # fmt: skip
        assert meta["merge"]["spec"]["weights"] == w
        for k, v in q.flatten(want).items():
            np.testing.assert_array_equal(q.flatten(got)[k], np.asarray(v), err_msg=k)


def _qvec_procs(*argvs) -> list[tuple[int, str, str]]:
    """Run ``qvec ARGV`` processes at the same time; their (rc, stdout, stderr)."""
    procs = [subprocess.Popen([sys.executable, "-m", "qvec_jax.cli", *map(str, a)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in argvs]  # fmt: skip
    return [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]


@pytest.mark.parametrize("cmd", ["merge", "export"])
def test_a_second_writer_of_one_output_stops_in_one_line(made, tmp_path, cmd):
    from qvec_jax.cli.common import claim

    out = tmp_path / ("out.safetensors" if cmd == "export" else "out")
    argv = ([cmd, made / "qv_a", made / "qv_b", out] if cmd == "merge"
            else [cmd, made / "fp", out, "--bits", "2"])  # fmt: skip
    with claim(out):  # this process writes OUT: a qvec started now stops at once
        ((rc, so, err),) = _qvec_procs(argv)
        assert (out.parent / f".{out.name}.qvec-lock").read_text().strip() == str(os.getpid())
    assert rc == 1 and "wrote" not in so and not out.exists()
    assert err.strip() == (f"qvec {cmd}: error: output {out} is being written by another qvec "
                           f"process (pid {os.getpid()}); wait for it to finish or choose "
                           "another output")  # fmt: skip
    # two qvec processes at once: one writes, the other stops (held, or written meanwhile)
    results = sorted(_qvec_procs(argv, argv))
    (rc0, so0, err0), (rc1, so1, err1) = results
    assert (rc0, rc1) == (0, 1), results
    assert so0.count("wrote") == 1 and "wrote" not in so1
    assert len(err1.strip().splitlines()) == 1 and str(out) in err1, err1
    why = ("being written by another qvec", "written by another command", "already exists")
    assert any(w in err1 for w in why), err1
    checkpoints.restore_params(out)  # whole and verified
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no lock file left
