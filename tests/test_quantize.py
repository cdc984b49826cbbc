"""The data-free quantizer a user deploys (``recipe.quantize_model``, ``qvec quantize``),
checked against the definitions: each recipe's tree equals ``packing.quantize`` /
``gptq.gptq_quantize`` of (``trees.patch`` of) the FP params on the images its
calibration names; the default recipe and its fallbacks follow ``DEV_RANKING``; the
CLI's export is that tree, ``qvec eval`` reads it, and the console names the data on one
line. A timm-layout checkpoint goes through ``qvec convert`` and ``qvec quantize``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_cli_methods import run_ok
from test_cli_safety import refused
from vit_layouts import random_params, to_timm

import qvec_jax as q
from qvec_jax import bank, checkpoints, cli, gptq, packing, recipe, select, trees
from qvec_jax.data import overlap
from qvec_jax.export import flatten_q
from qvec_jax.recipe import Recipe, RecipeError

IMAGE = 16
N = 8  # calibration images: small and fast
META = {"variant": "test/4", "num_classes": 10, "image_size": IMAGE, "backbone_id": "b0"}
PRETEXT = "digits_flip"


def _nudge(params, seed, scale):
    rng = np.random.default_rng(seed)
    return q.unflatten({p: x + scale * rng.normal(0, 0.05, x.shape).astype(np.float32)
                        for p, x in q.flatten(params).items()})  # fmt: skip


def _bank(root: Path, name: str, base, tasks, *, bits=2, config=None, backbone="b0") -> Path:
    """A bank of QAT/FP donors of ``tasks`` (saved checkpoints), written to root/name."""
    pairs = []
    for i, task in enumerate(tasks):
        fp = _nudge(base, 30 + i, 0.2)
        metas = []
        for mode, tree in (("fp", fp), ("qat", _nudge(fp, 40 + i, 0.3))):
            meta = {**META, "backbone_id": backbone, "task": task, "mode": mode, "bits": bits,
                    "granularity": "channel"} | ({"config": config} if config else {})  # fmt: skip
            path = root / f"{name}_{task}_{mode}"
            checkpoints.save_params(path, tree, meta)
            metas.append(((tree, meta), str(path)))
        (fpm, fpp), (qatm, qatp) = metas
        pairs.append(bank.DonorPair(qat=qatm, fp=fpm, qat_path=qatp, fp_path=fpp))
    path = root / f"{name}.safetensors"
    bank.save_bank(bank.build_bank(pairs, method="ties"), path)
    return path


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """A pretext checkpoint (task digits_flip); the receiver's FP fine-tune of it (task
    digits; its config names the pretext); the same params with no config (``plain_fp``);
    banks: ``bank`` (2-bit, 2 donors, pretext known), ``bank3`` (3-bit), ``nopre`` (2-bit,
    no pretext known), ``other`` (another backbone)."""
    root = tmp_path_factory.mktemp("quantize")
    _, base = random_params(0, num_classes=10, image_size=IMAGE)
    checkpoints.save_params(root / "pretext", base, {**META, "task": PRETEXT, "mode": "fp"})
    config = {"init": {"kind": "pretrained", "path": str(root / "pretext")}}
    fp = _nudge(base, 1, 0.2)
    checkpoints.save_params(root / "digits_fp", fp, {**META, "task": "digits", "mode": "fp",
                                                     "config": config})  # fmt: skip
    checkpoints.save_params(root / "plain_fp", fp, {**META, "task": "digits", "mode": "fp"})
    _bank(root, "bank", base, ("digits_rot90", "digits_inv"), config=config)
    _bank(root, "bank3", base, ("digits_rot90",), bits=3, config=config)
    _bank(root, "nopre", base, ("digits_rot90",))
    _bank(root, "other", base, ("digits_rot90",), backbone="b1")
    return root


@pytest.fixture(scope="module")
def fp(ck):
    return checkpoints.restore_params(ck / "digits_fp")


def assert_same_qtree(a, b):
    fa, fb = flatten_q(a), flatten_q(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        x, y = fa[p], fb[p]
        if isinstance(x, packing.QTensor):
            assert (x.shape, x.dtype, x.bits) == (y.shape, y.dtype, y.bits), p
            np.testing.assert_array_equal(np.asarray(x.packed), np.asarray(y.packed), err_msg=p)
            np.testing.assert_array_equal(np.asarray(x.scale), np.asarray(y.scale), err_msg=p)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def assert_trees_equal(a, b):
    fa, fb = q.flatten(a), q.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def by_definition(r: Recipe, params, meta, b=None, lam=1.0, pretext=PRETEXT, bits=2):
    """A recipe's tree, by its definition (module docstring)."""
    tree = trees.patch(params, b.qv, lam) if r.bank else params
    if r.calib == "none":
        return packing.quantize(tree, bits)
    if r.calib == "noise":
        images = select.noise_images(N, IMAGE)
    else:
        images = select.train_images(pretext, N, image_size=IMAGE)
    return gptq.gptq_quantize(tree, checkpoints.model_from_meta(meta), images, bits)


