#!/usr/bin/env bash
# What the reference interpreter adds to an iOS app: the C library (corelm-ffi) for
# aarch64-apple-ios built with its default features and with --no-default-features (Core ML
# alone), measured three ways, into bench/results/ios-lib-size.json (provenance as
# bench/provenance.py records it):
#   - the static library as cargo builds it (release profile, with its debug info);
#   - the same with the debug info stripped (llvm-strip --strip-debug; a static library keeps its
#     symbols, the app's linker needs them);
#   - linked as an app would link it: a dylib exporting the corelm_* functions, dead-stripped by
#     rust-lld (ld64 flavour), system symbols left undefined (no iPhoneOS SDK here), then
#     stripped of local symbols (llvm-strip -x): the code and data the app actually carries.
# Needs the rustup target aarch64-apple-ios, llvm-strip (LLVM_STRIP overrides) and python3; no
# Apple tools. `cargo build` would also link the crate's cdylib, which needs Apple's linker and
# the iPhoneOS SDK (xcrun), so the static library is built alone with `cargo rustc`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target=aarch64-apple-ios
out=target/ios-lib-size
strip_tool="${LLVM_STRIP:-llvm-strip}"
host="$(rustc -vV | sed -n 's/^host: //p')"
lld="$(rustc --print sysroot)/lib/rustlib/$host/bin/rust-lld"
ios="$(rustc --print deployment-target --target "$target" | sed 's/.*=//')"
mkdir -p "$out"
link=()
for symbol in $(grep -o 'corelm_[a-z_]*(' crates/corelm-ffi/include/corelm.h | tr -d '(' | sort -u); do
  link+=(-u "_$symbol" -exported_symbol "_$symbol")
done
for variant in with-interpreter without-interpreter; do
  features=()
  if [ "$variant" = without-interpreter ]; then features=(--no-default-features); fi
  cargo rustc --release -p corelm-ffi --target "$target" --crate-type staticlib "${features[@]}"
  cp "target/$target/release/libcorelm_ffi.a" "$out/$variant.a"
  "$strip_tool" --strip-debug -o "$out/$variant-stripped.a" "$out/$variant.a"
  "$lld" -flavor darwin -arch arm64 -platform_version ios "$ios" "$ios" -dylib -dead_strip \
    -undefined dynamic_lookup "${link[@]}" -o "$out/$variant.dylib" "$out/$variant.a"
  "$strip_tool" -x -o "$out/$variant-stripped.dylib" "$out/$variant.dylib"
done
python3 - "$out" "$target" "$(rustc -V)" "$("$strip_tool" --version | grep -m1 -i version)" <<'EOF'
import json
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from provenance import provenance

out, target, rustc, strip_version = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
size = lambda name: (out / name).stat().st_size
pair = lambda suffix: {
    "bytes_with_interpreter": size(f"with-interpreter{suffix}"),
    "bytes_without": size(f"without-interpreter{suffix}"),
}
record = provenance(out / "without-interpreter.a")
result = {
    "commit": record["commit"],
    "date": record["date"],
    "target": target,
    **pair(".a"),
    "measured": "libcorelm_ffi.a from `cargo rustc --release -p corelm-ffi --target aarch64-apple-ios "
    "--crate-type staticlib`, with default features (the `interpreter` feature) and with "
    "--no-default-features; release profile with debug = 1",
    "debug_stripped": {**pair("-stripped.a"), "measured": f"llvm-strip --strip-debug ({strip_version})"},
    "linked": {
        **pair("-stripped.dylib"),
        "measured": "the static library linked into a dylib exporting the corelm_* functions by rust-lld "
        "-flavor darwin -dead_strip -undefined dynamic_lookup (no iPhoneOS SDK), then llvm-strip -x: "
        "the code and data an app carries",
    },
    "rustc": rustc,
    "provenance": record,
}
path = Path("bench/results/ios-lib-size.json")
path.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
EOF
