"""``qvec merge``, ``qvec patch --lam auto``, ``qvec ptq --method gptq`` and ``qvec export``
end to end on tiny checkpoints: each output is compared with the library call it must
equal (merge.merge_qvs, select.select_lambda, gptq.gptq_quantize, export + restore), the
printed lines name the data used, and refusals name the option.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_cli_safety import refused, snapshot
from vit_layouts import random_params

import qvec_jax as q
from qvec_jax import checkpoints, cli, data, gptq, grid, merge, select
from qvec_jax.cli import patch_cmd
from qvec_jax.data import overlap
from qvec_jax.report import tune

IMAGE = 16
META = {"variant": "test/4", "num_classes": 10, "image_size": IMAGE, "backbone_id": "b0"}
TASKS = ("digits", "digits_rot90", "digits_inv")
GPTQ_NOISE = ("--method", "gptq", "--calib", "noise", "--calib-size", "8")


def _nudge(params, seed, scale):
    rng = np.random.default_rng(seed)
    return q.unflatten(
        {
            p: x + scale * rng.normal(0, 0.05, x.shape).astype(np.float32)
            for p, x in q.flatten(params).items()
        }
    )


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """A pretext checkpoint (task digits_flip), FP/QAT fine-tunes of it on TASKS whose
    config names it as init.path, a QV of each (by `qvec extract`) and a QV of another
    backbone."""
    root = tmp_path_factory.mktemp("cli_methods")
    _, base = random_params(0, num_classes=10, image_size=IMAGE)
    checkpoints.save_params(root / "pretext", base, {**META, "task": "digits_flip", "mode": "fp"})
    config = {"init": {"kind": "pretrained", "path": str(root / "pretext")}}
    for i, task in enumerate(TASKS):
        fp = _nudge(base, 10 + i, 0.2)
        for mode, tree in (("fp", fp), ("qat", _nudge(fp, 20 + i, 0.3))):
            info = {**META, "task": task, "mode": mode, "bits": 2, "granularity": "channel"}
            checkpoints.save_params(root / f"{task}_{mode}", tree, info | {"config": config})
        assert (
            cli.main(
                [
                    "extract",
                    str(root / f"{task}_qat"),
                    str(root / f"{task}_fp"),
                    str(root / f"qv_{task}"),
                ]
            )
            == 0
        )
    other = {**META, "kind": "qv", "task": "digits", "backbone_id": "b1", "bits": 2}
    qv, _ = checkpoints.restore_params(root / "qv_digits")
    checkpoints.save_params(root / "qv_other", qv, other)
    return root


def run_ok(capsys, *argv) -> str:
    """stdout of ``qvec ARGV`` run in-process; asserts it succeeded."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _p(path):
    return checkpoints.restore_params(path)


def assert_trees_equal(a, b):
    fa, fb = q.flatten(a), q.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize(
    "opts, spec",
    [
        ([], merge.MergeSpec("mean")),
        (["--method", "sum", "--weights", "1,-0.5,2"], merge.MergeSpec("sum", (1, -0.5, 2))),
        (["--method", "ties", "--density", "0.3"], merge.MergeSpec("ties", density=0.3)),
        (["--method", "dare", "--p", "0.4", "--seed", "3"], merge.MergeSpec("dare", p=0.4, seed=3)),
        (
            ["--method", "model_stock", "--scope", "global"],
            merge.MergeSpec("model_stock", scope="global"),
        ),
    ],
)
def test_merge_writes_the_library_merge_with_its_recipe(capsys, ck, tmp_path, opts, spec):
    paths = [ck / f"qv_{t}" for t in TASKS]
    out = run_ok(capsys, "merge", *paths, tmp_path / "m", *opts)
    merged, meta = _p(tmp_path / "m")
    qvs = [_p(p)[0] for p in paths]
    assert_trees_equal(merged, merge.merge_qvs(qvs, spec))
    assert meta["kind"] == "qv" and meta["backbone_id"] == "b0" and meta["bits"] == 2
    assert meta["merge"]["spec"] == spec.to_dict()
    assert [i["task"] for i in meta["merge"]["inputs"]] == list(TASKS)
    assert [i["fingerprint"] for i in meta["merge"]["inputs"]] == [
        checkpoints.backbone_id(x) for x in qvs
    ]
    assert f"merged QV ({spec.method}) of 3 donors" in out
    assert meta["global_norm"] == pytest.approx(q.global_norm(merged))