# ----------------------------------------------------------------------------- recipes


def test_recipe_names_and_the_data_each_uses():
    cases = [
        (Recipe(False, "none"), "rtn", "none"),
        (Recipe(True, "none"), "rtn+bank", "donor QAT (the bank)"),
        (Recipe(False, "noise"), "gptq:noise", "none"),
        (Recipe(True, "noise"), "gptq+bank:noise", "donor QAT (the bank)"),
        (Recipe(False, "pretext"), "gptq:pretext", "pretext images"),
        (Recipe(True, "pretext"), "gptq+bank:pretext", "donor QAT (the bank) + pretext images"),
        (Recipe(True, "none", 0.5), "rtn+bank@0.5", "donor QAT (the bank)"),
        (Recipe(True, "noise", "norm-ratio"), "gptq+bank:noise@norm-ratio",
         "donor QAT (the bank)"),
        (Recipe(True, "none", "proxy-pretext-kl"), "rtn+bank@proxy-pretext-kl",
         "donor QAT (the bank) + pretext images"),
    ]  # fmt: skip
    for r, name, data in cases:
        assert (r.name, r.data) == (name, data)
    assert Recipe(False, "none").method == "rtn" and Recipe(True, "noise").method == "gptq"
    for bad, says in [
        (dict(bank=False, calib="none", lam=0.5), "bank's lambda"),
        (dict(bank=True, calib="noise", lam="proxy-donor-kl"), "reads donor data"),
        (dict(bank=True, calib="noisy"), "use one of none, noise, pretext"),
        (dict(bank=True, calib="noise", lam="no-such"), "unknown lambda strategy"),
        (dict(bank=True, calib="noise", lam=float("nan")), "lam"),
    ]:
        with pytest.raises(ValueError, match=says):
            Recipe(**bad)


def test_the_default_is_the_dev_ranking_head_and_fallbacks_follow_it():
    for b in recipe.DEV_RANKING:
        assert recipe.DEFAULT_RECIPES[b] == recipe.DEV_RANKING[b][0]
        assert {r.name for r in recipe.DEV_RANKING[b]} >= {"rtn", "gptq:noise"}  # always fit
    for bits, have_bank, have_pretext, calib, fixed in itertools.product(
        (2, 3, 4, 8), (True, False), (True, False), (None, *recipe.CALIBS), (None, True, False)
    ):
        b = recipe.ranked_bits(bits)
        want = [r for r in recipe.DEV_RANKING[b] if (have_bank or not r.bank)
                and (have_pretext or r.calib != "pretext") and calib in (None, r.calib)
                and fixed in (None, r.bank)]  # fmt: skip
        kw = dict(have_bank=have_bank, have_pretext=have_pretext, calib=calib, bank=fixed)
        if not want:
            with pytest.raises(RecipeError, match="pass pretext=|bank="):
                recipe.default_recipe(bits, **kw)
            continue
        got, why = recipe.choose_recipe(bits, **kw)
        assert got == want[0], (bits, kw)
        assert bits == b or f"(the nearest measured to {bits} bits)" in why
    assert recipe.ranked_bits(8) == 3 and recipe.ranked_bits(4) == 3 and recipe.ranked_bits(3) == 3
    with pytest.raises(RecipeError, match="calib 'noisy'"):
        recipe.default_recipe(3, have_bank=True, have_pretext=True, calib="noisy")


# ----------------------------------------------------------------------------- definitions


