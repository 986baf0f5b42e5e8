//! Compiles our Core ML schema with protox (pure Rust), so no system `protoc` is needed.
fn main() {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["coreml.proto", "mil.proto"], ["proto"]).expect("proto/ schema must compile");
    prost_build::Config::new()
        // Ordered maps keep serialized models byte-for-byte reproducible.
        .btree_map(["."])
        .compile_fds(descriptors)
        .expect("prost code generation");
}
