#!/usr/bin/env python3
"""Tiny ML Program packages written by coremltools' own MIL builder, one op pattern each.

    bash scripts/setup-python.sh            # once: the venv with coremltools 9
    .cache/venv/bin/python python/make_validator_fixtures.py

Writes tests/fixtures/coremltools/ops/<name>.mlpackage (and removes packages of names no longer
listed). crates/corelm-format/tests/coremltools_ops.rs opens every package there and checks that
our validator reports no problem and that our re-inferred output types equal the ones
coremltools recorded. Each package exercises a rule where our op table was once stricter than
coremltools' type inference (see docs/validator-audit.md), e.g. `linear` on a rank-4 input, as
coremltools' torch frontend emits it.

No torch: programs are built with `mb` and converted with skip_model_load=True (Linux has no Core
ML runtime). The script is deterministic: weights come from a seeded generator, date- and
version-dependent metadata is cleared, the spec is re-serialized with sorted map keys and the
manifest item ids are derived from the package name, so a re-run reproduces the files byte for byte.
"""

import json
import logging
import shutil
import uuid
import zlib
from pathlib import Path

logging.getLogger("coremltools").setLevel(logging.ERROR)

import numpy as np  # noqa: E402

import coremltools as ct  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol, types  # noqa: E402
from coremltools.proto import Model_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "coremltools" / "ops"
SEED = 15

FP32 = types.fp32
FP16 = types.fp16
I32 = types.int32


def weights(rng, *shape):
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


# ---------------------------------------------------------------- the programs
# Each returns (program, target). Inputs are fp32 or int32 so every target accepts them.


def linear_rank4(rng):
    w, b = weights(rng, 32, 32), weights(rng, 32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 1, 32), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=w, bias=b, name="y")

    return prog, ct.target.iOS18


def linear_rank5(rng):
    w = weights(rng, 8, 16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 1, 3, 2, 16), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=w, name="y")

    return prog, ct.target.iOS18


def linear_int32(rng):
    w = rng.integers(-3, 4, size=(5, 6)).astype(np.int32)
    b = rng.integers(-3, 4, size=(5,)).astype(np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 6), dtype=I32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=w, bias=b, name="y")

    return prog, ct.target.iOS18


def matmul_broadcast(rng):
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 1, 3, 4), dtype=FP32), mb.TensorSpec(shape=(5, 4, 6), dtype=FP32)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, y):
        return mb.matmul(x=x, y=y, name="z")

    return prog, ct.target.iOS18


def matmul_transposed_const(rng):
    w = weights(rng, 3, 7, 4)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 1, 5, 4), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.matmul(x=x, y=w, transpose_y=True, name="z")

    return prog, ct.target.iOS18


def conv1d(rng):
    w, b = weights(rng, 8, 4, 3), weights(rng, 8)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 16), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.conv(x=x, weight=w, bias=b, strides=[2], pad_type="custom", pad=[1, 1], name="y")

    return prog, ct.target.iOS18


def conv2d(rng):
    w, b = weights(rng, 6, 3, 3, 3), weights(rng, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 9, 8), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.conv(x=x, weight=w, bias=b, strides=[2, 2], pad_type="custom", pad=[1, 1, 0, 1], name="y")

    return prog, ct.target.iOS18


def conv2d_groups_same(rng):
    w = weights(rng, 4, 2, 3, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 7, 5), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.conv(x=x, weight=w, strides=[2, 1], pad_type="same", dilations=[1, 2], groups=2, name="y")

    return prog, ct.target.iOS18


def conv_runtime_bias(rng):
    # iOS 17 made conv's bias an ordinary input: here it is computed at run time.
    w = weights(rng, 8, 4, 1)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, 4, 6), dtype=FP32), mb.TensorSpec(shape=(8,), dtype=FP32)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, b):
        return mb.conv(x=x, weight=w, bias=mb.mul(x=b, y=2.0), name="y")

    return prog, ct.target.iOS18


def topk_ios15(rng):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 9), dtype=FP32)], opset_version=ct.target.iOS15)
    def prog(x):
        return mb.topk(x=x, k=3, axis=-1, name="top")

    return prog, ct.target.iOS15


def topk_ios16_values_only(rng):
    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 6), dtype=FP32)], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.topk(x=x, k=2, axis=0, sort=False, return_indices=False, name="top")

    return prog, ct.target.iOS16


def topk_int16_k(rng):
    # iOS 17: x may be a small integer type and k an int16.
    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 8), dtype=I32)], opset_version=ct.target.iOS18)
    def prog(x):
        small = mb.cast(x=x, dtype="int16")
        values, indices = mb.topk(x=small, k=np.int16(4), output_indices_dtype="uint16", name="top")
        return mb.cast(x=values, dtype="int32"), mb.cast(x=indices, dtype="int32")

    return prog, ct.target.iOS18


def gather_along_axis_ios15(rng):
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(3, 5), dtype=FP32), mb.TensorSpec(shape=(3, 2), dtype=I32)],
        opset_version=ct.target.iOS15,
    )
    def prog(x, idx):
        return mb.gather_along_axis(x=x, indices=idx, axis=1, name="y")

    return prog, ct.target.iOS15