def test_rtn_recipes_are_packing_quantize_of_fp_and_of_fp_plus_the_bank(ck, fp):
    params, meta = fp
    got, rec = recipe.quantize_model(params, bits=2, calib="none")
    assert_same_qtree(got, packing.quantize(params, 2))
    assert rec["recipe"] == "rtn" and rec["bank"] is None and rec["calib"] is None
    assert (rec["method"], rec["data"], rec["receiver_data"]) == ("rtn", "none", False)
    assert rec["chosen_on"] == recipe.USER_CHOICE
    b = bank.load_bank(ck / "bank.safetensors")
    got, rec = recipe.quantize_model(params, bits=2, calib="none", bank=ck / "bank.safetensors",
                                     lam=1.0, meta=meta)  # fmt: skip
    assert_same_qtree(got, packing.quantize(trees.patch(params, b.qv, 1.0), 2))
    assert rec["recipe"] == "rtn+bank" and rec["data"] == "donor QAT (the bank)"
    assert rec["bank"] == {"checksum": b.checksum, "donors": ["digits_rot90", "digits_inv"],
                           "merge": b.provenance["merge"], "lam": 1.0}  # fmt: skip
    got, rec = recipe.quantize_model(params, bits=2, calib="none", bank=b, lam=0.5)
    assert_same_qtree(got, packing.quantize(trees.patch(params, b.qv, 0.5), 2))
    assert rec["recipe"] == "rtn+bank@0.5" and rec["bank"]["lam"] == 0.5


def test_gptq_recipes_are_gptq_of_fp_and_of_fp_plus_the_bank(ck, fp):
    params, meta = fp
    model = checkpoints.model_from_meta(meta)
    got, rec = recipe.quantize_model(params, bits=2, calib="noise", calib_size=N, meta=meta)
    assert_same_qtree(got, gptq.gptq_quantize(params, model, select.noise_images(N, IMAGE), 2))
    assert rec["recipe"] == "gptq:noise" and rec["data"] == "none"
    assert rec["calib"] == {
        "source": "noise",
        "task": None,
        "n": N,
        "seed": 0,
        "label": f"{N} synthetic noise images (no data)",
        "overlap": None,
    }
    assert {"hessians", "quantize", "gptq", "total"} <= set(rec["seconds"])
    b = bank.load_bank(ck / "bank.safetensors")
    got, rec = recipe.quantize_model(params, bits=2, calib="pretext", bank=b, lam=1.0,
                                     model=model, calib_size=N, meta=meta)  # fmt: skip
    images = select.train_images(PRETEXT, N, image_size=IMAGE)  # the bank's pretext task
    assert_same_qtree(got, gptq.gptq_quantize(trees.patch(params, b.qv, 1.0), model, images, 2))
    assert rec["recipe"] == "gptq+bank:pretext"
    assert rec["data"] == "donor QAT (the bank) + pretext images"
    assert rec["calib"]["task"] == PRETEXT and rec["calib"]["overlap"] == overlap.zero_counts()
    assert rec["calib"]["label"] == f"{N} pretext images of {PRETEXT} (0 of the receiver's images)"


def test_the_default_recipe_is_its_definition_and_says_it_was_chosen_on_dev(ck, fp):
    params, meta = fp
    b = bank.load_bank(ck / "bank.safetensors")
    for given, have_pretext in (({"bank": b}, True), ({}, False)):
        got, rec = recipe.quantize_model(params, bits=2, calib_size=N, meta=meta, **given)
        r = recipe.default_recipe(2, have_bank=bool(given), have_pretext=have_pretext)
        assert rec["recipe"] == r.name and rec["chosen_on"] == recipe.DEV_CHOICE
        assert_same_qtree(got, by_definition(r, params, meta, b))
    got, rec = recipe.quantize_model(params, bits=8, calib="none", bank=None)
    assert rec["why"] == (
        "the dev ranking at 3 bits (the nearest measured to 8 bits): its "
        "first recipe with calib='none' that fits"
    )


def test_a_lambda_strategy_picks_lam_and_records_its_choice(ck, fp):
    params, meta = fp
    b = bank.load_bank(ck / "bank.safetensors")
    got, rec = recipe.quantize_model(params, bits=2, calib="none", bank=b, lam="norm-ratio")
    want = select.select_lambda(params, b.qv, 2, strategy="norm-ratio")
    assert rec["bank"]["lam"] == want.lam and rec["bank"]["lam_choice"] == want.to_dict()
    assert_same_qtree(got, packing.quantize(trees.patch(params, b.qv, want.lam), 2))
    assert rec["recipe"] == "rtn+bank@norm-ratio"


def test_user_images_are_labelled_and_may_be_the_receivers(fp):
    params, meta = fp
    x = np.asarray(select.noise_images(4, IMAGE, seed=3))
    got, rec = recipe.quantize_model(params, bits=3, calib_images=x, meta=meta)
    want = gptq.gptq_quantize(params, checkpoints.model_from_meta(meta), x, 3)
    assert_same_qtree(got, want)
    assert rec["recipe"] == "gptq:user" and rec["data"] == "user images"
    assert rec["receiver_data"] is True and rec["calib"]["n"] == 4


