#!/usr/bin/env python3
"""Independent coremltools reference ("oracle") for corelm's Rust integration tests.

Runs inside the venv created by scripts/setup-python.sh (coremltools 9.0 + numpy) on Linux, where
coremltools cannot predict but can build, save, load and validate ML Program packages.

Subcommands:
  validate PKG [PKG ...]   Load every package the way coremltools does (spec parse, milproto -> pymil for
                           all functions, Program.validate, MLModel(skip_model_load=True)) and print one
                           JSON report with per-function op histograms and I/O as pymil sees them
                           (state inputs carry "state": true, symbolic dims are null).
                           Exit status 1 if any package failed.
  make-packages OUTDIR     Write reference packages built with coremltools (stateful KV cache, int4
                           blockwise, 4-bit LUT, multifunction, flexible shapes) plus OUTDIR/expected.json,
                           which is derived by reading the saved packages back, not from the build code.
  blobs OUTDIR             Write deterministic blob-storage files with coremltools' _BlobStorageWriter
                           (<dtype>.bin per dtype, mixed.bin) and OUTDIR/blobs.json; verify by reading back.
  read-blob FILE           Read blobs listed on stdin as [{"dtype": ..., "offset": ...}, ...] with
                           _BlobStorageReader and print a JSON list of value lists (exit 1 and a
                           one-line error on stderr if coremltools rejects any of them).

Dtype names follow MIL: fp16, fp32, int8, uint8, int16, uint16, int32, uint32, int4, uint1/2/3/4/6.
fp16 blob values are exchanged as uint16 bit patterns. JSON goes to stdout; coremltools' logging
(e.g. the "Failed to load _MLModelProxy" warnings) is silenced below ERROR level.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

logging.getLogger("coremltools").setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import coremltools as ct  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.frontend.milproto.load import load as milproto_load  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol, types  # noqa: E402
from coremltools.converters.mil.mil.types.symbolic import is_symbolic  # noqa: E402
from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter  # noqa: E402
from coremltools.models.utils import _try_get_weights_dir_path  # noqa: E402
from coremltools.optimize import coreml as cto  # noqa: E402

# Blob dtype name -> (suffix of the _BlobStorage{Writer,Reader} method, numpy dtype handed to it,
# inclusive integer range). fp16 travels as uint16 bit patterns; sub-byte types as unpacked int8/uint8.
BLOB_DTYPES = {
    "fp16": ("fp16", np.uint16, None),
    "fp32": ("float", np.float32, None),
    "int8": ("int8", np.int8, (-128, 127)),
    "uint8": ("uint8", np.uint8, (0, 255)),
    "int16": ("int16", np.int16, (-(2**15), 2**15 - 1)),
    "uint16": ("uint16", np.uint16, (0, 2**16 - 1)),
    "int32": ("int32", np.int32, (-(2**31), 2**31 - 1)),
    "uint32": ("uint32", np.uint32, (0, 2**32 - 1)),
    "int4": ("int4", np.int8, (-8, 7)),
    "uint1": ("uint1", np.uint8, (0, 1)),
    "uint2": ("uint2", np.uint8, (0, 3)),
    "uint3": ("uint3", np.uint8, (0, 7)),
    "uint4": ("uint4", np.uint8, (0, 15)),
    "uint6": ("uint6", np.uint8, (0, 63)),
}
BLOB_LENGTHS = (1, 3, 7, 13, 100)
# fp16 specials: +-0, +-inf, quiet NaN, +-65504 (max finite), smallest subnormal, 1.0.
FP16_SPECIAL_BITS = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0xFBFF, 0x0001, 0x3C00]
F32 = np.finfo(np.float32)
FP32_SPECIALS = [0.0, -0.0, float(F32.max), float(-F32.max), float(F32.smallest_subnormal), 1.0]

SEED = 20240607
PACKAGE_METADATA_KEY = "corelm.fixture"
DROPPED_METADATA_KEY = "com.github.apple.coremltools.conversion_date"  # date-dependent


def dump(obj):
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# ----------------------------------------------------------------------------------------------
# validate


def describe_var(var):
    """Name, dtype and shape of a pymil Var; symbolic dims become null, states report the
    wrapped tensor dtype/shape plus "state": true."""
    sym_type = var.sym_type
    entry = {"name": var.name}
    if types.is_state(sym_type):
        sym_type = sym_type.wrapped_type()
        entry["state"] = True
    entry["dtype"] = types.builtin_to_string(sym_type.get_primitive())
    entry["shape"] = [None if is_symbolic(d) else int(d) for d in sym_type.get_shape()]
    return entry


def load_function(spec, fname, weights_dir):
    """milproto-load a copy of `spec` holding only function `fname`.

    The coremltools 9 loader keeps ONE name->var table for all functions of a program and walks
    the protobuf map in an order that varies between processes, so a reference to a var defined in
    another function may resolve or fail depending on the run. Loading functions one at a time
    makes such references fail deterministically (KeyError "Var ... not found")."""
    single = ct.proto.Model_pb2.Model()
    single.CopyFrom(spec)
    for other in [n for n in single.mlProgram.functions if n != fname]:
        del single.mlProgram.functions[other]
    prog = milproto_load(model_spec=single, specification_version=spec.specificationVersion,
                         file_weights_dir=weights_dir)
    prog.validate()
    return prog.functions[fname]


def validate_package(path):
    report = {"path": path, "ok": False, "error": None, "spec_version": None, "functions": {}}
    try:
        spec = ct.utils.load_spec(path)
        report["spec_version"] = spec.specificationVersion
        if spec.WhichOneof("Type") != "mlProgram" or not spec.mlProgram.functions:
            raise ValueError("not an ML Program with at least one function")
        weights_dir = _try_get_weights_dir_path(path)
        for fname in sorted(spec.mlProgram.functions):
            func = load_function(spec, fname, weights_dir)
            histogram = {}
            for op in func.operations:
                histogram[op.op_type] = histogram.get(op.op_type, 0) + 1
            report["functions"][fname] = {
                "op_histogram": histogram,
                "inputs": [describe_var(v) for v in func.inputs.values()],
                "outputs": [describe_var(v) for v in func.outputs],
            }
        ct.models.MLModel(path, skip_model_load=True)
        report["ok"] = True
    except Exception as exc:  # every failure is reported per package
        report["error"] = f"{type(exc).__name__}: {exc}"
    return report


def cmd_validate(args):
    reports = [validate_package(p) for p in args.packages]
    dump({"packages": reports})
    return 0 if all(r["ok"] for r in reports) else 1


# ----------------------------------------------------------------------------------------------
# make-packages


def convert(prog, inputs=None):
    return ct.convert(prog, inputs=inputs, convert_to="mlprogram",
                      minimum_deployment_target=ct.target.iOS18, skip_model_load=True)


def save(model, path):
    meta = model.user_defined_metadata
    meta.pop(DROPPED_METADATA_KEY, None)
    meta[PACKAGE_METADATA_KEY] = os.path.basename(path)
    model.save(path)


def build_stateful():
    """KV-cache update: write x into keyCache[0, :, :, pos:pos+4, :], then attend over layer 0."""
    @mb.program(input_specs=[mb.TensorSpec((1, 2, 4, 8), types.fp16), mb.TensorSpec((1,), types.int32),
                             mb.StateTensorSpec((2, 1, 2, 16, 8), types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x, pos, keyCache):
        cache = mb.read_state(input=keyCache)
        begin = mb.concat(values=(np.zeros(3, np.int32), pos, np.zeros(1, np.int32)), axis=0)
        end = mb.add(x=begin, y=np.array([1, 1, 2, 4, 8], np.int32))
        updated = mb.slice_update(x=cache, update=mb.expand_dims(x=x, axes=[0]), begin=begin, end=end)
        updated = mb.coreml_update_state(state=keyCache, value=updated)
        keys = mb.slice_by_index(x=updated, begin=[0] * 5, end=[1, 1, 2, 16, 8],
                                 squeeze_mask=[True, False, False, False, False])
        return mb.scaled_dot_product_attention(query=x, key=keys, value=keys, name="out")

    return convert(prog)


def linear_program(rng, weight_shape, seq):
    """fp32 x[1, seq, Din] -> linear(W, b) -> gelu -> y; seq may be symbolic."""
    weight = rng.standard_normal(weight_shape).astype(np.float32)
    bias = rng.standard_normal(weight_shape[0]).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, seq, weight_shape[1]), types.fp32)],
                opset_version=ct.target.iOS18)
    def prog(x):
        return mb.gelu(x=mb.linear(x=x, weight=weight, bias=bias), mode="TANH_APPROXIMATION", name="y")

    return prog


def build_int4_blockwise(rng):
    """Linear (64x64) with int4 weights, one scale per 32 input elements; seq is a RangeDim."""
    x_type = ct.TensorType(name="x", shape=(1, ct.RangeDim(1, 64, default=8), 64))
    model = convert(linear_program(rng, (64, 64), get_new_symbol()), inputs=[x_type])
    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32,
        weight_threshold=512))
    return cto.linear_quantize_weights(model, config)


def build_lut4(rng):
    """Linear (32x64) palettized to 4 bits (one 16-entry LUT per 8 output channels); x has
    enumerated shapes."""
    x_type = ct.TensorType(name="x", shape=ct.EnumeratedShapes(
        shapes=[[1, 1, 64], [1, 4, 64], [1, 8, 64]], default=[1, 4, 64]))
    model = convert(linear_program(rng, (32, 64), get_new_symbol()), inputs=[x_type])
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
        mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=8,
        weight_threshold=512))
    return cto.palettize_weights(model, config)


def build_multifunction(rng, outdir, tmpdir):
    """Functions "prefill" (seq 8) and "decode" (seq 1) over the same linear weights, merged with
    save_multifunction (which deduplicates the shared consts); default function is "prefill"."""
    state = rng.bit_generator.state
    sources = {}
    for fname, seq in (("prefill", 8), ("decode", 1)):
        rng.bit_generator.state = state  # identical weights in both functions
        sources[fname] = os.path.join(tmpdir, fname + ".mlpackage")
        convert(linear_program(rng, (64, 64), seq)).save(sources[fname])
    desc = ct.utils.MultiFunctionDescriptor()
    for fname, src in sources.items():
        desc.add_function(src, src_function_name="main", target_function_name=fname)
    desc.default_function_name = "prefill"
    merged = os.path.join(tmpdir, "merged.mlpackage")
    ct.utils.save_multifunction(desc, merged)
    save(ct.models.MLModel(merged, skip_model_load=True), os.path.join(outdir, "multifunction.mlpackage"))


def dtype_name(proto_enum, value):
    name = proto_enum.Name(value)
    name = {"DOUBLE": "fp64"}.get(name, name).lower()
    return name.replace("bfloat", "bf").replace("float", "fp")


def feature_entry(feature):
    ftype = feature.type
    array = ftype.stateType.arrayType if ftype.WhichOneof("Type") == "stateType" else ftype.multiArrayType
    entry = {
        "name": feature.name,
        "dtype": dtype_name(ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType, array.dataType),
        "shape": list(array.shape),
    }
    flex = array.WhichOneof("ShapeFlexibility")
    if flex == "shapeRange":
        entry["flexibility"] = {"kind": "range", "ranges": [
            [r.lowerBound, r.upperBound] for r in array.shapeRange.sizeRanges]}
    elif flex == "enumeratedShapes":
        entry["flexibility"] = {"kind": "enumerated", "shapes": [
            list(s.shape) for s in array.enumeratedShapes.shapes]}
    else:
        entry["flexibility"] = None
    return entry


def function_expectation(func_desc, func_proto):
    """Expected facts for one function: I/O from its description, ops/weight dtypes from the
    serialized top-level operations of the active block specialization."""
    histogram, weight_dtypes = {}, set()
    for op in func_proto.block_specializations[func_proto.opset].operations:
        histogram[op.type] = histogram.get(op.type, 0) + 1
        values = list(op.attributes.values())
        values += [b.value for arg in op.inputs.values() for b in arg.arguments if b.HasField("value")]
        for value in values:
            if value.WhichOneof("value") == "blobFileValue":
                weight_dtypes.add(dtype_name(ct.proto.MIL_pb2.DataType, value.type.tensorType.dataType))
    states = [feature_entry(s) for s in func_desc.state]
    for s in states:
        del s["flexibility"]
    return {
        "inputs": [feature_entry(f) for f in func_desc.input],
        "outputs": [feature_entry(f) for f in func_desc.output],
        "states": states,
        "op_histogram": histogram,
        "weight_dtypes": sorted(weight_dtypes),
    }


def package_expectation(path):
    spec = ct.utils.load_spec(path)
    desc, program = spec.description, spec.mlProgram
    if desc.functions:
        functions = {f.name: function_expectation(f, program.functions[f.name]) for f in desc.functions}
        default = desc.defaultFunctionName
    else:
        functions = {"main": function_expectation(desc, program.functions["main"])}
        default = "main"
    weights_dir = _try_get_weights_dir_path(path)
    model_dir = os.path.dirname(weights_dir)
    weight_files = {}
    for root, _, files in os.walk(weights_dir):
        for name in files:
            full = os.path.join(root, name)
            weight_files[os.path.relpath(full, model_dir)] = os.path.getsize(full)
    return {
        "spec_version": spec.specificationVersion,
        "functions": functions,
        "default_function": default,
        "metadata_user_defined": dict(desc.metadata.userDefined),
        "weight_files": weight_files,
    }


def cmd_make_packages(args):
    outdir = args.outdir
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(SEED)
    names = ["stateful", "int4_blockwise", "lut4", "multifunction"]
    for name in names:
        shutil.rmtree(os.path.join(outdir, name + ".mlpackage"), ignore_errors=True)
    save(build_stateful(), os.path.join(outdir, "stateful.mlpackage"))
    save(build_int4_blockwise(rng), os.path.join(outdir, "int4_blockwise.mlpackage"))
    save(build_lut4(rng), os.path.join(outdir, "lut4.mlpackage"))
    with tempfile.TemporaryDirectory() as tmpdir:
        build_multifunction(rng, outdir, tmpdir)
    expected = {n + ".mlpackage": package_expectation(os.path.join(outdir, n + ".mlpackage"))
                for n in names}
    with open(os.path.join(outdir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(names)} packages and expected.json to {outdir}")
    return 0


# ----------------------------------------------------------------------------------------------
# blobs / read-blob


def blob_values(dtype, n, rng):
    """n deterministic values of `dtype` covering its extremes (as the numpy array to write)."""
    _, np_dtype, bounds = BLOB_DTYPES[dtype]
    if dtype == "fp32":
        pool = FP32_SPECIALS + list(rng.standard_normal(n) * 1000.0)
    elif dtype == "fp16":
        pool = FP16_SPECIAL_BITS + list(rng.integers(0, 0x7C00, n))  # plus random finite positives
    else:
        lo, hi = bounds
        pool = [lo, hi] + list(rng.integers(lo, hi, n, endpoint=True))
    return np.array(pool[:n], dtype=np_dtype)


def jsonable(dtype, array):
    key = "bits" if dtype == "fp16" else "values"
    return key, [float(v) for v in array] if dtype == "fp32" else [int(v) for v in array]


def write_blob_file(path, blobs):
    """blobs: list of (dtype, array). Returns the blobs.json entries for the file."""
    writer = _BlobStorageWriter(path, truncate_file=True)
    entries = []
    for dtype, array in blobs:
        offset = getattr(writer, f"write_{BLOB_DTYPES[dtype][0]}_data")(array)
        key, values = jsonable(dtype, array)
        entries.append({"dtype": dtype, "offset": int(offset), key: values})
    del writer  # flush and close before reading back
    return entries


def read_blob(reader, dtype, offset):
    array = getattr(reader, f"read_{BLOB_DTYPES[dtype][0]}_data")(offset)
    return jsonable(dtype, array)[1]


def cmd_blobs(args):
    outdir = args.outdir
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(SEED)
    plan = {f"{d}.bin": [(d, blob_values(d, n, rng)) for n in BLOB_LENGTHS] for d in BLOB_DTYPES}
    plan["mixed.bin"] = [(d, blob_values(d, 13, rng)) for d in BLOB_DTYPES]
    files = {name: write_blob_file(os.path.join(outdir, name), blobs) for name, blobs in plan.items()}
    for name, entries in files.items():
        reader = _BlobStorageReader(os.path.join(outdir, name))
        for e in entries:
            got = read_blob(reader, e["dtype"], e["offset"])
            expected = e.get("values", e.get("bits"))
            if got != expected:
                raise RuntimeError(f"{name}@{e['offset']}: read back {got}, wrote {expected}")
    with open(os.path.join(outdir, "blobs.json"), "w") as f:
        json.dump({"files": files}, f, indent=2, sort_keys=True)
        f.write("\n")
    dump({"outdir": outdir, "verified": True, "files": {n: len(e) for n, e in files.items()}})
    return 0


def cmd_read_blob(args):
    requests = json.load(sys.stdin)
    try:
        reader = _BlobStorageReader(args.file)
        values = [read_blob(reader, r["dtype"], int(r["offset"])) for r in requests]
    except Exception as exc:  # e.g. dtype mismatch, bad sentinel, offset out of range
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    dump(values)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, arg, nargs, help_text in (
        ("validate", cmd_validate, "packages", "+", "load and validate packages, print a JSON report"),
        ("make-packages", cmd_make_packages, "outdir", None, "write reference packages and expected.json"),
        ("blobs", cmd_blobs, "outdir", None, "write reference blob files and blobs.json"),
        ("read-blob", cmd_read_blob, "file", None, "read blobs listed as JSON on stdin"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument(arg, nargs=nargs, metavar=arg.upper())
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
