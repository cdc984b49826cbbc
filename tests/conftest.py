"""Shared fixtures: small Google-layout ViT-like param trees built from plain dicts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qvec_jax as q


def vit_shapes(
    depth=2, width=16, heads=2, mlp=32, patch=4, num_patches=16, num_classes=5, pre_logits=None
) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the original Google ViT layout (METHOD.md / CONTRACT.md)."""
    hd = width // heads
    s = {
        "embedding/kernel": (patch, patch, 3, width),
        "embedding/bias": (width,),
        "cls": (1, 1, width),
        "Transformer/posembed_input/pos_embedding": (1, 1 + num_patches, width),
        "Transformer/encoder_norm/scale": (width,),
        "Transformer/encoder_norm/bias": (width,),
    }
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            s[b + ln + "/scale"] = s[b + ln + "/bias"] = (width,)
        att = b + "MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            s[att + n + "/kernel"] = (width, heads, hd)
            s[att + n + "/bias"] = (heads, hd)
        s[att + "out/kernel"] = (heads, hd, width)
        s[att + "out/bias"] = (width,)
        s[b + "MlpBlock_3/Dense_0/kernel"] = (width, mlp)
        s[b + "MlpBlock_3/Dense_0/bias"] = (mlp,)
        s[b + "MlpBlock_3/Dense_1/kernel"] = (mlp, width)
        s[b + "MlpBlock_3/Dense_1/bias"] = (width,)
    last = width
    if pre_logits:
        s["pre_logits/kernel"], s["pre_logits/bias"] = (width, pre_logits), (pre_logits,)
        last = pre_logits
    s["head/kernel"], s["head/bias"] = (last, num_classes), (num_classes,)
    return s


def vit_tree(seed=0, dtype=jnp.float32, **kw) -> dict:
    """Random params (nested plain dicts) with the shapes of ``vit_shapes(**kw)``."""
    rng = np.random.default_rng(seed)
    flat = {
        p: jnp.asarray(rng.normal(0, 0.05, shape).astype(np.float32)).astype(dtype)
        for p, shape in vit_shapes(**kw).items()
    }
    return q.unflatten(flat)


def finetune_of(tree, seed, rel=0.01) -> dict:
    """A nearby tree, as a fine-tune of the same backbone would be."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (
            x.astype(jnp.float32) + rel * rng.normal(0, 0.05, x.shape).astype(np.float32)
        ).astype(x.dtype),
        tree,
    )


def with_int_leaves(tree, seed=0) -> dict:
    """``tree`` plus a step counter and raw RNG key data (integer leaves)."""
    return {**tree, "step": jnp.int32(7), "rng": jax.random.key_data(jax.random.key(seed))}


@pytest.fixture
def vit():
    return vit_tree(0)


@pytest.fixture
def fp_qat_pair():
    """(fp, qat): two nearby fine-tunes of one backbone, with integer leaves."""
    fp = vit_tree(1)
    return with_int_leaves(fp, 0), with_int_leaves(finetune_of(fp, 2), 1)


VIT_KERNELS = tuple(
    f"Transformer/encoderblock_{i}/{k}/kernel"
    for i in range(2)
    for k in (
        "MultiHeadDotProductAttention_1/query",
        "MultiHeadDotProductAttention_1/key",
        "MultiHeadDotProductAttention_1/value",
        "MultiHeadDotProductAttention_1/out",
        "MlpBlock_3/Dense_0",
        "MlpBlock_3/Dense_1",
    )
)


def run_multidevice(code: str, n: int = 8, timeout: int = 240) -> str:
    """Run ``code`` in a fresh Python with ``n`` forced host devices; return its stdout."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == 0, f"subprocess failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# The longest modules first. Under `pytest -n` (the README's command), xdist hands out whole
# modules (--dist loadfile) in collection order; starting the long ones early keeps a worker
# from idling at the end while another finishes one of them (longest-first scheduling).
# Order from `pytest -n 2 --durations=0` on 2 cores; any module not named keeps its place.
LONGEST_FIRST = (
    "test_study",  # a tiny study three times over (kill and resume, shards, rerun) via `qvec`
    "test_demo",  # the quick demo, and the README example and notebooks 01/02 on it
    "test_train",
    "test_notebooks",  # notebook 03 on a tiny ViT: fine-tunes and a grid via `qvec`
    "test_grid_extras",
    "test_gptq",
    "test_grid_gptq",
    "test_grid_run",
    "test_device_preprocess",
    "test_cli_safety",
    "test_compute_dtype",
    "test_grid_shards",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: in-module order kept
