"""Packed safetensors export: bit-identical round trip, exact size, refusal of foreign files."""

from __future__ import annotations

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import qvec_jax as q
from qvec_jax import export as E
from qvec_jax import gptq as G
from qvec_jax.models import create_model
from qvec_jax.paths import flatten


@pytest.fixture(scope="module")
def demo():
    model = create_model("demo/4", num_classes=10, image_size=16)
    return model, model.init_params(0)


def assert_same_tree(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        assert fa[p].dtype == fb[p].dtype and fa[p].shape == fb[p].shape, p
        np.testing.assert_array_equal(np.asarray(fa[p]), np.asarray(fb[p]), err_msg=p)


@pytest.mark.parametrize("bits,granularity", [(2, "channel"), (3, "channel"), (4, "tensor")])
def test_round_trip_is_ptq(demo, tmp_path, bits, granularity):
    _, params = demo
    spec = q.QuantSpec(bits, granularity)
    f = tmp_path / "m.safetensors"
    meta = {"variant": "demo/4", "num_classes": 10}
    size = E.export_packed(params, f, spec, meta=meta)
    loaded, header = E.load_packed(f)
    assert_same_tree(loaded, q.ptq(params, spec))
    assert header["meta"] == meta
    assert (header["bits"], header["granularity"], header["version"]) == (bits, granularity, 3)
    assert header["rule"][0] == [spec.rule.patterns[0][0].pattern, [1, 2]]
    # tensor bytes = size_report exactly; the rest is the safetensors JSON header
    assert size == f.stat().st_size == E.packed_size(params, spec, meta=meta)
    (n_header,) = struct.unpack("<Q", f.read_bytes()[:8])
    total = q.size_report(params, spec)["total_bytes"]
    assert size - 8 - n_header == total
    # the concatenated layout keeps the header small even for the tiny demo model
    assert n_header + 8 <= 0.02 * total
    with safe_open(str(f), framework="numpy") as g:
        assert set(g.keys()) == {"codes", "scales", "rest.float32"}
    index = header["index"]
    assert [e[0] for e in index] == list(flatten(params))
    assert {e[0] for e in index if e[3] is not None} == set(spec.rule.select(params))


def test_gptq_tree_round_trip(demo, tmp_path):
    model, params = demo
    images = jax.random.uniform(jax.random.key(3), (8, 16, 16, 3), minval=-1, maxval=1)
    qt = G.gptq_quantize(params, model, images, 3, sequential=False)
    f = tmp_path / "g.safetensors"
    E.export_packed(qt, f, 3)
    assert_same_tree(E.load_packed(f)[0], q.dequantize(qt))
    with pytest.raises(E.ExportError, match="3-bit QTensor"):
        E.export_packed(qt, tmp_path / "x.safetensors", 2)


@pytest.mark.parametrize("variant,classes,size", [("B/16", 1000, 224), ("demo/4", 10, 16)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_size_within_2pct_of_size_report(bits, variant, classes, size):
    abstract = create_model(variant, num_classes=classes, image_size=size).abstract_params()
    total = q.size_report(abstract, bits)["total_bytes"]
    meta = {"variant": variant, "num_classes": classes, "image_size": size}
    assert 0 <= E.packed_size(abstract, bits, meta=meta) - total <= 0.02 * total


def test_refuses_foreign_files(tmp_path, demo):
    _, params = demo
    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(E.ExportError, match="other.safetensors: not a qvec_jax.packed file"):
        E.load_packed(other)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(E.ExportError, match="junk.bin: not a readable") as e:
        E.load_packed(junk)
    assert "\n" not in str(e.value)
    with pytest.raises(E.ExportError, match="missing.safetensors"):
        E.load_packed(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    E.export_packed(params, good, 2)
    with safe_open(str(good), framework="numpy") as f:
        md, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    damaged = {
        "no-codes": ({k: v for k, v in arrays.items() if k != "codes"}, md, "'codes'"),
        "short": (arrays | {"scales": arrays["scales"][:-1]}, md, "'scales' ends before"),
        "long": (arrays | {"codes": np.append(arrays["codes"], np.uint8(0))}, md,
                 "'codes' holds more"),
        "dtype": (arrays | {"codes": arrays["codes"].astype(np.int32)}, md, "'codes' is int32"),
        "rest": (arrays | {"rest.float32": arrays["rest.float32"].astype(np.float16)}, md,
                 "'rest.float32' is float16"),
        "index": (arrays, md | {"qvec_jax": md["qvec_jax"].replace('"packed":"', '"packed":"!')},
                  "unreadable index"),
    }  # fmt: skip
    for name, (tensors, metadata, why) in damaged.items():
        cut = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(cut), with_checksums(metadata, tensors))  # the layout is wrong
        with pytest.raises(E.ExportError, match=f"{name}.safetensors: damaged .*{why}") as e:
            E.load_packed(cut)
        assert "\n" not in str(e.value)
    old = tmp_path / "v1.safetensors"
    v1 = md["qvec_jax"].replace('"version":3', '"version":1')
    save_file(arrays, str(old), md | {"qvec_jax": v1})
    with pytest.raises(E.ExportError, match="version 1 is not 3; re-export"):
        E.load_packed(old)


def with_checksums(md: dict, tensors: dict) -> dict:
    """``md`` with the header's crc32 table recomputed for ``tensors``."""
    header = json.loads(md["qvec_jax"])
    header["crc32"] = {k: E.crc32(v) for k, v in tensors.items()}
    return md | {"qvec_jax": json.dumps(header)}


def test_bad_export_leaves_target_untouched(demo, tmp_path):
    _, params = demo
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"old")
    with pytest.raises(E.ExportError, match="meta"):
        E.export_packed(params, f, 2, meta={"x": object()})
    bad = dict(params, extra=jnp.zeros(2, jnp.complex64))
    with pytest.raises(E.ExportError, match="extra: cannot store dtype complex64"):
        E.export_packed(bad, f, 2)
    assert f.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ----------------------------------------------------------------------------- checksums


def tensor_spans(f) -> dict[str, tuple[int, int]]:
    """``{tensor: (first byte, end byte)}`` in the file, from its safetensors header."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8 : 8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in head.items() if k != "__metadata__"}  # fmt: skip


@pytest.fixture
def exported(demo, tmp_path):
    """A real 2-bit export of the demo model, with the params it must load as."""
    _, params = demo
    f = tmp_path / "m.safetensors"
    E.export_packed(params, f, 2, meta={"variant": "demo/4", "num_classes": 10, "image_size": 16})
    return f, q.ptq(params, 2)


def test_a_flipped_bit_in_any_tensor_is_refused_naming_the_file_and_tensor(exported, tmp_path):
    from qvec_jax import checkpoints

    good, _ = exported
    spans = tensor_spans(good)
    assert set(spans) == {"codes", "scales", "rest.float32"}
    for name, (a, b) in spans.items():
        for at, bit in ((a, 0), ((a + b) // 2, 5), (b - 1, 7)):  # first, middle, last byte
            raw = bytearray(good.read_bytes())
            raw[at] ^= 1 << bit
            bad = tmp_path / f"bad-{name}.safetensors"
            bad.write_bytes(bytes(raw))
            with pytest.raises(E.ExportError, match="does not match its checksum") as e:
                E.load_packed(bad)
            msg = str(e.value)
            assert msg.startswith(f"{bad}: tensor {name!r} ") and "\n" not in msg, msg
            assert "re-export" in msg
            with pytest.raises(checkpoints.CheckpointError, match=f"tensor {name!r}"):
                checkpoints.restore_params(bad)  # what qvec eval / patch / grid read with
            assert bad.read_bytes() == bytes(raw)  # the damaged file is left as it is


def test_randomized_codes_are_refused_and_an_intact_file_loads_bit_identically(exported, tmp_path):
    good, want = exported
    before = good.read_bytes()
    for _ in range(2):
        got, _ = E.load_packed(good)
        assert_same_tree(got, want)
    assert good.read_bytes() == before  # loading reads only
    a, b = tensor_spans(good)["codes"]
    raw = bytearray(before)
    raw[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    bad = tmp_path / "random-codes.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(E.ExportError, match=rf"{bad}: tensor 'codes' does not match its checksum"):
        E.load_packed(bad)


def test_version_2_files_without_checksums_are_refused_with_a_message_to_re_export(exported):
    good, _ = exported
    with safe_open(str(good), framework="numpy") as f:
        md, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(md["qvec_jax"])
    del header["crc32"]
    v2 = good.with_name("v2.safetensors")
    save_file(arrays, str(v2), md | {"qvec_jax": json.dumps(header | {"version": 2})})
    with pytest.raises(E.ExportError, match=rf"{v2}: .* version 2 is not 3 \(written before "
                       r"per-tensor checksums.*re-export it"):  # fmt: skip
        E.load_packed(v2)
    nosums = good.with_name("nosums.safetensors")  # a version 3 header without its table
    save_file(arrays, str(nosums), md | {"qvec_jax": json.dumps(header)})
    with pytest.raises(E.ExportError, match=rf"{nosums}: damaged .* no crc32 table"):
        E.load_packed(nosums)
    extra = good.with_name("extra.safetensors")  # a tensor the table does not list
    save_file(arrays | {"x": np.zeros(2, np.float32)}, str(extra), md)
    with pytest.raises(E.ExportError, match=rf"{extra}: damaged .*tensor 'x' has no checksum"):
        E.load_packed(extra)