def test_a_merged_qv_patches_like_a_single_one(capsys, ck, tmp_path):
    run_ok(capsys, "merge", ck / "qv_digits_rot90", ck / "qv_digits_inv", tmp_path / "m")
    run_ok(capsys, "patch", ck / "digits_fp", tmp_path / "m", tmp_path / "p", "--lam", "0.5")
    patched, meta = _p(tmp_path / "p")
    assert_trees_equal(patched, q.patch(_p(ck / "digits_fp")[0], _p(tmp_path / "m")[0], 0.5))
    assert meta["patch"]["donor"] == "digits_rot90+digits_inv"


@pytest.mark.parametrize(
    "extra, names",
    [
        (["qv_other"], ["qv_other", "backbone"]),
        (["--density", "0.2"], ["--density"]),
        (["--weights", "1"], ["--weights"]),
        (["--method", "mean", "--weights", "1,-1"], ["--weights"]),
        (["digits_fp"], ["digits_fp", "not a quantization vector"]),
    ],
)
def test_merge_refusals_name_the_file_or_option(capsys, ck, extra, names):
    extra = [ck / e if e.startswith(("qv_", "digits")) else e for e in extra]
    argv = ["merge", ck / "qv_digits", ck / "qv_digits_rot90", *extra, ck / "never"]
    refused(capsys, ck, argv, names)


# ----------------------------------------------------------------------------- patch --lam auto


def _auto(capsys, ck, tmp_path, *opts, receiver="digits", donor="digits_rot90"):
    out = run_ok(
        capsys,
        "patch",
        ck / f"{receiver}_fp",
        ck / f"qv_{donor}",
        tmp_path / "p",
        "--lam",
        "auto",
        *opts,
    )
    patched, meta = _p(tmp_path / "p")
    return out, patched, meta


def test_auto_lambda_prints_the_choice_and_data_and_patches_with_it(capsys, ck, tmp_path):
    out, patched, meta = _auto(capsys, ck, tmp_path, "--proxy", "noise", "--proxy-size", "8")
    fp, fmeta = _p(ck / "digits_fp")
    qv, _ = _p(ck / "qv_digits_rot90")
    model = checkpoints.model_from_meta(fmeta)
    default = select.split_name(patch_cmd.DEFAULT_AUTO_STRATEGY)[1]  # the dev-tuned margin
    strategy = select.Proxy("noise", "kl", n=8).with_constants(default)
    want = select.select_lambda(fp, qv, 2, model, strategy=strategy)
    assert f"lambda {want.lam:g} chosen by {strategy.name} at 2 bits: {want.why}" in out
    assert "data: 8 synthetic noise images (no data)" in out
    assert meta["patch"]["lam"] == want.lam and meta["patch"]["zero_shot"] is True
    assert meta["patch"]["select"]["scores"] == list(want.scores)
    assert_trees_equal(patched, q.patch(fp, qv, want.lam))


@pytest.mark.parametrize(
    "proxy, says, zero_shot",
    [
        ([], "task digits_flip (the pretext task; no receiver data)", True),  # the default
        (["--proxy", "donor"], "task digits_rot90 (the donor's task; no receiver data)", True),
        (["--proxy", "digits@invert"], "task digits@invert (another task; no receiver data)", True),
        (
            ["--proxy", "digits"],
            "task digits (the receiver's own task: receiver data, NOT zero-shot)",
            False,
        ),
    ],
)
def test_auto_lambda_names_its_proxy_data(
    capsys, ck, tmp_path, monkeypatch, proxy, says, zero_shot
):
    loaded, load_split = [], data.load_split
    monkeypatch.setattr(
        data, "load_split", lambda t, *a, **k: loaded.append(t) or load_split(t, *a, **k)
    )
    out, _, meta = _auto(
        capsys, ck, tmp_path, *proxy, "--proxy-size", "8", "--strategy", "proxy-agree"
    )
    assert f"data: 8 train images of {says}" in out
    assert ("digits" in loaded) is not zero_shot  # the receiver's task is read only if named
    assert ("not zero-shot" in out) is not zero_shot
    assert meta["patch"]["zero_shot"] is zero_shot
    assert meta["patch"]["select"]["inputs"]["n"] == 8