def test_pretext_images_that_hold_receiver_images_are_flagged(fp):
    params, meta = fp
    _, rec = recipe.quantize_model(params, bits=2, calib="pretext", pretext="digits_a",
                                   calib_size=64, meta=meta)  # fmt: skip
    want = overlap.overlap_counts("digits_a", 64, "digits")
    assert overlap.has_overlap(want) and rec["calib"]["overlap"] == want
    assert rec["receiver_data"] is True and "NOT zero-shot" in rec["calib"]["label"]


def test_refusals_say_what_to_pass(ck, fp):
    params, meta = fp
    cases = [
        (dict(bank=ck / "bank3.safetensors"),
         "bank built for 3-bit channel QAT; pass bits=3 or build a bank of 2-bit donors"),
        (dict(bank=ck / "bank.safetensors", granularity="tensor"), "pass granularity=channel"),
        (dict(bank=ck / "other.safetensors", meta=meta), "backbone_id"),
        (dict(calib="pretext", meta=meta), "pass pretext="),
        (dict(calib="pretext", bank=ck / "nopre.safetensors", meta=meta), "pass pretext="),
        (dict(calib="noise"), "pass model="),
        (dict(calib="none", lam=0.5), "pass bank= too"),
        (dict(calib="none", bank=ck / "nopre.safetensors", lam="proxy-pretext-kl"),
         "reads pretext images: pass pretext="),
        (dict(calib="noise", calib_images=np.zeros((2, IMAGE, IMAGE, 3))), "once"),
        (dict(bank=ck / "missing.safetensors"), "missing.safetensors"),
    ]  # fmt: skip
    for kw, says in cases:
        with pytest.raises(ValueError, match=says.replace("(", r"\(")):
            recipe.quantize_model(params, bits=2, **kw)


def test_the_package_root_exports_the_quantizer():
    assert q.quantize_model is recipe.quantize_model and q.Recipe is Recipe


# ----------------------------------------------------------------------------- CLI


def data_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("data used:")]
    assert len(lines) == 1, out
    return lines[0]


def test_cli_quantize_writes_the_library_tree_and_eval_reads_it(capsys, ck, fp, tmp_path):
    params, meta = fp
    f, b = tmp_path / "m.safetensors", ck / "bank.safetensors"
    out = run_ok(capsys, "quantize", ck / "digits_fp", f, "--bits", "2", "--bank", b,
                 "--calib-size", N)  # fmt: skip
    want, rec = recipe.quantize_model(params, bits=2, bank=b, calib_size=N, meta=meta,
                                      pretext=PRETEXT)  # fmt: skip
    got, gmeta = checkpoints.restore_params(f)
    assert_trees_equal(got, q.dequantize(want))
    stored = gmeta["quantize"]
    assert {k: v for k, v in stored.items() if k != "seconds"} == {
        k: v for k, v in rec.items() if k != "seconds"
    }
    assert gmeta["ptq"]["packed"] is True and gmeta["ptq"]["method"] == rec["method"]
    assert f"recipe: {rec['recipe']} (2-bit channel); chosen on {recipe.DEV_CHOICE}" in out
    parts = [f"donor QAT weights (bank {b}: 2 donors)"] if rec["bank"] else []
    if rec["bank"] is None:  # the dev ranking's head takes no bank: the console says so
        assert f"bank {b} given but not used: {rec['recipe']} ranks above" in out
    if rec["calib"] and rec["calib"]["source"] == "pretext":
        parts.append(f"{N} pretext images of {PRETEXT} (0 of the receiver's images)")
    line = data_line(out)
    assert line.startswith("data used: " + " + ".join(parts)), line
    assert f"wrote {f}" in out and "bytes on disk" in out
    checkpoints.save_params(tmp_path / "deq", got, meta)
    run_ok(capsys, "eval", f, "--splits", "test", "--json", tmp_path / "a.json")
    run_ok(capsys, "eval", tmp_path / "deq", "--splits", "test", "--json", tmp_path / "b.json")
    a, c = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["test"] == c["test"] and a["n_test"] == c["n_test"] > 0
    assert a["quantized"]["packed"] is True


