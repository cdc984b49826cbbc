"""Train-step cost of QAT vs FP: ViT-B/16, batch 8, 224px, CPU.

QAT adds O(params) work (fake-quantizing 72 kernels) to an O(params x tokens x batch)
step, so QAT/FP should be close to 1 (aim: <= 1.10). Prints, in one run of this script,
each measurement in its own child process (started one after another):

- JAX step time FP and QAT (the project's own ``train.make_train_step``: AdamW +
  clipping, donated state), in one child: one untimed step each (compile), then
  ``--repeats`` interleaved FP/QAT steps, median -> ratio of the medians;
- peak RSS (the child's whole ``ru_maxrss``) of a child that runs only the QAT (and one
  that runs only the FP) step, once after one untimed step; it still builds both modes'
  train states, so the other mode's idle params and AdamW state are in that figure;
- the same ratio for the authors' PyTorch formulation (a ``Linear`` wrapper computing
  ``w + (fq(w) - w).detach()``) on timm's ViT-B/16 (or, if timm does not import, a
  built-in module of the same structure), if torch is installed: in another child, one
  warm-up step each, then ``--repeats`` interleaved FP/QAT steps, median. JAX and
  PyTorch absolute times therefore come from separate processes, not interleaved.

    python bench/train_step.py [--repeats 3] [--variant B/16] [--batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _jax_steps(variant, batch, image_size, bits):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qvec_jax import train
    from qvec_jax.config import load_config
    from qvec_jax.models import vit
    from qvec_jax.quant import QuantSpec
    from qvec_jax.sharding import make_mesh, state_shardings

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "paper_vit_b16.py"), ["optim.warmup_steps=1"])
    model = vit.create_model(variant, num_classes=100, image_size=image_size)
    params = vit.init_params(model, jax.random.key(0))
    tx, _ = train.make_optimizer(cfg.optim, total_steps=1000)
    mesh = make_mesh(jax.devices()[:1])
    abstract = jax.eval_shape(
        lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}, params
    )
    sh = state_shardings(abstract, mesh)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, 100, batch).astype(np.int32)
    steps, states = {}, {}
    for mode in ("fp", "qat"):
        steps[mode] = train.make_train_step(model, tx, mesh, sh, mode=mode, spec=QuantSpec(bits))
        states[mode] = train.create_state(params, tx, sh)
    return steps, states, x, y


def run_jax(modes, repeats, variant, batch, image_size, bits) -> dict:
    import jax

    steps, states, x, y = _jax_steps(variant, batch, image_size, bits)
    times = {m: [] for m in modes}
    for m in modes:  # compile + first step, untimed
        states[m], out = steps[m](states[m], x, y)
        jax.block_until_ready(out)
    for _ in range(repeats):
        for m in modes:
            t = time.perf_counter()
            states[m], out = steps[m](states[m], x, y)
            jax.block_until_ready(out)
            times[m].append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"times": times, "peak_rss_gib": rss}


def _torch_vit_b16(image_size, num_classes=100):
    """timm's ViT-B/16 module structure (blocks[i].attn.qkv/proj, .mlp.fc1/fc2), for when
    timm cannot be imported."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    D, H = 768, 12

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(D, eps=1e-6), Attn()
            self.norm2, self.mlp = nn.LayerNorm(D, eps=1e-6), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, D, 16, 16)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image_size // 16) ** 2, D) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(12))
            self.norm, self.head = nn.LayerNorm(D, eps=1e-6), nn.Linear(D, num_classes)

        def forward(self, x):
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.norm(x)[:, 0])

    return ViT()


def run_torch(repeats, batch, image_size, bits) -> dict:
    import torch
    import torch.nn.functional as F

    try:
        import timm
    except Exception:  # e.g. a torchvision built for another torch
        timm = None

    qmax = 2 ** (bits - 1) - 1

    class FakeQuantLinear(torch.nn.Linear):
        """The authors' formulation: per-output-row symmetric RTN with an STE."""

        def forward(self, x):
            w = self.weight
            s = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / qmax
            wq = torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s
            return F.linear(x, w + (wq - w).detach(), self.bias)

    def make(qat):
        torch.manual_seed(0)
        m = (
            _torch_vit_b16(image_size)
            if timm is None
            else timm.create_model(
                "vit_base_patch16_224", pretrained=False, num_classes=100, img_size=image_size
            )
        )
        if qat:
            for blk in m.blocks:
                for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                    lin.__class__ = FakeQuantLinear
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.1)
        return m, opt

    x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    y = torch.randint(0, 100, (batch,))
    models = {"fp": make(False), "qat": make(True)}

    def step(mode):
        m, opt = models[mode]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    times = {"fp": [], "qat": []}
    for mode in times:
        step(mode)  # warm-up
    for _ in range(repeats):
        for mode in times:
            t = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - t)
    model = "timm vit_base_patch16_224" if timm else "built-in ViT-B/16 (timm not importable)"
    return {"times": times, "threads": torch.get_num_threads(), "model": model}


def _child(kind, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind]
    cmd += ["--repeats", str(args.repeats), "--variant", args.variant]
    cmd += ["--batch", str(args.batch), "--image-size", str(args.image_size)]
    cmd += ["--bits", str(args.bits)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", default="B/16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = (args.variant, args.batch, args.image_size, args.bits)

    if args.child:  # one measurement in a fresh process (own peak RSS)
        if args.child == "torch":
            out = run_torch(args.repeats, *shape[1:])
        else:
            modes = ("fp", "qat") if args.child == "jax" else (args.child.split("-")[1],)
            out = run_jax(modes, args.repeats if args.child == "jax" else 1, *shape)
        print(json.dumps(out))
        return 0

    import jax

    print(
        f"ViT {args.variant}, batch {args.batch}, {args.image_size}px, {args.bits}-bit "
        f"per-channel QAT, AdamW + clip; {jax.devices()[0].platform.upper()}, "
        f"{os.cpu_count()} cores, {args.repeats} interleaved repeats (median)"
    )
    res = {"config": vars(args)}
    j = _child("jax", args)
    med = {m: statistics.median(t) for m, t in j["times"].items()}
    res["jax"] = {"median_s": med, "ratio": med["qat"] / med["fp"], "times": j["times"]}
    print(
        f"JAX    FP {med['fp']:.3f} s/step   QAT {med['qat']:.3f} s/step   "
        f"QAT/FP {res['jax']['ratio']:.3f}"
    )
    for mode in ("fp", "qat"):
        rss = _child(f"jax-{mode}", args)["peak_rss_gib"]
        res["jax"][f"peak_rss_gib_{mode}"] = rss
        print(f"JAX    peak RSS, process running only the {mode.upper()} step: {rss:.2f} GiB")
    try:
        import torch  # noqa: F401
    except ImportError:
        print("PyTorch formulation: skipped (torch not installed)")
    else:
        t = _child("torch", args)
        med = {m: statistics.median(v) for m, v in t["times"].items()}
        res["torch"] = {"median_s": med, "ratio": med["qat"] / med["fp"], **t}
        print(
            f"PyTorch FP {med['fp']:.3f} s/step   QAT {med['qat']:.3f} s/step   "
            f"QAT/FP {res['torch']['ratio']:.3f}   (Linear wrapper, w + (fq(w) - w).detach(); "
            f"{t['threads']} threads, {t['model']})"
        )
    line = " ".join(f"{k}_qat_over_fp={v['ratio']:.3f}" for k, v in res.items() if "ratio" in v)
    print(f"headline: {line or 'no_measurement=1'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
