"""Lambda selection (issue 13): the tie rule, the weight-only signals and the proxy
measures against NumPy definitions, determinism, data isolation (poisoned undeclared
inputs), and lambda = 0 for a QV made harmful on purpose.

A tiny ViT ("demo/4", 16x16) is trained briefly on scikit-learn digits (FP), then
fine-tuned with 2-bit QAT from FP (QAT); ``QV = QAT - FP`` helps ``PTQ(FP)``, so the
self pair shows what a helpful QV and its harmful variants do to each strategy.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import finetune_of, vit_tree
from hypothesis import given
from hypothesis import strategies as st
from test_quant import np_quant, reduce_of

import qvec_jax as q
from qvec_jax import data, quant
from qvec_jax import select as sel
from qvec_jax.models import vit

SPEC = quant.QuantSpec(2)
N = 64  # proxy inputs per strategy in these tests (one compiled shape)


def _train(model, params, images, labels, *, steps, lr, qat, seed):
    tx = optax.adam(lr)

    @jax.jit
    def step(p, o, x, y):
        def loss(p):
            pp = quant.fake_quant_tree(p, SPEC, ste=True) if qat else p
            logits = model.apply({"params": pp}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        u, o = tx.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, u), o

    o = tx.init(params)
    for idx in np.random.default_rng(seed).integers(0, len(labels), (steps, 32)):
        params, o = step(params, o, images[idx], labels[idx])
    return params


@pytest.fixture(scope="module")
def pair():
    """FP and a 2-bit QAT fine-tune of it on digits; their QV; proxy and val inputs."""
    model = vit.create_model("demo/4", num_classes=10, image_size=16)
    tr = data.load_split("digits", "train", image_size=16)
    va = data.load_split("digits", "val", image_size=16)
    x, y = jnp.asarray(tr.images), jnp.asarray(tr.labels)
    fp = _train(model, model.init_params(0), x, y, steps=100, lr=2e-3, qat=False, seed=0)
    qat = _train(model, fp, x, y, steps=30, lr=5e-4, qat=True, seed=1)
    inputs = {
        "donor": tr.images[:N],
        "pretext": tr.images[N : 2 * N],
        "unlabelled receiver": va.images,
        "labelled receiver": (va.images, va.labels),
    }
    return model, fp, q.quantization_vector(qat, fp), inputs


def proxies(n=N):
    return [sel.Proxy(d, m, n=n) for d in sel.PROXY_KINDS for m in sel.MEASURES]


# ------------------------------------------------------------------ the tie rule


def test_pick_highest_then_nearest_one_then_smaller():
    c = sel.CANDIDATES
    assert sel.pick(c, [0.0] * len(c)) == 1.0  # all tied: lam = 1
    s = [0.0] * len(c)
    s[c.index(0.9)] = s[c.index(1.05)] = 0.5  # |0.9-1| > |1.05-1|
    assert sel.pick(c, s) == 1.05
    assert sel.pick((0.9, 1.1), (0.5, 0.5)) == 0.9  # same distance: the smaller lam
    assert sel.pick(c, [None] * len(c)) == 0.0  # nothing comparable: do not patch
    assert sel.pick((0.0, 1.0), (float("nan"), -5.0)) == 1.0  # NaN never wins


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75]), min_size=12, max_size=12))
def test_val_best_is_the_argmax_with_the_tie_rule(acc):
    c = list(sel.CANDIDATES)
    choice = sel.choose(sel.ValBest(), {"candidates": c, "val": {"n": 4, "acc": acc}})
    best = [lam for lam, a in zip(c, acc) if a == max(acc)]
    assert choice.lam == min(best, key=lambda lam: (abs(lam - 1), lam))
    assert choice.scores == tuple(acc) and choice.data == "labelled receiver"


# ------------------------------------------------------------------ names and tunable constants


def test_a_name_with_constants_round_trips_and_refuses_unknown_ones():
    s = sel.get_strategy("proxy-pretext-kl:margin=0.2")
    assert (s.family, s.margin, s.name) == ("proxy-pretext-kl", 0.2, "proxy-pretext-kl:margin=0.2")
    assert sel.get_strategy("proxy-pretext-kl:margin=0").name == "proxy-pretext-kl"  # default
    for name in ("norm-ratio:multiple=0.5", "alignment:scale=2", "model-stock:k=3",
                 "proxy-donor64-cos:margin=0.1", "lam=1"):  # fmt: skip
        assert sel.get_strategy(name).name == name
        assert sel.get_strategy(sel.get_strategy(name).name) == sel.get_strategy(name)
    assert sel.split_name("a:x=1:y=2.5") == ("a", {"x": 1.0, "y": 2.5})
    odd = sel.get_strategy("proxy-pretext-kl:margin=0.123456789")  # names are exact
    assert odd.name == "proxy-pretext-kl:margin=0.123456789" and sel.get_strategy(odd.name) == odd
    rec = {"candidates": [0.5, 1.0], "proxy/noise/n=256/seed=0/res=8": {"n": 1, "kl": [None] * 2}}
    assert sel.choose("proxy-noise-kl:margin=0.05", rec).lam == 0.0  # nothing comparable
    for name, msg in [
        ("proxy-noise-kl:n=32", "no constant 'n' \\(tunable: margin\\)"),
        ("lam=1:x=1", "no constant 'x' \\(tunable: none\\)"),
        ("norm-ratio:multiple", "write constants as ':name=finite number'"),
        ("proxy-noise-kl:margin=1.5", "margin must be in \\[0, 1\\)"),
        ("norm-ratio:multiple=nan", "finite number"),
        ("model-stock:k=0.5", "k must be finite and >= 1"),
    ]:
        with pytest.raises(sel.SelectError, match=msg):
            sel.get_strategy(name)
    measured = [sel.NormRatio(), sel.Proxy("donor", "kl", n=64)]
    assert sel.get_strategy("proxy-donor64-kl:margin=0.3", measured).n == 64
    with pytest.raises(sel.SelectError, match="unknown lambda strategy 'alignment'"):
        sel.get_strategy("alignment", measured)  # not among the measured families


@given(
    st.lists(st.floats(0.0, 2.0), min_size=12, max_size=12),
    st.sampled_from([0.0, 0.1, 0.3, 0.6]),
    st.sampled_from(sel.MEASURES),
)
def test_proxy_margin_stays_at_one_unless_clearly_closer(values, margin, measure):
    c = list(sel.CANDIDATES)
    if measure != "kl":  # agreement and cosine: higher is closer, distance 1 - value
        values = [1.0 - v / 2 for v in values]
    rec = {"candidates": c, "proxy/noise/n=256/seed=0/res=8": {"n": 8, measure: values}}
    plain = sel.choose(sel.Proxy("noise", measure), rec)
    got = sel.choose(sel.Proxy("noise", measure, margin=margin), rec)
    dist = [v if measure == "kl" else 1.0 - v for v in values]
    d1, db = dist[c.index(1.0)], dist[c.index(plain.lam)]
    assert got.lam == (plain.lam if db < (1 - margin) * d1 or margin == 0 else 1.0)
    assert got.scores == plain.scores  # the margin changes the pick, never the scores
    assert got.strategy == sel.Proxy("noise", measure, margin=margin).name


# ------------------------------------------------------------------ weight-only signals


def _np_weight_stats(fp, qv, lams):
    sel_ = SPEC.rule.select(fp)
    fr, fv = q.flatten(fp), q.flatten(qv)
    qn2 = rn2 = dot = 0.0
    rtn2 = np.zeros(len(lams))
    for p, axes in sel_.items():
        w, v = np.asarray(fr[p], np.float32), np.asarray(fv[p], np.float32)
        red = reduce_of(w.ndim, "channel", axes)
        r = np_quant(w, 2, red)[2] - w
        qn2, rn2, dot = qn2 + np.sum(v * v), rn2 + np.sum(r * r), dot + np.sum(v * r)
        for i, lam in enumerate(lams):
            pw = w + np.float32(lam) * v
            rtn2[i] += np.sum((np_quant(pw, 2, red)[2] - pw) ** 2)
    return np.sqrt(qn2), np.sqrt(rn2), dot, np.sqrt(rtn2)


def _qv_along_residual(fp, a=0.8, noise=0.5, seed=0):
    """A QV whose kernels are ``a * (PTQ(fp) - fp)`` plus noise (so every signal is > 0)."""
    rng = np.random.default_rng(seed)
    kernels = SPEC.rule.select(fp)
    out = {}
    for p, w in q.flatten(fp).items():
        if p.startswith("head/"):
            continue
        w = np.asarray(w, np.float32)
        if p in kernels:
            r = np_quant(w, 2, reduce_of(w.ndim, "channel", kernels[p]))[2] - w
            out[p] = a * r + noise * r.std() * rng.standard_normal(w.shape).astype(np.float32)
        else:
            out[p] = 0.01 * rng.standard_normal(w.shape).astype(np.float32)
    return q.unflatten(out)


def test_weight_stats_and_weight_strategies_match_numpy():
    fp = vit_tree(1)
    qv = _qv_along_residual(fp)
    ws = sel.weight_stats(fp, qv, SPEC)
    qn, rn, dot, rtn = _np_weight_stats(fp, qv, sel.CANDIDATES)
    np.testing.assert_allclose([ws["qv_norm"], ws["residual_norm"]], [qn, rn], rtol=1e-5)
    np.testing.assert_allclose(ws["dot"], dot, rtol=1e-4, atol=1e-6 * qn * rn)
    np.testing.assert_allclose(ws["rtn_error"], rtn, rtol=1e-4)
    rec = {"candidates": list(sel.CANDIDATES), "weights": ws}
    nearest = lambda t: min(sel.CANDIDATES, key=lambda c: (abs(c - t), abs(c - 1), c))
    cos = dot / (qn * rn)
    targets = {
        sel.NormRatio(multiple=0.7): 0.7 * rn / qn,
        sel.Alignment(scale=0.5): 0.5 * dot / qn**2,
        sel.ModelStock(k=2.0): 2 * cos / (1 + cos),
    }
    assert 0.15 < min(targets.values()) and max(targets.values()) < 1.5  # not all "nearest 0"
    for s, t in targets.items():
        assert sel.choose(s, rec).lam == nearest(t), s
    assert sel.choose(sel.RtnError(), rec).lam == sel.CANDIDATES[int(np.argmin(rtn))]
    # select() measures and decides in one go, the same as the record route
    assert sel.select_lambda(fp, qv, SPEC, strategy=sel.NormRatio(0.7)).lam == nearest(
        0.7 * rn / qn
    )


def test_weight_strategies_refuse_a_qv_without_the_quantized_kernels():
    fp = vit_tree(1)
    qv = q.flatten(q.quantization_vector(finetune_of(fp, 2), fp))
    path = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    del qv[path]
    with pytest.raises(sel.SelectError, match=path):
        sel.select_lambda(fp, q.unflatten(qv), SPEC, strategy="norm-ratio")


# ------------------------------------------------------------------ proxy measures


def test_proxy_measures_match_their_definitions(pair):
    model, fp, qv, inputs = pair
    x = jnp.asarray(inputs["donor"])
    rec = sel.candidate_scores(fp, qv, SPEC, model, inputs=inputs, strategies=proxies()[:1])
    got = rec[sel.Proxy("donor", n=N).key]
    apply = jax.jit(lambda p: model.apply({"params": p}, x, capture_intermediates=True))

    def run(p):  # logits and the head's input (the cls token after the encoder)
        logits, state = apply(p)
        return np.asarray(logits, np.float64), np.asarray(
            state["intermediates"]["Transformer"]["__call__"][0][:, 0], np.float64
        )

    ref_l, ref_f = run(fp)
    for i in (0, 4, 7):
        lam = sel.CANDIDATES[i]
        pl, pf = run(q.ptq(q.patch(fp, qv, lam), SPEC))
        lr = ref_l - np.log(np.exp(ref_l).sum(-1, keepdims=True))
        lp = pl - np.log(np.exp(pl).sum(-1, keepdims=True))
        kl = np.mean(np.sum(np.exp(lr) * (lr - lp), -1))
        agree = np.mean(ref_l.argmax(-1) == pl.argmax(-1))
        cos = np.mean(
            np.sum(ref_f * pf, -1) / (np.linalg.norm(ref_f, axis=-1) * np.linalg.norm(pf, axis=-1))
        )
        np.testing.assert_allclose([got["kl"][i], got["cos"][i]], [kl, cos], rtol=2e-4, atol=1e-6)
        assert got["agree"][i] == pytest.approx(agree, abs=1e-6)
    assert got["n"] == N


def test_val_best_accuracies_are_the_post_ptq_accuracies(pair):
    model, fp, qv, inputs = pair
    images, labels = inputs["labelled receiver"]
    ch = sel.select_lambda(fp, qv, SPEC, model, strategy="val-best", inputs=inputs)
    for i in (0, 7):
        p = q.ptq(q.patch(fp, qv, sel.CANDIDATES[i]), SPEC)
        acc = np.mean(np.asarray(model.apply({"params": p}, images)).argmax(-1) == labels)
        assert ch.scores[i] == pytest.approx(acc, abs=1e-6)
    assert ch.scores[sel.CANDIDATES.index(ch.lam)] == max(ch.scores)


# ------------------------------------------------------------------ harmful QVs


def test_a_helpful_qv_is_used_and_harmful_qvs_get_lambda_zero(pair):
    model, fp, qv, inputs = pair
    good = sel.candidate_scores(fp, qv, SPEC, model, inputs=inputs, strategies=proxies())
    assert "val" not in good and "weights" not in good  # only what was asked is measured
    vb = sel.select_lambda(fp, qv, SPEC, model, strategy="val-best", inputs=inputs)
    assert vb.lam > 0 and max(vb.scores) > vb.scores[0]  # the QV helps PTQ(FP)
    for name in ("proxy-donor64-kl", "proxy-rx64-kl"):
        assert good["choices"][name]["lam"] > 0, (name, good["choices"][name])
    rng = np.random.default_rng(0)
    flipped = jax.tree.map(lambda v: -20.0 * v, qv)  # the QV's sign flipped, and scaled
    huge = jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 1, v.shape), v.dtype), qv)
    for bad in (flipped, huge):
        rec = sel.candidate_scores(fp, bad, SPEC, model, inputs=inputs, strategies=proxies())
        assert {n: c["lam"] for n, c in rec["choices"].items()} == {s.name: 0.0 for s in proxies()}
        for s in proxies():  # the dev-tuned margin still declines a harmful QV
            assert sel.choose(s.with_constants({"margin": 0.05}), rec).lam == 0.0, s.name


# ------------------------------------------------------------------ data isolation


class Poison:
    """Undeclared data: any use of it fails the test."""

    def __init__(self, kind):
        self.kind = kind

    def _touched(self, *_a, **_k):
        raise AssertionError(f"a strategy touched undeclared {self.kind!r} data")

    __array__ = __len__ = __iter__ = __getitem__ = _touched

    def __getattr__(self, name):
        self._touched()


def test_strategies_touch_only_their_declared_data(pair):
    model, fp, qv, inputs = pair
    weights = [sel.NormRatio(), sel.Alignment(), sel.ModelStock(), sel.RtnError()]
    for s in [sel.Fixed(1.0), *weights, *proxies(), sel.ValBest()]:
        poisoned = {k: Poison(k) for k in sel.DATA_KINDS if k not in ("none", s.data)}
        if s.data in inputs:
            poisoned[s.data] = inputs[s.data]
        clean = {s.data: inputs[s.data]} if s.data in inputs else None
        a = sel.select_lambda(fp, qv, SPEC, model, strategy=s, inputs=poisoned)
        b = sel.select_lambda(fp, qv, SPEC, model, strategy=s, inputs=clean)
        assert a == b and a.data == s.data


def test_a_strategy_asking_for_undeclared_data_is_refused(pair):
    model, fp, qv, inputs = pair

    class Peeker(sel.NormRatio):
        def collect(self, ctx):
            ctx.data("labelled receiver")

    with pytest.raises(sel.UndeclaredDataError, match="declared data 'none'.*'labelled receiver'"):
        sel.select_lambda(fp, qv, SPEC, model, strategy=Peeker(), inputs=inputs)
    with pytest.raises(sel.SelectError, match=r"needs 'donor' data: pass inputs="):
        sel.select_lambda(fp, qv, SPEC, model, strategy="proxy-donor-kl")


# ------------------------------------------------------------------ determinism, records


def test_selection_is_deterministic_and_the_record_round_trips_json(pair):
    model, fp, qv, inputs = pair
    strategies = [sel.Fixed(1.0), sel.NormRatio(), sel.RtnError(), *proxies(), sel.ValBest()]
    a = sel.candidate_scores(fp, qv, SPEC, model, inputs=inputs, strategies=strategies)
    b = sel.candidate_scores(fp, qv, SPEC, model, inputs=inputs, strategies=strategies)
    assert a == b
    rec = json.loads(json.dumps(a, allow_nan=False))
    for s in strategies:
        assert sel.choose(s, rec).to_dict() == a["choices"][s.name]
    # other constants re-decide from the stored measurement, without recomputing
    assert sel.choose(sel.NormRatio(multiple=1e-6), rec).lam == 0.0
    with pytest.raises(sel.SelectError, match="no 'proxy/pretext/n=32/seed=0' measurement"):
        sel.choose(sel.Proxy("pretext", n=32), rec)


def test_default_scores_list_what_they_could_not_measure(pair):
    model, fp, qv, _ = pair
    rec = sel.candidate_scores(fp, qv, SPEC)  # no model, no inputs: weights only
    assert set(rec["choices"]) == {"lam=1", "norm-ratio", "alignment", "model-stock", "rtn-error"}
    assert rec["not_measured"]["proxy-noise-kl"] == "no model given"
    assert rec["not_measured"]["val-best"] == "no 'labelled receiver' inputs given"
    assert len(rec["choices"]) + len(rec["not_measured"]) == len(sel.default_strategies())


def test_bad_inputs_get_one_line_errors(pair):
    model, fp, qv, inputs = pair
    cases = [
        (dict(strategy="nope"), "unknown lambda strategy 'nope'"),
        (dict(strategy="lam=1", inputs={"labels": 1}), "unknown input kinds"),
        (dict(strategy="lam=1", candidates=(0.5, 0.5)), "distinct finite"),
        (dict(strategy=sel.Fixed(2.0)), "2.0 is not a candidate"),
        (dict(strategy="proxy-rx32-kl", inputs=np.zeros((4, 8, 8, 3))), r"\[n, 16, 16, 3\]"),
    ]
    for kw, msg in cases:
        with pytest.raises(sel.SelectError, match=msg):
            sel.select_lambda(fp, qv, SPEC, model, **kw)
    with pytest.raises(sel.SelectError, match="pass model="):
        sel.select_lambda(fp, qv, SPEC, strategy="proxy-noise-kl")
    with pytest.raises(sel.SelectError, match="measure must be one of"):
        sel.Proxy("noise", "l2")


def _attr(x, name):
    try:
        return getattr(x, name)
    except Exception:  # a property that refuses (an unbound flax module's path)
        return None


def _reachable(obj, depth=3):
    """Every object reachable from ``obj`` through attributes, dict values and sequence
    items, ``depth`` levels deep (the context's params trees included)."""
    seen, todo = {}, [(obj, 0)]
    while todo:
        x, d = todo.pop()
        if id(x) in seen or d > depth:
            continue
        seen[id(x)] = x
        if isinstance(x, (np.ndarray, jax.Array)):
            continue  # a leaf: no other kind's data hides inside an array
        if isinstance(x, dict):
            kids = list(x.values())
        elif isinstance(x, (list, tuple)):
            kids = list(x)
        else:  # every attribute, the properties included
            kids = [_attr(x, a) for a in dir(x) if not a.startswith("__")]
            kids = [k for k in kids if not callable(k)] + list(getattr(x, "__dict__", {}).values())
        todo += [(k, d + 1) for k in kids]
    return seen


def test_a_context_holds_only_the_declared_kind(pair):
    """Issue 20: the context is built with the declared kind only, so no attribute of it
    (public or private, nested or not) reaches another kind, and data() still refuses."""
    model, fp, qv, inputs = pair
    contexts = []

    class Spy(sel.Proxy):
        def collect(self, ctx):
            contexts.append(ctx)
            return super().collect(ctx)

    marks = {k: np.full((2, 16, 16, 3), i, np.float32) for i, k in enumerate(sel.DATA_KINDS)}
    given = {k: v for k, v in marks.items() if k != "none"} | {"donor": inputs["donor"]}
    before = {k: v.copy() for k, v in given.items() if k != "donor"}
    want = sel.select_lambda(fp, qv, SPEC, model, strategy=sel.Proxy("donor", n=N),
                             inputs={"donor": inputs["donor"]})  # fmt: skip
    got = sel.select_lambda(fp, qv, SPEC, model, strategy=Spy("donor", n=N), inputs=given)
    assert got.scores == want.scores and got.lam == want.lam
    (ctx,) = contexts
    reach = _reachable(ctx)
    for kind, x in given.items():
        assert (id(x) in reach) is (kind == "donor"), kind
    assert ctx.data("donor") is inputs["donor"]
    assert not any(isinstance(v, dict) and "pretext" in v for v in reach.values())
    for kind in ("pretext", "noise", "unlabelled receiver", "labelled receiver"):
        with pytest.raises(sel.UndeclaredDataError, match=f"declared data 'donor'.*'{kind}'"):
            ctx.data(kind)
    assert all(np.array_equal(before[k], given[k]) for k in before)  # inputs untouched


def test_a_constant_given_twice_is_refused_naming_it():
    for name in ("proxy-donor-kl:margin=0.1:margin=0.2", "norm-ratio:multiple=1:multiple=1"):
        with pytest.raises(sel.SelectError, match=r"constant '(margin|multiple)' is given twice"):
            sel.get_strategy(name)
        with pytest.raises(sel.SelectError, match="given twice"):
            sel.split_name(name)
    assert sel.get_strategy("proxy-donor-kl:margin=0.1").name == "proxy-donor-kl:margin=0.1"