def test_auto_lambda_weight_only_strategy_uses_no_data(capsys, ck, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_split", None)  # any read of a split would fail
    fp, qv = _p(ck / "digits_fp")[0], _p(ck / "qv_digits_rot90")[0]
    for name in ("norm-ratio", "norm-ratio:multiple=0.25"):  # tuned constants work too
        out, _, meta = _auto(capsys, ck, tmp_path / name, "--strategy", name)
        want = select.select_lambda(fp, qv, 2, strategy=name)
        assert f"lambda {want.lam:g} chosen by {name}" in out and "data: none" in out
        assert meta["patch"]["lam"] == want.lam and meta["patch"]["select"]["inputs"] is None


def test_auto_lambda_refusals_name_the_option(capsys, ck, tmp_path):
    fp, qv, out = ck / "digits_fp", ck / "qv_digits_rot90", ck / "never"
    refused(capsys, ck, ["patch", fp, qv, out, "--proxy", "noise"], ["--proxy", "--lam auto"])
    refused(
        capsys,
        ck,
        ["patch", fp, qv, out, "--lam", "auto", "--strategy", "norm-ratio", "--proxy", "noise"],
        ["--proxy"],
    )
    refused(
        capsys,
        ck,
        ["patch", fp, qv, out, "--lam", "auto", "--proxy", "digts"],
        ["--proxy", "digts"],
    )
    for bad, says, code in [
        ("norm-ratio:scale=2", "no constant 'scale'", cli.EXIT_ERROR),
        ("proxy-l2", "'proxy-l2': use one of", cli.EXIT_USAGE),
    ]:
        argv = ["patch", fp, qv, out, "--lam", "auto", "--strategy", bad]
        refused(capsys, ck, argv, [says], code=code)
    # a merged QV has no single donor task
    merged = [ck / "qv_digits_rot90", ck / "qv_digits_inv", tmp_path / "m"]
    assert cli.main(["merge", *map(str, merged)]) == 0
    refused(
        capsys,
        ck,
        ["patch", fp, tmp_path / "m", out, "--lam", "auto", "--proxy", "donor"],
        ["--proxy", "no single donor task"],
    )
    # neither the receiver's config nor the QV's FP checkpoint names a pretext
    bare = {"kind": "qv", "task": "digits_rot90", "backbone_id": "b0", "bits": 2}
    checkpoints.save_params(tmp_path / "qv_bare", _p(qv)[0], bare)
    refused(
        capsys,
        ck,
        ["patch", ck / "pretext", tmp_path / "qv_bare", out, "--lam", "auto", "--proxy", "pretext"],
        ["--proxy pretext", "pass --proxy TASK or noise"],
    )
    # without --proxy, an unknown pretext falls back to the donor's images, and says so
    said = run_ok(capsys, "patch", ck / "pretext", tmp_path / "qv_bare", tmp_path / "fb",
                  "--lam", "auto", "--proxy-size", "8")  # fmt: skip
    assert "the pretext task is not known" in said and "task digits_rot90 (the donor's" in said
    refused(capsys, ck, ["patch", fp, qv, out, "--lam", "nan"], ["--lam"], code=cli.EXIT_USAGE)


# ----------------------------------------------------------------------------- ptq / export


def test_ptq_rtn_is_the_default_and_gptq_uses_the_named_calibration(capsys, ck, tmp_path):
    params, meta = _p(ck / "digits_fp")
    run_ok(capsys, "ptq", ck / "digits_fp", tmp_path / "rtn", "--bits", "2")
    assert_trees_equal(_p(tmp_path / "rtn")[0], q.ptq(params, 2))
    out = run_ok(
        capsys,
        "ptq",
        ck / "digits_fp",
        tmp_path / "g",
        "--bits",
        "2",
        *GPTQ_NOISE,
    )
    assert "GPTQ calibration data: 8 synthetic noise images (no data)" in out
    model = checkpoints.model_from_meta(meta)
    codes = gptq.gptq_quantize(params, model, select.noise_images(8, IMAGE), 2)
    got, gmeta = _p(tmp_path / "g")
    assert_trees_equal(got, q.dequantize(codes))
    assert gmeta["ptq"]["method"] == "gptq" and gmeta["ptq"]["calib"]["kind"] == "noise"
    out = run_ok(
        capsys,
        "ptq",
        ck / "digits_fp",
        tmp_path / "g2",
        "--bits",
        "2",
        "--method",
        "gptq",
        "--calib",
        "digits",
        "--calib-size",
        "8",
    )
    assert "task digits (the receiver's own task: receiver data, NOT zero-shot)" in out


def test_ptq_and_export_calibration_refusals_name_the_option(capsys, ck):
    for cmd, out in (("ptq", ck / "never"), ("export", ck / "never.safetensors")):
        refused(
            capsys, ck, [cmd, ck / "digits_fp", out, "--bits", "2", "--method", "gptq"], ["--calib"]
        )
        refused(
            capsys,
            ck,
            [cmd, ck / "digits_fp", out, "--bits", "2", "--calib", "noise"],
            ["--calib", "RTN"],
        )


def test_export_then_eval_equals_eval_of_the_fake_quantized_params(capsys, ck, tmp_path):
    f = tmp_path / "m.safetensors"
    out = run_ok(capsys, "export", ck / "digits_fp", f, "--bits", "2")
    params, meta = _p(ck / "digits_fp")
    size = q.size_report(params, 2)
    assert f"{f.stat().st_size:,} bytes on disk; fp32 {size['fp32_bytes']:,} bytes" in out
    assert f"size_report {size['total_bytes']:,} bytes" in out
    got, gmeta = checkpoints.restore_params(f)
    assert_trees_equal(got, q.ptq(params, 2))
    ptq = {"bits": 2, "granularity": "channel", "method": "rtn", "packed": True}
    assert gmeta == {**meta, "ptq": ptq}
    run_ok(capsys, "eval", f, "--splits", "test", "--json", tmp_path / "a.json")
    run_ok(
        capsys,
        "eval",
        ck / "digits_fp",
        "--bits",
        "2",
        "--splits",
        "test",
        "--json",
        tmp_path / "b.json",
    )
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["test"] == b["test"] and a["n_test"] == b["n_test"] > 0
    assert a["quantized"] == ptq and "quantized" not in b


def test_gptq_export_keeps_gptq_codes(capsys, ck, tmp_path):
    f = tmp_path / "g.safetensors"
    run_ok(
        capsys,
        "export",
        ck / "digits_fp",
        f,
        "--bits",
        "3",
        *GPTQ_NOISE,
    )
    params, meta = _p(ck / "digits_fp")
    codes = gptq.gptq_quantize(
        params, checkpoints.model_from_meta(meta), select.noise_images(8, IMAGE), 3
    )
    got, gmeta = checkpoints.restore_params(f)
    assert_trees_equal(got, q.dequantize(codes))
    assert gmeta["ptq"]["calib"]["kind"] == "noise" and gmeta["task"] == "digits"


def test_a_file_that_is_not_an_export_is_refused_by_eval(capsys, ck, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    refused(capsys, tmp_path, ["eval", bad, "--splits", "test"], [str(bad)])


def test_help_of_each_new_command_ends_with_an_example(capsys):
    for cmd in ("merge", "patch", "ptq", "export"):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "example:" in text and f"qvec {cmd} " in text, cmd
        if cmd == "patch":  # the --lam auto default is named (the DEV-set study sets it)
            assert f"default {patch_cmd.DEFAULT_AUTO_STRATEGY}" in " ".join(text.split())


# ----------------------------------------------------------------------------- issue 20


def test_auto_lambda_on_images_that_hold_receiver_images_is_not_zero_shot(capsys, ck, tmp_path):
    """digits_a's train images ARE digits images (classes 0-4, same view), in digits' train
    and val splits: the label says so with the counts, and the patch is not zero-shot."""
    before = snapshot(ck)
    opts = ("--proxy", "digits_a", "--proxy-size", "64", "--strategy", "proxy-agree")
    out, _, meta = _auto(capsys, ck, tmp_path, *opts)
    want = overlap.overlap_counts("digits_a", 64, "digits")
    assert want["train"] > 0 and want["val"] > 0 and want["test"] == 0
    said = f"{want['train']} train, {want['val']} val, 0 test"
    assert (f"data: 64 train images of task digits_a (another task; it holds receiver images: "
            f"{said}: receiver data, NOT zero-shot)") in out  # fmt: skip
    assert f"{sum(want.values())} are the receiver's own images ({said})" in out
    assert meta["patch"]["zero_shot"] is False
    used = meta["patch"]["select"]["inputs"]
    assert used["overlap"] == want and used["receiver_data"] is True
    # images of another view share nothing: zero-shot, and the counts say 0 per split
    out, _, meta = _auto(capsys, ck, tmp_path / "inv", "--proxy", "digits_inv", "--proxy-size",
                         "8", "--strategy", "proxy-agree")  # fmt: skip
    assert meta["patch"]["zero_shot"] is True and "NOT zero-shot" not in out
    assert meta["patch"]["select"]["inputs"]["overlap"] == overlap.zero_counts()
    assert snapshot(ck) == before  # the inputs are untouched


def test_patch_takes_every_strategy_name_tune_prints(capsys, ck, tmp_path):
    names = [s.name for s in tune.variants(grid.extras.measured_strategies(8, (4,)))]
    parser = cli.build_parser()
    for name in names:  # argparse accepts each (it exits on a refused --strategy)
        args = parser.parse_args(["patch", "fp", "qv", "out", "--lam", "auto", "--strategy", name])
        assert args.strategy == name
    for name, zero_shot in [
        ("proxy-pretext8-kl:margin=0.05", True),  # the pretext (digits_flip) images, 8 of them
        ("proxy-donor8-agree:margin=0.1", True),
        ("proxy-noise8-cos", True),
        ("proxy-rx4-kl:margin=0.2", False),  # the receiver's own images
        ("model-stock:k=4", True),
    ]:
        assert name in names
        out, _, meta = _auto(capsys, ck, tmp_path / name.replace(":", "_"), "--strategy", name)
        assert f"chosen by {name} at 2 bits" in out
        assert meta["patch"]["select"]["strategy"] == name
        assert meta["patch"]["zero_shot"] is zero_shot


def test_patch_refuses_a_strategy_name_at_odds_with_its_options(capsys, ck, tmp_path):
    fp, qv, out = ck / "digits_fp", ck / "qv_digits_rot90", tmp_path / "never"
    auto = ["patch", fp, qv, out, "--lam", "auto", "--strategy"]
    refused(capsys, ck, [*auto, "proxy-pretext8-kl", "--proxy-size", "16"],
            ["--proxy-size 16", "proxy-pretext8-kl", "reads 8 images"])  # fmt: skip
    refused(capsys, ck, [*auto, "proxy-pretext8-kl", "--proxy", "noise"],
            ["--proxy noise", "proxy-pretext8-kl", "reads pretext images"])  # fmt: skip
    refused(capsys, ck, [*auto, "proxy-kl:margin=0.1:margin=0.2"],
            ["constant 'margin' is given twice"], code=cli.EXIT_USAGE)  # fmt: skip
    refused(capsys, ck, [*auto, "val-best"], ["'val-best'"], code=cli.EXIT_USAGE)
    refused(capsys, ck, ["patch", fp, qv, out, "--proxy-size", "8"], ["--proxy-size", "--lam auto"])
    assert not out.exists()


def test_calib_donor_of_a_merged_qv_and_calib_typos_are_refused(capsys, ck, tmp_path):
    merged, patched = tmp_path / "m", tmp_path / "patched"
    qvs = [str(ck / "qv_digits_rot90"), str(ck / "qv_digits_inv")]
    assert cli.main(["merge", *qvs, str(merged)]) == 0
    run_ok(capsys, "patch", ck / "digits_fp", merged, patched)
    assert _p(patched)[1]["patch"]["donor"] == "digits_rot90+digits_inv"
    for cmd, out in (("ptq", tmp_path / "q"), ("export", tmp_path / "q.safetensors")):
        argv = [cmd, patched, out, "--bits", "2", "--method", "gptq", "--calib-size", "8"]
        argv.append("--calib")
        says = ["--calib donor", "merged", "digits_rot90, digits_inv", "pass another --calib"]
        refused(capsys, tmp_path, [*argv, "donor"], says)
        err = refused(capsys, tmp_path, [*argv, "pretxt"], ["'pretxt'", "Did you mean: pretext?"])
        assert "pets" not in err
        refused(capsys, tmp_path, [*argv, "donr"], ["Did you mean: donor?"])
        refused(capsys, tmp_path, [*argv, "digts"], ["'digts'", "digits"])
        assert not out.exists()
    # the receiver keyword: the checkpoint's own task, labelled as receiver data
    said = run_ok(capsys, "ptq", patched, tmp_path / "r", "--bits", "2", "--method", "gptq",
                  "--calib", "receiver", "--calib-size", "8")  # fmt: skip
    assert "8 train images of task digits (the receiver's own task: receiver data, NOT" in said
