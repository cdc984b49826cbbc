"""Fine-tuning loop: the QAT step, accumulation, compile-once, resume, mesh, config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import qvec_jax as q
import qvec_jax.quant as quant
from qvec_jax import config as qconfig
from qvec_jax import train
from qvec_jax.models import vit
from qvec_jax.sharding import make_mesh, state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_tiny.py")


# The demo config shrunk to seconds: test/4 ViT, random init, digits, 8 steps.
TINY = [
    "model.variant=test/4",
    "task=digits",
    "batch_size=32",
    "total_steps=8",
    "checkpoint_every=3",
    "log_every=2",
    "optim.warmup_steps=2",
    "eval_batch_size=256",
]


def _tiny_cfg(**over):
    return qconfig.apply_overrides(qconfig.load_config(DEMO, TINY), list(over.items()))


def _setup_step(mode, accum=1, bits=2, batch=16, eps=1e-8):
    model = vit.create_model("test/4", num_classes=10, image_size=28)
    params = model.init_params(jax.random.key(0))
    # warmup 0: lr > 0 at step 0, so the first update is not a no-op.
    optim = qconfig.load_config(DEMO, ["optim.warmup_steps=0", f"optim.eps={eps}"]).optim
    tx, _ = train.make_optimizer(optim, total_steps=10)
    mesh = make_mesh()
    sh = state_shardings(train.abstract_state(params, tx), mesh)
    step = train.make_train_step(
        model, tx, mesh, sh, mode=mode, spec=quant.QuantSpec(bits), accum=accum
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, 28, 28, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    state = train.create_state(params, tx, sh)
    return model, tx, step, state, x, y


def _copy(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


# ------------------------------------------------------------------ config


def test_overrides_parse_literals_and_reject_typos():
    cfg = qconfig.load_config(
        DEMO, ["optim.lr=3e-4", "mode=qat", "quant.bits=3", "init.path=/x/y", "fsdp=True"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.mode == "qat" and cfg.quant.bits == 3
    assert cfg.init.path == "/x/y" and cfg.fsdp is True
    with pytest.raises(ValueError, match="optim.lr"):
        qconfig.load_config(DEMO, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="quant.bits"):
        qconfig.load_config(DEMO, ["quant.bits=three"])
    with pytest.raises(ValueError, match="key.sub=value"):
        qconfig.load_config(DEMO, ["nonsense"])
    with pytest.raises(FileNotFoundError, match="no_such.py"):
        qconfig.load_config("no_such.py")
    assert qconfig.diff(qconfig.load_config(DEMO), cfg) == [
        "fsdp",
        "init.path",
        "mode",
        "optim.lr",
        "quant.bits",
    ]


def test_paper_config_is_the_method_recipe():
    c = qconfig.load_config(os.path.join(ROOT, "configs", "paper_vit_b16.py"))
    assert (c.model.variant, c.model.image_size, c.seed) == ("B/16", 224, 2038)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps) == (1e-5, 0.1, 500)
    assert (c.optim.clip_norm, c.batch_size, c.label_smoothing) == (1.0, 128, 0.0)
    assert (c.quant.bits, c.quant.granularity, c.init.kind) == (3, "channel", "pretrained")
    assert c.epochs < 0 and c.total_steps < 0  # epochs from the task table
    assert train.accumulation_steps(128, c.device_batch_size, 1) == 4
    assert train.accumulation_steps(128, c.device_batch_size, 8) == 1


def test_validate_returns_the_quantspec_and_names_bad_fields():
    assert train.validate(_tiny_cfg(mode="qat")) == quant.QuantSpec(2, "channel")
    assert train.validate(_tiny_cfg(**{"quant.granularity": "tensor"})).granularity == "tensor"
    with pytest.raises(train.TrainError, match=r"quant\.granularity='row'.*one of"):
        train.validate(_tiny_cfg(**{"quant.granularity": "row"}))
    with pytest.raises(train.TrainError, match=r"quant\.bits=9.*2\.\.8"):
        train.validate(_tiny_cfg(**{"quant.bits": 9}))
    with pytest.raises(train.TrainError, match="mode=.*--mode"):
        train.validate(_tiny_cfg(mode="int8"))


# ------------------------------------------------------------------ the step


def test_qat_step_is_the_hand_computed_ste_update():
    # eps 1e-4: the key bias has an exactly-zero true gradient (softmax is shift
    # invariant), and Adam with eps 1e-8 would blow its float noise up to lr-sized steps.
    model, tx, step, state, x, y = _setup_step("qat", eps=1e-4)
    params0, opt0 = _copy(state["params"]), _copy(state["opt_state"])
    new, metrics = step(state, x, y)

    # By hand: the loss at the fake-quantized weights, differentiated w.r.t. those
    # weights (STE: that IS the gradient w.r.t. the latent weights), then the same optax.
    fq = quant.fake_quant_tree(params0, 2)
    ce = lambda p: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)
    )
    loss, grads = jax.jit(jax.value_and_grad(ce))(fq)
    apply = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    expect = apply(grads, opt0, params0)

    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new["params"], expect
    )
    assert int(new["step"]) == 1
    # ... and it is not the FP update (the test could fail).
    fp_loss = jax.jit(ce)(params0)
    assert abs(float(fp_loss) - float(loss)) > 1e-4


def test_qat_step_needs_a_quantspec():
    model = vit.create_model("test/4", num_classes=10, image_size=28)
    with pytest.raises(train.TrainError, match="QuantSpec"):
        train.make_train_step(model, optax.sgd(0.1), make_mesh(), None, mode="qat", spec=2)
    with pytest.raises(train.TrainError, match="not one of"):
        train.make_train_step(model, optax.sgd(0.1), make_mesh(), None, mode="int8")


def test_step_compiles_once_and_donates_state():
    _, _, step, state, x, y = _setup_step("qat")
    for _ in range(3):
        old = state["params"]["head"]["kernel"]
        state, m = step(state, x, y)
        assert old.is_deleted()  # donated
        x = x[::-1].copy()
    assert step._cache_size() == 1
    assert np.isfinite(float(m["loss"]))


def test_accumulated_step_equals_full_batch_step():
    _, _, full, s1, x, y = _setup_step("qat", accum=1, eps=1e-4)
    _, _, acc, s4, _, _ = _setup_step("qat", accum=4, eps=1e-4)
    a, ma = full(s1, x, y)
    b, mb = acc(s4, x, y)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6),
        a["params"],
        b["params"],
    )


def test_schedule_warmup_cosine_and_accumulation_steps():
    optim = ml_collections.ConfigDict(
        dict(lr=1e-3, weight_decay=0.1, warmup_steps=10, clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
    )
    _, sched = train.make_optimizer(optim, 100)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(55)) == pytest.approx(5e-4, rel=1e-3) and float(sched(100)) < 1e-9
    with pytest.raises(ValueError, match="warmup_steps"):
        train.make_optimizer(optim, 10)
    paper = qconfig.load_config(os.path.join(ROOT, "configs", "paper_vit_b16.py"))
    assert train.total_train_steps(paper, 45000, 6) == 2110  # CIFAR-10: 6 epochs at 128
    assert train.total_train_steps(qconfig.apply_overrides(paper, ["epochs=1.0"]), 45000, 6) == 352
    assert train.total_train_steps(qconfig.apply_overrides(paper, ["total_steps=7"]), 1, 6) == 7
    assert train.accumulation_steps(128, 32, 2) == 2
    assert train.accumulation_steps(96, 40, 1) == 3
    with pytest.raises(ValueError, match="divisible"):
        train.accumulation_steps(100, 0, 8)


# ------------------------------------------------------------------ whole runs


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(workdir):
    from qvec_jax import checkpoints

    return checkpoints.restore_params(os.path.join(workdir, "params"))


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """One uninterrupted 8-step QAT run on digits, through the CLI."""
    from qvec_jax.cli import main

    d = str(tmp_path_factory.mktemp("qat_run"))
    argv = ["finetune", "--config", DEMO, "--mode", "qat", "--workdir", d, "--no-progress"]
    rc = main(argv + TINY)
    assert rc == 0
    return d


def test_cli_run_writes_params_metrics_and_results(qat_run):
    params, meta = _params(qat_run)
    assert meta["mode"] == "qat" and meta["task"] == "digits" and meta["bits"] == 2
    assert meta["variant"] == "test/4" and meta["num_classes"] == 10 and meta["steps"] == 8
    assert meta["seed"] == 2038 and len(meta["backbone_id"]) == 12
    assert meta["config"]["optim"]["warmup_steps"] == 2
    rows = _metrics(qat_run)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all({"loss", "lr", "grad_norm", "examples_per_s"} <= set(r) for r in rows)
    with open(os.path.join(qat_run, "results.json")) as f:
        res = json.load(f)
    for split in ("val", "test"):
        assert 0.0 <= res[split]["fp"] <= 1.0 and 0.0 <= res[split]["ptq"] <= 1.0
    assert not os.path.exists(os.path.join(qat_run, "ckpt"))  # removed once finished


def test_interrupted_and_resumed_run_is_bit_identical(qat_run, tmp_path):
    cfg = _tiny_cfg(mode="qat")
    d = str(tmp_path / "resumed")
    out = train.finetune(cfg, d, stop_after=5, progress=False)
    assert out == {"stopped_at": 5, "total_steps": 8}
    # Simulate a crash after step 5 but before its checkpoint: only step 3 survives, and
    # metrics.jsonl holds records (steps 4, 5) that the resumed run must redo.
    shutil.rmtree(os.path.join(d, "ckpt", "5"))
    assert [r["step"] for r in _metrics(d)] == [2, 4, 5]
    train.finetune(cfg, d, progress=False)
    (a, _), (b, _) = _params(qat_run), _params(d)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # The same stream and the same per-step numbers (loss is a window mean, and the
    # resumed run's first window is shorter, so compare last-step quantities).
    keys = ("step", "lr", "grad_norm", "data_crc")
    pick = lambda rows: [[r[k] for k in keys] for r in rows]
    assert pick(_metrics(d)) == pick(_metrics(qat_run))


def test_fp_and_qat_start_equal_and_see_the_same_batches(qat_run, tmp_path):
    fp_cfg = _tiny_cfg(mode="fp")
    d = str(tmp_path / "fp")
    train.finetune(fp_cfg, d, progress=False)
    crc = lambda w: [r["data_crc"] for r in _metrics(w)]
    assert crc(d) == crc(qat_run)
    _, p_fp = train.build_model_and_params(fp_cfg, 10)
    _, p_qat = train.build_model_and_params(_tiny_cfg(mode="qat"), 10)
    jax.tree.map(np.testing.assert_array_equal, p_fp, p_qat)  # same init, head included
    (a, ma), (b, mb) = _params(d), _params(qat_run)
    assert ma["backbone_id"] == mb["backbone_id"]
    assert not np.array_equal(a["head"]["kernel"], b["head"]["kernel"])  # QAT did differ


def test_workdir_with_another_config_is_refused_unless_forced(qat_run, tmp_path):
    d = str(tmp_path / "w")
    shutil.copytree(qat_run, d)
    res = train.finetune(_tiny_cfg(mode="qat"), d, progress=False)  # finished: not redone
    assert res["steps"] == 8 and "val" in res
    other = _tiny_cfg(mode="qat", **{"optim.lr": 3e-4})
    with pytest.raises(train.TrainError, match=r"optim\.lr.*--force"):
        train.finetune(other, d, progress=False)
    # the demo's own section is not part of a run's identity: not refused, not redone
    demo_only = _tiny_cfg(mode="qat", **{"demo.select_strategy": "lam=1"})
    assert train.finetune(demo_only, d, progress=False) == res
    out = train.finetune(other, d, force=True, stop_after=1, progress=False)
    assert out["stopped_at"] == 1
    assert not os.path.exists(os.path.join(d, "results.json"))
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["optim"]["lr"] == 3e-4


_MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import _tiny_cfg
    from qvec_jax import checkpoints, train
    assert jax.device_count() == 8, jax.devices()
    for name, fsdp in (("dp", False), ("fsdp", True)):
        d = {out!r} + "/" + name
        train.finetune(_tiny_cfg(mode="qat", fsdp=fsdp), d, progress=False)
    """
)