def test_cli_rtn_uses_no_data_and_noise_is_no_data(capsys, ck, fp, tmp_path):
    params, _ = fp
    out = run_ok(capsys, "quantize", ck / "plain_fp", tmp_path / "r.safetensors", "--bits", "3",
                 "--calib", "none")  # fmt: skip
    assert data_line(out) == "data used: none"
    got, gmeta = checkpoints.restore_params(tmp_path / "r.safetensors")
    assert_trees_equal(got, q.ptq(params, 3))
    assert gmeta["quantize"]["recipe"] == "rtn" and gmeta["quantize"]["data"] == "none"
    out = run_ok(capsys, "quantize", ck / "plain_fp", tmp_path / "n.safetensors", "--bits", "2",
                 "--calib-size", N)  # fmt: skip
    r = recipe.default_recipe(2, have_bank=False, have_pretext=False)
    assert f"recipe: {r.name} " in out and "needs" in out
    if r.calib == "noise":
        line = f"data used: none (GPTQ calibrated on {N} synthetic noise images, no data)"
        assert data_line(out) == line


def test_cli_refusals_name_the_option_and_write_nothing(capsys, ck, tmp_path):
    fp, out = ck / "digits_fp", ck / "never.safetensors"
    base = ["quantize", fp, out]
    refused(capsys, ck, [*base, "--bits", "2", "--bank", ck / "other.safetensors"],
            ["--bank", "other.safetensors", "backbone_id"])  # fmt: skip
    refused(
        capsys,
        ck,
        [*base, "--bits", "2", "--bank", ck / "bank3.safetensors"],
        ["bank built for 3-bit channel QAT; pass --bits 3 or build a bank of 2-bit donors"],
    )
    refused(capsys, ck, [*base, "--bits", "5"], ["--bits", "use 2, 3 or 4"],
            code=cli.EXIT_USAGE)  # fmt: skip
    refused(capsys, ck, ["quantize", ck / "plain_fp", out, "--bits", "2", "--calib", "pretext"],
            ["--calib pretext", "pass --calib noise"])  # fmt: skip
    refused(capsys, ck, [*base, "--bits", "2", "--lam", "0.5"], ["--lam", "--bank"])
    refused(capsys, ck, [*base, "--bits", "2", "--bank", ck / "bank.safetensors", "--lam",
                         "proxy-donor-kl"], ["--lam", "donor"])  # fmt: skip
    refused(capsys, ck, [*base, "--bits", "2", "--bank", ck / "missing.safetensors"],
            ["--bank", "missing.safetensors"])  # fmt: skip
    refused(capsys, ck, ["quantize", ck / "bank.safetensors", out, "--bits", "2"],
            ["bank.safetensors"])  # fmt: skip
    bank_file = ck / "bank.safetensors"
    refused(capsys, ck, [*base[:2], bank_file, "--bits", "2", "--bank", bank_file, "--overwrite"],
            [str(bank_file), "would overwrite input"])  # fmt: skip
    refused(capsys, ck, [*base[:2], ck, "--bits", "2"], ["is a directory"])
    assert not out.exists()
    made = tmp_path / "w2.safetensors"
    run_ok(capsys, "quantize", fp, made, "--bits", "2", "--calib", "none")
    refused(capsys, tmp_path, ["quantize", made, tmp_path / "again.safetensors", "--bits", "2"],
            [str(made), "a packed export (2-bit, rtn, channel)", "already quantized"])  # fmt: skip


def test_help_ends_with_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example:" in text and "qvec quantize " in text


def test_real_weights_path_convert_a_timm_checkpoint_then_quantize(capsys, tmp_path):
    """A timm-layout ViT file -> `qvec convert` -> `qvec quantize --calib noise`: the export
    loads and equals the library call on the converted params."""
    _, params0 = random_params(3, num_classes=10)  # 28 px, as timm files of test/4 are
    src = tmp_path / "timm.safetensors"
    save_file(to_timm(params0), str(src))
    run_ok(capsys, "convert", src, tmp_path / "conv")
    f = tmp_path / "w3.safetensors"
    out = run_ok(capsys, "quantize", tmp_path / "conv", f, "--bits", "3", "--calib", "noise",
                 "--calib-size", N)  # fmt: skip
    assert data_line(out).startswith("data used: none (GPTQ calibrated on 8 synthetic noise")
    params, meta = checkpoints.restore_params(tmp_path / "conv")
    want, rec = recipe.quantize_model(params, bits=3, calib="noise", calib_size=N, meta=meta)
    model = checkpoints.model_from_meta(meta)
    assert_same_qtree(want, gptq.gptq_quantize(params, model, select.noise_images(N, 28), 3))
    got, gmeta = checkpoints.restore_params(f)
    assert_trees_equal(got, q.dequantize(want))
    assert gmeta["quantize"]["recipe"] == "gptq:noise" and gmeta["variant"] == "test/4"