def gather_nd_ios15(rng):
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(4, 5, 6), dtype=FP32), mb.TensorSpec(shape=(3, 2), dtype=I32)],
        opset_version=ct.target.iOS15,
    )
    def prog(x, idx):
        return mb.gather_nd(x=x, indices=idx, name="y")

    return prog, ct.target.iOS15


def gather_nd_ios16_batch(rng):
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 5, 6), dtype=FP32), mb.TensorSpec(shape=(2, 3, 1), dtype=I32)],
        opset_version=ct.target.iOS16,
    )
    def prog(x, idx):
        return mb.gather_nd(x=x, indices=idx, batch_dims=1, name="y")

    return prog, ct.target.iOS16


def reshape_int16_zero(rng):
    # iOS 17: the shape may be int16, and a 0 copies the input dim aligned from the end.
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 6, 4), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        shape = mb.cast(x=mb.shape(x=mb.slice_by_index(x=x, begin=[0, 0, 0], end=[1, 1, 4])), dtype="int16")
        flat = mb.reshape(x=x, shape=np.array([-1, 0], dtype=np.int16), name="y")
        return flat, mb.cast(x=shape, dtype="int32")

    return prog, ct.target.iOS18


def slice_by_size_int8(rng):
    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 6), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        begin = mb.cast(x=mb.sub(x=mb.shape(x=x), y=np.array([3, 4], dtype=np.int32)), dtype="int8")
        return mb.slice_by_size(x=x, begin=begin, size=np.array([2, -1], dtype=np.int8), name="y")

    return prog, ct.target.iOS18


def squeeze_flexible(rng):
    # coremltools keeps a squeezed axis whose size is only known at run time in the declared type.
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, get_new_symbol(), 3), dtype=FP32)], opset_version=ct.target.iOS18
    )
    def prog(x):
        return mb.squeeze(x=x, axes=[0, 1], name="y")

    return prog, ct.target.iOS18


def slice_negative_stride(rng):
    # x[4:-6:-1, ::2]: coremltools clamps a negative end at 0 before walking down to it (4 rows;
    # Python slicing keeps 5) and writes the end as 0, which both readings take as 4 rows.
    @mb.program(input_specs=[mb.TensorSpec(shape=(5, 6), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.slice_by_index(x=x, begin=[4, 0], end=[-6, 6], stride=[-1, 2], name="y")

    return prog, ct.target.iOS18


def matmul_constexpr_weight(rng):
    # coremltools' passes turn constexpr -> transpose -> linear into a matmul on the constexpr.
    data = rng.integers(-8, 8, size=(16, 8)).astype(np.int8)
    scale = (rng.random((1, 8)) * 0.1 + 0.01).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 16), dtype=FP32)], opset_version=ct.target.iOS18)
    def prog(x):
        w = mb.constexpr_blockwise_shift_scale(data=data, scale=scale)
        wt = mb.transpose(x=w, perm=[1, 0])
        return mb.linear(x=x, weight=wt, name="y")

    return prog, ct.target.iOS18


FIXTURES = [
    linear_rank4,
    linear_rank5,
    linear_int32,
    matmul_broadcast,
    matmul_transposed_const,
    conv1d,
    conv2d,
    conv2d_groups_same,
    conv_runtime_bias,
    topk_ios15,
    topk_ios16_values_only,
    topk_int16_k,
    gather_along_axis_ios15,
    gather_nd_ios15,
    gather_nd_ios16_batch,
    reshape_int16_zero,
    slice_by_size_int8,
    slice_negative_stride,
    squeeze_flexible,
    matmul_constexpr_weight,
]


# ---------------------------------------------------------------- writing


def save(prog, target, path):
    mlmodel = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    # Date- and version-dependent metadata would make every run differ.
    mlmodel.user_defined_metadata.clear()
    mlmodel.short_description = f"corelm validator fixture: {path.stem}"
    if path.exists():
        shutil.rmtree(path)
    mlmodel.save(str(path))
    # protobuf writes map fields in no fixed order; rewrite the spec with sorted map keys.
    spec_path = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    # Manifest item ids are random UUIDs; derive them from the package and item names instead.
    manifest = path / "Manifest.json"
    info = json.loads(manifest.read_text())
    ids = {
        old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"corelm/ops/{path.name}/{item['path']}")).upper()
        for old, item in info["itemInfoEntries"].items()
    }
    info["itemInfoEntries"] = {ids[k]: v for k, v in info["itemInfoEntries"].items()}
    info["rootModelIdentifier"] = ids[info["rootModelIdentifier"]]
    manifest.write_text(json.dumps(info, indent=4, sort_keys=True) + "\n")
    # A program without large constants gets an empty weights/ directory, which git would drop;
    # the manifest lists it and readers require it, so keep it with an empty marker file.
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    if not any(weights.iterdir()):
        (weights / ".gitkeep").write_bytes(b"")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    names = set()
    for make in FIXTURES:
        # One generator per fixture, seeded by its name: adding one does not change the others.
        rng = np.random.default_rng([SEED, zlib.crc32(make.__name__.encode())])
        prog, target = make(rng)
        path = OUT / f"{make.__name__}.mlpackage"
        save(prog, target, path)
        names.add(path.name)
        print(f"wrote {path.relative_to(ROOT)}")
    for stale in OUT.glob("*.mlpackage"):
        if stale.name not in names:
            shutil.rmtree(stale)
            print(f"removed {stale.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
