"""One short check for a lent accelerator (under 5 minutes on one H200): issue 22's figures,
each beside its limit measured in the same run.

Prints, on the default JAX backend, one device:

0. the limits: a bf16 matmul's TFLOP/s (8192^3, median) and a device copy's bytes/s
   (one read + one write of 1 GiB, jitted, median);
1. fake-quant (PTQ) of ViT-B/16 at 3 bits per channel (``grid.ptq_jit``) against a
   jitted copy of the same leaves and the byte floor (read + write at copy speed);
2. ViT-B/16 at batch 128 (uint8 32-px images resized to 224 on device, as training and
   eval feed them): train img/s (FP, fp32 and bf16; QAT/FP) and eval img/s (fp32 and
   bf16; ``evaluate.count_correct``), each with its share of the matmul limit
   (``vit_flops``: 2 flops a multiply-add, training = 3x the forward);
3. the demo-size training loop against the device-only step (``bench/train_loop.py``:
   the split on the device, ``log_every`` steps a dispatch; and streamed, one a dispatch);
4. the demo model's grid cells: 4 and 8 a call against one at a time
   (``bench/grid_batch.py``), and whether the accuracies are identical;
5. grain's ``TrainLoader`` images/s with 0 and 4 worker processes (streamed input only);
6. ``qvec demo`` end to end, wall seconds, in a child process (``--demo-timeout``),
   on the Fashion-MNIST IDX files under ``$QVEC_DATA_DIR/fashion-mnist`` (carry them).

    python bench/gpu_check.py                 # on the GPU machine
    python bench/gpu_check.py --cpu-smoke     # tiny sizes on CPU: checks the script runs

Ends with one line ``headline: name=value ...`` (the demo's wall time included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from grid_cell import random_params, random_split  # noqa: E402

from qvec_jax import train  # noqa: E402
from qvec_jax.config import load_config  # noqa: E402
from qvec_jax.data.loader import TrainLoader, place_rows  # noqa: E402
from qvec_jax.evaluate import count_correct  # noqa: E402
from qvec_jax.grid import ptq_jit  # noqa: E402
from qvec_jax.models import vit  # noqa: E402
from qvec_jax.quant import QuantSpec  # noqa: E402
from qvec_jax.sharding import make_mesh, put, replicated, state_shardings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = dict(variant="B/16", image_size=224, batch=128, steps=5, runs=5, matmul=8192,
            copy_mb=1024, loop_steps=100, loop_log=10, input_n=8192, input_batches=40,
            workers=(0, 4), grid_runs=3)  # fmt: skip
SMOKE = dict(variant="test/4", image_size=28, batch=8, steps=2, runs=2, matmul=256,
             copy_mb=8, loop_steps=8, loop_log=2, input_n=256, input_batches=6, workers=(0, 2),
             grid_runs=1)  # fmt: skip
#: issue 22's goals on one H200 (None: no goal, printed for reference)
GOALS = {"fq_ms": 0.5, "train_bf16_img_s": 3000, "eval_bf16_img_s": 12000,
         "eval_fp32_img_s": 5000, "loop_ratio": 1 / 0.9, "demo_s": 120}  # fmt: skip


def _median_s(fn, runs: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def limits(s: dict) -> dict:
    """The chip's bf16 matmul TFLOP/s and its copy bandwidth (bytes/s), measured here."""
    n = s["matmul"]
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    tflops = 2 * n**3 / _median_s(lambda: mm(a), s["runs"]) / 1e12
    buf = jnp.ones((s["copy_mb"] << 20) // 4, jnp.float32)
    cp = jax.jit(lambda x: x + 1)  # one read, one write; not elided like a bare copy
    bw = 2 * buf.nbytes / _median_s(lambda: cp(buf), s["runs"])
    return {"matmul_tflops": tflops, "copy_gb_s": bw / 1e9}


def vit_flops(model, image_size: int) -> float:
    """Forward flops of one image (2 a multiply-add): patch embedding, each block's
    projections, attention scores and mixing, MLP; the head is left out."""
    p, d, m = model.patch_size, model.width, model.mlp_dim
    t = (image_size // p) ** 2 + 1
    embed = (t - 1) * p * p * 3 * d
    block = t * (4 * d * d + 2 * d * m) + 2 * t * t * d
    return 2.0 * (embed + model.depth * block)


def fake_quant(s: dict, mesh, bw: float) -> dict:
    model = vit.create_model(s["variant"], num_classes=1000, image_size=s["image_size"])
    params = put(random_params(model, 0), replicated(mesh))
    spec = QuantSpec(3, "channel")
    fq = _median_s(lambda: ptq_jit(params, spec=spec), s["runs"])
    copy = jax.jit(lambda t: jax.tree.map(lambda x: x + 0, t))
    cp = _median_s(lambda: copy(params), s["runs"])
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    floor = 2 * nbytes / (bw * 1e9)
    return {"fq_ms": 1e3 * fq, "tree_copy_ms": 1e3 * cp, "floor_ms": 1e3 * floor,
            "fq_floor_x": fq / floor}  # fmt: skip


def _train(s: dict, mesh, dtype, mode: str):
    cfg = load_config(os.path.join(ROOT, "configs", "paper_vit_b16.py"), ["optim.warmup_steps=1"])
    model = vit.create_model(s["variant"], num_classes=100, image_size=s["image_size"],
                             dtype=dtype)  # fmt: skip
    params = random_params(model, 0)
    tx, _ = train.make_optimizer(cfg.optim, total_steps=1000)
    sh = state_shardings(train.abstract_state(params, tx), mesh)
    split = random_split(4 * s["batch"], 32, s["image_size"], seed=3)
    x, y = place_rows(split.get(np.arange(s["batch"])), mesh, s["batch"])
    step = train.make_train_step(model, tx, mesh, sh, mode=mode, spec=QuantSpec(3),
                                 preprocess=split.preprocessor)  # fmt: skip
    box = [train.create_state(params, tx, sh)]

    def one():
        box[0], m = step(box[0], x, y)
        return m

    return s["batch"] / _median_s(one, s["steps"]), model


def _eval(s: dict, mesh, dtype):
    model = vit.create_model(s["variant"], num_classes=100, image_size=s["image_size"],
                             dtype=dtype)  # fmt: skip
    params = put(random_params(model, 1), replicated(mesh))
    split = random_split(s["batch"], 32, s["image_size"], seed=5)
    x, y = place_rows(split.get(np.arange(s["batch"])), mesh, s["batch"])
    m = put(np.ones(s["batch"], bool), replicated(mesh))
    fn = lambda: count_correct(params, x, y, m, model=model, spec=None,
                               prep=split.preprocessor)  # fmt: skip
    return s["batch"] / _median_s(fn, s["runs"])


def vit_rates(s: dict, mesh, tflops: float) -> dict:
    out = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        fp, model = _train(s, mesh, dtype, "fp")
        qat, _ = _train(s, mesh, dtype, "qat")
        ev = _eval(s, mesh, dtype)
        f = vit_flops(model, s["image_size"])
        out.update({f"train_{name}_img_s": fp, f"qat_fp_{name}": fp / qat,
                    f"eval_{name}_img_s": ev, f"train_{name}_mfu": 3 * f * fp / tflops / 1e12,
                    f"eval_{name}_mfu": f * ev / tflops / 1e12})  # fmt: skip
    return out


def loop(s: dict) -> dict:
    import train_loop

    task, n, log = "digits", s["loop_steps"], s["loop_log"]
    floor = train_loop.device_ms(train_loop.config(task, n, log, {}), n)
    out = {"demo_step_ms": floor}
    for name in ("resident", "stream-k1"):
        ms = train_loop.loop_ms(train_loop.config(task, n, log, train_loop.SETTINGS[name]))
        out["loop_ratio" if name == "resident" else "loop_stream_k1_ratio"] = ms / floor
    return out


def input_rate(s: dict, mesh, workers: int) -> float:
    """Images/s of the streamed training input onto the device (uint8, 32 px)."""
    split = random_split(s["input_n"], 32, s["image_size"], seed=4)
    with TrainLoader(split, s["batch"], seed=0, mesh=mesh, workers=workers, prefetch=4) as it:
        jax.block_until_ready(place_rows(next(it), mesh, s["batch"]))  # workers started
        t = time.perf_counter()
        for _ in range(s["input_batches"]):
            jax.block_until_ready(place_rows(next(it), mesh, s["batch"]))
        return s["input_batches"] * s["batch"] / (time.perf_counter() - t)


def grid(s: dict) -> dict:
    """The demo model's grid cells one at a time and 8 a call (bench/grid_batch.py)."""
    import grid_batch

    r = grid_batch.measure("demo", s["grid_runs"])
    c = r["cell_s"]
    return {"grid_cell_ms": 1e3 * c[1], "grid_x4": c[1] / c[4], "grid_x8": c[1] / c[8],
            "grid_identical": float(r["identical"])}  # fmt: skip


def demo(timeout: float, smoke: bool) -> float | None:
    """Wall seconds of ``qvec demo`` in a child process (None: over ``timeout``)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "qvec_jax.cli", "demo", "--workdir", os.path.join(d, "demo"),
               "--no-progress"] + (["--quick"] if smoke else [])  # fmt: skip
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode:
            print("demo failed:\n" + r.stderr[-2000:])
            return None
        return time.perf_counter() - t


def _show(head: dict, key: str, text: str) -> None:
    goal = GOALS.get(key)
    print(text + ("" if goal is None else f"   (goal {goal:.3g})"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU backend")
    p.add_argument("--demo-timeout", type=float, default=150.0, help="seconds (0: skip)")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        jax.config.update("jax_platforms", "cpu")
    s = SMOKE if a.cpu_smoke else FULL
    mesh = make_mesh(jax.local_devices()[:1])
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}; sizes: {s}")
    t0 = time.perf_counter()
    head = limits(s)
    print(f"0. limits: bf16 matmul {head['matmul_tflops']:.3g} TFLOP/s; "
          f"copy {head['copy_gb_s']:.3g} GB/s (read + write)")  # fmt: skip
    head.update(fake_quant(s, mesh, head["copy_gb_s"]))
    _show(head, "fq_ms", f"1. fake-quant ViT {s['variant']} 3-bit channel: {head['fq_ms']:.3f} ms"
          f" = {head['fq_floor_x']:.1f}x the byte floor {head['floor_ms']:.3f} ms "
          f"(jitted copy of the leaves {head['tree_copy_ms']:.3f} ms)")  # fmt: skip
    head.update(vit_rates(s, mesh, head["matmul_tflops"]))
    for name in ("fp32", "bf16"):
        _show(head, f"train_{name}_img_s", f"2. ViT {s['variant']} batch {s['batch']} {name}: "
              f"train {head[f'train_{name}_img_s']:.0f} img/s "
              f"({100 * head[f'train_{name}_mfu']:.0f}% of the matmul limit), "
              f"QAT/FP time {head[f'qat_fp_{name}']:.3f}")  # fmt: skip
        _show(head, f"eval_{name}_img_s", f"   eval {head[f'eval_{name}_img_s']:.0f} img/s "
              f"({100 * head[f'eval_{name}_mfu']:.0f}% of the matmul limit)")  # fmt: skip
    head.update(loop(s))
    _show(head, "loop_ratio", f"3. demo-size loop: device-only step {head['demo_step_ms']:.2f} "
          f"ms; loop/device {head['loop_ratio']:.3f} (streamed, one step a dispatch: "
          f"{head['loop_stream_k1_ratio']:.3f})")  # fmt: skip
    head.update(grid(s))
    print(f"4. demo grid cells: {head['grid_cell_ms']:.1f} ms a cell one at a time; batched "
          f"{head['grid_x4']:.2f}x as fast at 4 a call, {head['grid_x8']:.2f}x at 8; accuracies "
          f"identical: {bool(head['grid_identical'])}")  # fmt: skip
    for w in s["workers"]:
        head[f"input_w{w}_img_s"] = input_rate(s, mesh, w)
        print(f"5. streamed input, {w} grain workers: {head[f'input_w{w}_img_s']:.0f} img/s")
    if a.demo_timeout > 0:
        secs = demo(a.demo_timeout, a.cpu_smoke)
        head["demo_s"] = float("nan") if secs is None else secs
        _show(head, "demo_s", f"6. qvec demo: {head['demo_s']:.0f} s end to end"
              + (" (did not finish)" if secs is None else ""))  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s")
    print("headline: " + " ".join(f"{k}={v:.3g}" for k, v in head.items()))


if __name__ == "__main__":
    main()