@pytest.mark.slow
def test_eight_host_devices_match_one_device(qat_run, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = _MESH_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, _ = _params(qat_run)
    for name in ("dp", "fsdp"):
        b, _ = _params(str(tmp_path / name))
        flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
        for path, y in jax.tree_util.tree_flatten_with_path(b)[0]:
            if jax.tree_util.keystr(path).endswith("['key']['bias']"):
                # Its true gradient is exactly 0 (softmax is shift invariant): Adam turns
                # the float noise, which depends on the reduction order, into lr-sized steps.
                continue
            np.testing.assert_allclose(
                flat_a[path], y, rtol=1e-3, atol=1e-4, err_msg=f"{name} {path}"
            )


@pytest.mark.slow
def test_basic_effect_qat_survives_2bit_ptq_and_fp_does_not(tmp_path):
    """The embedded default (digits, tiny ViT, 2 bits): QAT's post-PTQ test accuracy beats
    FP's by a clear margin (prints the numbers)."""
    over = {"total_steps": 150, "batch_size": 32, "log_every": 50, "checkpoint_every": 150}
    over.update({"optim.lr": 1e-3, "optim.head_lr_mult": 1.0})  # from scratch, not a fine-tune
    res = {}
    for mode in ("fp", "qat"):
        cfg = qconfig.apply_overrides(qconfig.load_config(DEMO), [("mode", mode), *over.items()])
        res[mode] = train.finetune(cfg, str(tmp_path / mode), progress=False)
    print({m: r["test"] for m, r in res.items()})
    assert res["fp"]["test"]["fp"] > 0.8  # FP trained fine ...
    assert res["fp"]["test"]["ptq"] < res["fp"]["test"]["fp"] - 0.2  # ... and 2-bit PTQ breaks it
    assert res["qat"]["test"]["ptq"] > res["fp"]["test"]["ptq"] + 0.2  # QAT survives PTQ


def test_paper_recipe_without_checkpoint_says_where_to_get_it(tmp_path):
    cfg = qconfig.load_config(
        os.path.join(ROOT, "configs", "paper_vit_b16.py"),
        ["task=digits", "total_steps=1000", f"init.path={tmp_path / 'missing.npz'}"],
    )
    with pytest.raises(train.TrainError, match=r"init\.path=.*missing\.npz.*ViT-B_16\.npz"):
        train.finetune(cfg, str(tmp_path / "w"), progress=False)


def test_head_lr_mult_scales_only_the_head_update():
    """optim.head_lr_mult multiplies the head's AdamW update (trees.HEAD_RULE) and nothing else."""
    params = {
        "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
        "Transformer": {"encoder_norm": {"scale": jnp.ones(3)}},
    }
    grads = jax.tree.map(lambda x: 0.5 * x, params)

    def update(mult):
        optim = ml_collections.ConfigDict(
            dict(
                lr=1e-3,
                head_lr_mult=mult,
                weight_decay=0.1,
                warmup_steps=0,
                clip_norm=1.0,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
            )
        )
        tx, _ = train.make_optimizer(optim, total_steps=10)
        state = tx.init(params)
        for _ in range(2):  # past the zero-lr first step of the schedule
            u, state = tx.update(grads, state, params)
        return u

    base, scaled = update(1.0), update(10.0)
    np.testing.assert_allclose(scaled["head"]["kernel"], 10 * base["head"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(scaled["head"]["bias"], 10 * base["head"]["bias"], rtol=1e-6)
    np.testing.assert_array_equal(
        scaled["Transformer"]["encoder_norm"]["scale"], base["Transformer"]["encoder_norm"]["scale"]
    )
    assert np.all(np.asarray(base["head"]["kernel"]) != 0)
    # Exactly the definition: the mult=1 update, times mult on the HEAD_RULE leaves only
    # (the multiplier is the last transform, so it feeds nothing back into AdamW's state).
    by_hand = {
        p: np.float32(10.0) * np.asarray(u) if q.HEAD_RULE.match(p) else np.asarray(u)
        for p, u in q.flatten(base).items()
    }
    for p, u in q.flatten(scaled).items():
        assert u.dtype == by_hand[p].dtype, p
        np.testing.assert_array_equal(np.asarray(u), by_hand[p], err_msg=p)


def test_head_mask_selects_head_and_pre_logits_only():
    model = vit.create_model("test/4", num_classes=10, image_size=28, representation_size=8)
    params = model.abstract_params()
    mask = q.flatten(train.head_mask(params))
    assert {p for p, m in mask.items() if m} == {
        "head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias"
    }  # fmt: skip
    assert len(mask) == len(q.flatten(params))


def test_a_backbones_architecture_fields_reach_the_fine_tunes_meta(qat_run, tmp_path):
    """A backbone imported with a non-default epsilon (HF ViTs say 1e-12) is fine-tuned with
    it, and the final meta says so, so ``model_from_meta`` rebuilds the trained model; a
    default backbone's meta carries no architecture keys (its metas stay as they were)."""
    from qvec_jax import checkpoints

    _, meta = _params(qat_run)
    assert not set(checkpoints.ARCH_KEYS) & set(meta)
    model = vit.create_model("test/4", num_classes=3, image_size=28, layer_norm_eps=1e-12)
    backbone = tmp_path / "backbone"
    checkpoints.save_params(backbone, vit.init_params(model, jax.random.key(1)),
                            checkpoints.model_meta(model))  # fmt: skip
    cfg = _tiny_cfg(mode="fp", total_steps=3, **{"init.kind": "pretrained",
                                                "init.path": str(backbone)})  # fmt: skip
    train.finetune(cfg, str(tmp_path / "ft"), progress=False)
    params, meta = _params(str(tmp_path / "ft"))
    assert meta["layer_norm_eps"] == 1e-12 and "activation" not in meta
    assert checkpoints.model_from_meta(meta).layer_norm_eps == 1e-12
