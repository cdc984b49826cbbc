"""Host time per 224-px training image, before and after device-side preprocessing.

Input: a TFDS ``array_record`` dataset of 32-px RGB PNGs (``--n`` images, 10 classes),
built here without network or TensorFlow (as ``tests/test_data_tfds.py`` does), read
through the project's own source (``data.TfdsSource``, streamed: every batch is read
and decoded from the array_record files).

- before: :func:`reference_before`, the former host path kept here as the reference
  (NumPy view, PIL bilinear in float32 per channel to 224 px, grey->RGB, [-1, 1]), on
  the same decoded batches; its output is float32, 602 kB an image.
- after: the project's path: ``Split.get`` (read + decode, uint8 at 32 px, 3 kB an
  image) and ``sharding.shard_batch`` (the transfer, waited for). The resize runs on
  the device under jit; its time is measured apart (device ms/image, here the CPU
  backend unless an accelerator is present).
- grain: images/s of ``data.loader.TrainLoader`` with ``--workers`` worker processes,
  against a consumer of ``--target`` images/s (host batches; no transfer to the device).

How it times, in this one process (grain workers aside), once (no repeats, no medians):
with ``nb`` = min(8, images // ``--batch``) batches, "before" and then "after" (not
interleaved) each run one untimed warm-up batch, then one timed pass over the other
``nb - 1`` batches: the mean time per image of that pass. The device preprocess: one
call that compiles, then the mean of 3 calls. grain: 2 batches untimed, then the mean
rate over ``2 * nb``.
Without the ``tfds`` extra (tensorflow-datasets, array_record, grain) it prints which
extra to install and exits with status 2. The last line is ``headline: name=value ...``.

Goal (issue 10): host time per image falls >= 10x.

    python bench/input.py [--n 2048] [--batch 128] [--workers 2] [--target 2000]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qvec_jax import data as D  # noqa: E402
from qvec_jax.sharding import make_mesh, shard_batch  # noqa: E402

SIZE, CLASSES, IMAGE = 32, 10, 224


IDENTITY = D.View()


def reference_before(images, max_value: float, image_size: int, view=IDENTITY) -> np.ndarray:
    """The host preprocess before issue 10 (``data.pipeline.apply_view`` + ``preprocess``):
    raw images (array or list) -> float32 NHWC in [-1, 1], PIL bilinear per channel."""
    from PIL import Image

    def plane(p):
        im = Image.fromarray(np.ascontiguousarray(p, dtype=np.float32), mode="F")
        return np.asarray(im.resize((image_size, image_size), Image.BILINEAR), np.float32)

    out = np.empty((len(images), image_size, image_size, 3), dtype=np.float32)
    for i, x in enumerate(images):
        x = np.asarray(x, dtype=np.float32)
        x = x[..., None] if x.ndim == 2 else x[..., :3]
        if view.rot90:
            x = np.rot90(x, view.rot90, axes=(0, 1))
        if view.hflip:
            x = np.flip(x, axis=1)
        if view.invert:
            x = max_value - x
        if x.shape[:2] != (image_size, image_size):
            x = np.stack([plane(x[..., c]) for c in range(x.shape[-1])], -1)
        out[i] = x  # grey broadcasts to 3
    out *= 2.0 / max_value
    out -= 1.0
    return np.clip(out, -1.0, 1.0, out=out)


def build_dataset(root: str, n: int) -> None:
    """``n`` random 32x32 RGB PNGs (train) + n/8 (test) as TFDS array_record under ``root``."""
    try:  # the ``tfds`` extra: building and reading the dataset, and the grain loader
        import array_record  # noqa: F401
        import grain  # noqa: F401
        import tensorflow_datasets as tfds
        from absl import logging
    except ImportError as e:
        print(f"bench/input.py needs the tfds extra (missing: {e.name or e}): "
              "pip install -e '.[tfds]'")  # fmt: skip
        raise SystemExit(2) from None
    from PIL import Image

    tfds.disable_progress_bar()
    logging.set_verbosity(logging.ERROR)  # "OpenCV is not installed" once per read

    def png(i):
        a = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="png")
        return buf.getvalue()

    class QvecBenchInput(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                "label": tfds.features.ClassLabel(num_classes=CLASSES)}))  # fmt: skip

        def _split_generators(self, dl_manager):
            gen = self._generate_examples
            return {"train": gen(0, n), "test": gen(n, n + max(1, n // 8))}

        def _generate_examples(self, lo, hi):
            for i in range(lo, hi):
                yield i, {"image": png(i), "label": i % CLASSES}

    QvecBenchInput(data_dir=root, file_format="array_record").download_and_prepare()


def _per_image(fn, batches, batch: int) -> float:
    """Seconds per image of ``fn`` over ``batches`` (after one warm-up batch)."""
    fn(batches[0])
    t0 = time.perf_counter()
    for b in batches[1:]:
        fn(b)
    return (time.perf_counter() - t0) / (batch * (len(batches) - 1))


def grain_rate(split, batch: int, workers: int, steps: int) -> float:
    """Images/s of the project's grain training loader with ``workers`` processes."""
    from qvec_jax.data.loader import TrainLoader

    with TrainLoader(split, batch, seed=0, end_step=steps + 2, workers=workers) as it:
        next(it), next(it)  # workers started, first batches in flight
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps * batch / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048, help="training images in the dataset")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="grain worker processes")
    ap.add_argument("--target", type=float, default=2000.0, help="consumer images/s")
    args = ap.parse_args(argv)
    mesh = make_mesh()
    with tempfile.TemporaryDirectory() as root:
        build_dataset(root, args.n)
        task = D.Task("bench_input32", D.TfdsSource("qvec_bench_input"), CLASSES)
        split = D.load_split(task, "train", image_size=IMAGE, data_dir=root, in_memory=False)
        prep, mv = split.preprocessor, split.reader.max_value
        nb = min(8, len(split) // args.batch)
        pos = [np.arange(i * args.batch, (i + 1) * args.batch) for i in range(nb)]

        def before(p):  # the same read + decode, then the former host preprocess
            raw, _ = split.reader.read(split.part, split.indices[p])
            return reference_before(raw, mv, IMAGE)

        def after(p):  # read + decode as uint8, then the transfer to the device
            jax.block_until_ready(shard_batch(split.get(p), mesh))

        t_before, t_after = _per_image(before, pos, args.batch), _per_image(after, pos, args.batch)
        x = shard_batch(split.get(pos[0])[0], mesh)
        run = jax.jit(prep)
        t_dev = _per_image(lambda _: jax.block_until_ready(run(x)), [None] * 4, args.batch)
        diff = float(np.max(np.abs(np.asarray(run(x)) - before(pos[0]))))
        rate = grain_rate(split, args.batch, args.workers, steps=nb * 2)
    ratio = t_before / t_after
    print(f"dataset: {len(split)} x {SIZE}px RGB PNG, TFDS array_record (streamed), batch "
          f"{args.batch}, resize to {IMAGE}px, device {jax.devices()[0].platform}")  # fmt: skip
    print(f"host before (read+decode+PIL resize, float32 out): {1e3 * t_before:.3f} ms/image")
    print(f"host after  (read+decode uint8 + transfer):        {1e3 * t_after:.3f} ms/image")
    met = "met" if ratio >= 10 else "MISSED"
    print(f"host ratio before/after: {ratio:.1f}x (goal >= 10x: {met})")
    print(f"device preprocess under jit ({jax.devices()[0].platform}): {1e3 * t_dev:.3f} ms/image;"
          f" max abs diff vs before: {diff:.2e}")  # fmt: skip
    short = "keeps ahead" if rate >= args.target else f"falls short by {1 - rate / args.target:.0%}"
    print(f"grain, {args.workers} workers: {rate:.0f} images/s vs a consumer of "
          f"{args.target:.0f}/s: {short}")  # fmt: skip
    print(f"headline: host_ms_before={1e3 * t_before:.3f} host_ms_after={1e3 * t_after:.4f} "
          f"ratio={ratio:.1f} device_ms={1e3 * t_dev:.3f} grain_images_per_s={rate:.0f} "
          f"grain_target={args.target:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
